"""The ``pyro-struct`` command line: demo, inspect, fit, posterior, check and bench.

Usage::

    pyro-struct [--threads N] COMMAND ...
    pyro-struct demo [--flow straf] [--structure faithful] [--steps N] [--seed S] [--out FOLDER]
    pyro-struct inspect FILE.py:FUNCTION [--observed a,b] [--structure faithful] [--flow straf|none] [--out FOLDER]
    pyro-struct fit FILE.py:FUNCTION --observed x --out guide.pt [--flow straf] [--steps N] [--seed S]
    pyro-struct posterior guide.pt FILE.py:FUNCTION --obs obs.json [--samples N] [--out post.json]
    pyro-struct check guide.pt FILE.py:FUNCTION [--obs obs.json] [--out FOLDER] [--simulations N]
    pyro-struct bench NAME [options]     (from a source checkout: same as ``python -m benchmarks NAME``)

``FUNCTION`` is a Pyro model, or a factory that returns one when called (with ``--kwargs``).
Every failure ends with one line ``pyro-struct: error: ...`` on stderr and a non-zero exit.

New subcommands register themselves in :data:`COMMANDS` with a function that adds their
arguments and one that runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# torch-free at import (torch is imported inside), so importing it here keeps threads configurable
from .diagnostics.checks import prior_predictive_check, symmetrized_kl_estimate

__all__ = [
    "main",
    "build_parser",
    "load_model",
    "load_observations",
    "posterior_summary",
    "format_summary",
    "symmetrized_kl_estimate",
    "COMMANDS",
    "Command",
    "CLIError",
]

PROG = "pyro-struct"
FLOW_CLASSES = {"straf": "StrAF", "grf": "GraphicalResidualFlow", "cnf": "StructuredCNF"}
#: the option of each flow class that ``--layers`` sets
LAYER_OPTION = {"straf": "num_layers", "grf": "num_layers"}
STRUCTURES = ("faithful", "dense", "moralized", "random", "meanfield")  # inversion.INVERSE_KINDS (torch-free here)
OBJECTIVES = ("skl", "fkl", "elbo")
#: Training steps and flow layers of ``pyro-struct demo`` (StrAF on the arithmetic
#: circuit: about a minute of CPU time).
DEMO_STEPS = 2000
DEMO_LAYERS = 2


class CLIError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` is the process exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (raised, reported by :func:`main`)."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')", exit_code=2)


@dataclass
class Command:
    """One subcommand: its name, help line, argument builder and runner (returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------- loading
def _parse_json_arg(text: str | None, what: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CLIError(f"{what} must be a JSON object such as '{{\"T\": 5}}'; got {type(value).__name__}")
    return value


def _import_file(path: Path):
    """Import a Python file as a fresh module (its folder is importable while it loads)."""
    name = f"_pyro_struct_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import '{path}': not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except CLIError:
        raise
    except BaseException as e:  # a user file may raise anything, SystemExit included
        raise CLIError(f"importing '{path}' failed: {_one_line(e)}") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _sample_sites(fn: Callable, kwargs: dict) -> tuple[int, Any]:
    """Run ``fn(**kwargs)`` under a Pyro trace: (number of sample sites, return value)."""
    import pyro

    trace = pyro.poutine.trace(fn).get_trace(**kwargs)
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    return len(sites), trace.nodes["_RETURN"]["value"]


def load_model(ref: str, kwargs: dict | None = None) -> tuple[Callable, str]:
    """Load a Pyro model from ``"FILE.py:FUNCTION"``.

    ``FUNCTION`` may be a model or a factory returning one: it is called once with
    ``kwargs``; if that call samples nothing and returns a callable, the callable is the
    model, otherwise ``FUNCTION`` with ``kwargs`` bound is.

    Args:
        ref: ``path/to/file.py:function_name``.
        kwargs: keyword arguments for ``FUNCTION``.

    Returns:
        ``(model, name)``.

    Raises:
        CLIError: malformed reference, unreadable file, missing function, failing call.
    """
    import functools

    kwargs = dict(kwargs or {})
    file, sep, func = ref.rpartition(":")
    if not sep or not file or not func:
        raise CLIError(f"model reference {ref!r} must look like FILE.py:FUNCTION")
    path = Path(file)
    if not path.is_file():
        raise CLIError(f"cannot read model file '{file}': no such file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"cannot read model file '{file}': permission denied")
    module = _import_file(path)
    obj = module
    for part in func.split("."):
        if not hasattr(obj, part):
            callables = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise CLIError(f"'{file}' has no function {func!r}; it defines: {', '.join(callables) or 'nothing callable'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"'{file}:{func}' is a {type(obj).__name__}, not a function")
    if type(obj).__name__ == "AmortizedModel" and callable(getattr(obj, "model", None)):
        obj = obj.model  # an @amortize-decorated model: compile a guide for the plain model
    try:
        num_sites, returned = _sample_sites(obj, kwargs)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"calling '{func}' failed: {_one_line(e)}") from None
    if num_sites == 0 and callable(returned):
        return returned, func
    if num_sites == 0:
        raise CLIError(f"'{func}' has no pyro.sample sites and does not return a model")
    return (functools.partial(obj, **kwargs) if kwargs else obj), func


def load_observations(path: str | os.PathLike) -> dict:
    """Read ``{site name: number or nested list}`` from a JSON file as tensors of the default dtype."""
    import torch

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CLIError(f"cannot read observations '{path}': no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read observations '{path}': {_one_line(e)}") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"observations '{path}' are not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise CLIError(f"observations '{path}' must be a JSON object mapping site names to numbers or lists")
    obs = {}
    for name, value in data.items():
        try:
            obs[name] = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            raise CLIError(f"observation {name!r} in '{path}' must be a number or a (nested) list of numbers") from None
    return obs


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (CLIError,)):
        return text
    return text if type(e).__name__ in text else f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------- summaries
def _coordinate_labels(name: str, shape: tuple) -> list[str]:
    from .graph import node_label
    import itertools

    return [node_label(name, idx, shape) for idx in itertools.product(*(range(s) for s in shape))]


def posterior_summary(samples: dict, truth: dict | None = None, level: float = 0.9) -> list[dict]:
    """Mean, standard deviation and central interval of every latent coordinate.

    Args:
        samples: ``{site: (n, *site_shape) tensor}`` (one observation, no batch).
        truth: optional ``{site: value}`` to report next to the summary.
        level: probability of the central interval.

    Returns:
        One dict per coordinate with ``name``, ``mean``, ``sd``, ``lower``, ``upper`` (and
        ``true``, ``inside`` when ``truth`` is given).
    """
    import torch

    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for site, value in samples.items():
        v = value.detach().to("cpu", torch.float64)
        shape = tuple(v.shape[1:])
        flat = v.reshape(v.shape[0], -1)
        qs = torch.quantile(flat, torch.tensor([lo_q, hi_q], dtype=torch.float64), dim=0)
        t = None
        if truth is not None and site in truth:
            t = torch.as_tensor(truth[site]).detach().to("cpu", torch.float64).reshape(-1)
        for k, label in enumerate(_coordinate_labels(site, shape)):
            row = {
                "name": label,
                "mean": float(flat[:, k].mean()),
                "sd": float(flat[:, k].std()) if flat.shape[0] > 1 else 0.0,
                "lower": float(qs[0, k]),
                "upper": float(qs[1, k]),
            }
            if t is not None:
                row["true"] = float(t[k])
                row["inside"] = bool(row["lower"] <= row["true"] <= row["upper"])
            rows.append(row)
    return rows


def format_summary(rows: list[dict], level: float = 0.9, max_rows: int = 40) -> str:
    """The rows of :func:`posterior_summary` as an aligned text table."""
    pct = f"{100 * level:g}%"
    has_truth = any("true" in r for r in rows)
    width = max([len("latent")] + [len(r["name"]) for r in rows])
    head = f"{'latent':<{width}} {'mean':>9} {'sd':>8} {pct + ' interval':>22}"
    if has_truth:
        head += f" {'true':>9}  inside"
    lines = [head]
    for r in rows[:max_rows]:
        interval = f"[{r['lower']:8.3f}, {r['upper']:8.3f}]"
        line = f"{r['name']:<{width}} {r['mean']:9.3f} {r['sd']:8.3f} {interval:>22}"
        if "true" in r:
            line += f" {r['true']:9.3f}  {'yes' if r['inside'] else 'no'}"
        lines.append(line)
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more coordinates (all of them in the JSON output)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- shared pieces
def _observed_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError("--observed needs at least one site name, e.g. --observed x0,x1")
    return names


def _seed(seed: int) -> None:
    import pyro

    pyro.set_rng_seed(seed)


def _flow_options(args) -> dict:
    opts = {}
    if getattr(args, "hidden", None):
        try:
            opts["hidden_sizes"] = [int(h) for h in args.hidden.split(",")]
        except ValueError:
            raise CLIError(f"--hidden must be comma-separated integers such as 64,64; got {args.hidden!r}") from None
        if any(h < 1 for h in opts["hidden_sizes"]):
            raise CLIError(f"--hidden widths must be positive; got {args.hidden!r}")
    if getattr(args, "layers", None) is not None:
        if args.layers < 1:
            raise CLIError(f"--layers must be at least 1; got {args.layers}")
        flow = getattr(args, "flow", "straf")
        if flow not in LAYER_OPTION:
            raise CLIError(f"--layers does not apply to the {flow} flow (a single continuous-time map)")
        opts[LAYER_OPTION[flow]] = args.layers
    return opts


def _positive(name: str, value: int | float) -> None:
    if value is not None and value <= 0:
        raise CLIError(f"{name} must be positive; got {value}")


def _build_guide(model, args, observed=None):
    from .guide import StructuredGuide

    try:
        return StructuredGuide(model, flow=args.flow, structure=args.structure, observed=observed, **_flow_options(args))
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"compiling a guide for the model failed: {_one_line(e)}") from None


def _fit(guide, args) -> Any:
    fit_kwargs: dict[str, Any] = {"num_steps": args.steps, "progress": not args.no_progress}
    if getattr(args, "objective", None):
        fit_kwargs["objective"] = args.objective
    if getattr(args, "lr", None) is not None:
        fit_kwargs["lr"] = args.lr
    if getattr(args, "batch_size", None) is not None:
        fit_kwargs["batch_size"] = args.batch_size
    return guide.fit(**fit_kwargs)


def _loss_history(guide, fit_result) -> list[float]:
    """The training loss per step, wherever the guide keeps it."""
    for candidate in (fit_result, getattr(guide, "history", None), getattr(guide, "losses", None)):
        if candidate is None:
            continue
        if isinstance(candidate, dict) and "loss" in candidate:
            candidate = candidate["loss"]
        elif hasattr(candidate, "losses"):
            candidate = candidate.losses
        elif hasattr(candidate, "loss") and not callable(candidate.loss):
            candidate = candidate.loss
        try:
            return [float(v) for v in candidate]
        except (TypeError, ValueError):
            continue
    return []


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _tensor_dict_to_lists(d: dict) -> dict:
    return {k: v.detach().to("cpu").tolist() for k, v in d.items()}


# ---------------------------------------------------------------------------- demo
def _add_flow_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--flow", choices=sorted(FLOW_CLASSES), default="straf", help="flow family (default: straf)")
    p.add_argument("--structure", choices=STRUCTURES, default="faithful", help="inverse structure (default: faithful)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--hidden", default=None, help="hidden widths of each masked network, e.g. 64,64")
    p.add_argument("--layers", type=int, default=None, help="number of flow layers")
    p.add_argument("--objective", choices=OBJECTIVES, default=None, help="training objective (default: the guide's, skl)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="simulations per step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo(p):
    _add_flow_arguments(p, DEMO_STEPS)
    p.add_argument("--out", default="pyro_struct_demo", help="report folder (default: ./pyro_struct_demo)")
    p.add_argument("--samples", type=int, default=4000, help="posterior samples per summary (default: 4000)")
    p.add_argument("--kl-samples", type=int, default=256, help="simulations for the symmetrised-KL estimate (default: 256)")


def _plot_loss(history: list[float], path: Path) -> None:
    from .inspect import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps = list(range(1, len(history) + 1))
        ax.plot(steps, history, color="#9ecae1", linewidth=0.6, label="per step")
        window = max(1, len(history) // 50)
        if window > 1:
            smooth = [sum(history[max(0, i - window + 1): i + 1]) / len(history[max(0, i - window + 1): i + 1]) for i in range(len(history))]
            ax.plot(steps, smooth, color="#08519c", linewidth=1.4, label=f"mean of {window}")
        ax.legend(fontsize=8)
        # the loss falls by orders of magnitude and an unbiased estimate can dip below zero
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats, symlog)")
    ax.set_title("training loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_marginals(panels: list[tuple[str, dict, dict | None]], path: Path) -> None:
    """One row per observation: histograms of every scalar latent (true value as a red line)."""
    import torch

    from .inspect import _pyplot

    plt = _pyplot()
    labels = [label for n, v in panels[0][1].items() for label in _coordinate_labels(n, tuple(v.shape[1:]))][:12]
    fig, axes = plt.subplots(len(panels), len(labels), figsize=(2.1 * len(labels), 2.0 * len(panels)), squeeze=False)
    for r, (title, samples, truth) in enumerate(panels):
        flat = torch.cat([v.detach().reshape(v.shape[0], -1) for v in samples.values()], -1).cpu()
        true_flat = None
        if truth is not None:
            true_flat = torch.cat([torch.as_tensor(truth[n]).reshape(-1) for n in samples]).cpu()
        for k, label in enumerate(labels):
            ax = axes[r][k]
            ax.hist(flat[:, k].numpy(), bins=40, color="#6baed6", density=True)
            if true_flat is not None:
                ax.axvline(float(true_flat[k]), color="#d62728", linewidth=1.2)
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
            ax.set_title(label if r == 0 else "", fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_demo(args) -> int:
    import torch

    from .models.circuit import CIRCUIT_OBSERVATION, arithmetic_circuit

    _positive("--steps", args.steps)
    _positive("--samples", args.samples)
    _positive("--kl-samples", args.kl_samples)
    if args.flow == "straf":
        # two affine StrAF layers reach a symmetrised KL near 1 nat in 2000 steps (about a
        # minute of CPU); the library's one layer suits longer runs
        args.layers = DEMO_LAYERS if args.layers is None else args.layers
    out = Path(args.out)
    _seed(args.seed)
    model = arithmetic_circuit()
    print("pyro-struct demo: the arithmetic circuit of Weilbach et al. (2020)")
    print("  z0 ~ Laplace(5, 1), z1 ~ Laplace(-2, 1), z2 ~ N(tanh(z0 + z1 - 2.8), 0.1), z3 ~ N(z0 z1, 0.1),")
    print("  z4 ~ N(7, 2), z5 ~ N(tanh(z3 + z4), 0.1), x0 ~ N(z3, 0.1), x1 ~ N(z5, 0.1)\n")
    guide = _build_guide(model, args, observed=list(CIRCUIT_OBSERVATION))
    structure = guide.structure
    print(structure.summary())
    print(f"\nTraining a {args.flow} guide ({args.structure} inverse) for {args.steps} steps ...", flush=True)
    start = time.perf_counter()
    result = _fit(guide, args)
    seconds = time.perf_counter() - start
    history = _loss_history(guide, result)
    print(f"trained in {seconds:.1f} s")

    skl, skl_se = symmetrized_kl_estimate(guide, args.kl_samples)
    print(f"\nexpected symmetrised KL (nats, {args.kl_samples} simulations): {skl:.3f} +- {skl_se:.3f}")

    obs = {k: torch.tensor(v, dtype=torch.get_default_dtype()) for k, v in CIRCUIT_OBSERVATION.items()}
    samples = guide.posterior(obs).sample(args.samples)
    rows = posterior_summary(samples)
    obs_text = ", ".join(f"{k}={v}" for k, v in CIRCUIT_OBSERVATION.items())
    print(f"\nposterior for {obs_text} ({args.samples} samples):")
    print(format_summary(rows))
    for note in prior_predictive_check(guide, obs):
        print(f"note: {note}")

    simulation = guide.simulator().simulate(1)
    fresh_obs = {n: simulation[n][0].detach() for n in guide.observed_sites}
    fresh_true = {n: simulation[n][0].detach() for n in guide.latent_sites}
    fresh_samples = guide.posterior(fresh_obs).sample(args.samples)
    fresh_rows = posterior_summary(fresh_samples, truth=fresh_true)
    fresh_text = ", ".join(f"{k}={float(v):.3f}" for k, v in fresh_obs.items())
    print(f"\nposterior for a fresh simulation {fresh_text}, next to its true latents:")
    print(format_summary(fresh_rows))

    out.mkdir(parents=True, exist_ok=True)
    files = {kind: str(p) for kind, p in structure.save_plots(out).items()}
    _plot_loss(history, out / "loss.png")
    files["loss"] = str(out / "loss.png")
    _plot_marginals(
        [(obs_text, samples, None), ("fresh simulation", fresh_samples, fresh_true)], out / "posterior.png"
    )
    files["posterior"] = str(out / "posterior.png")
    guide.save(out / "guide.pt")
    files["guide"] = str(out / "guide.pt")
    files["summary"] = str(out / "summary.json")
    summary = {
        "model": "arithmetic_circuit",
        "flow": args.flow,
        "structure": args.structure,
        "steps": args.steps,
        "seed": args.seed,
        "train_seconds": seconds,
        "final_loss": history[-1] if history else None,
        "loss_history": history,
        "symmetrized_kl": {"estimate": skl, "standard_error": skl_se, "num_simulations": args.kl_samples},
        "num_effective_parameters": structure.num_effective_parameters,
        "num_dense_parameters": structure.num_dense_parameters,
        "posterior": {"observation": CIRCUIT_OBSERVATION, "summary": rows},
        "fresh": {
            "observation": _tensor_dict_to_lists(fresh_obs),
            "true_latents": _tensor_dict_to_lists(fresh_true),
            "summary": fresh_rows,
        },
        "files": files,
    }
    _write_json(out / "summary.json", summary)
    print(f"\nreport written to {out}/: " + ", ".join(sorted(Path(p).name for p in files.values())))
    return 0


# ---------------------------------------------------------------------------- inspect
def _add_inspect(p):
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model (or a factory returning one)")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--observed", default=None, help="comma-separated observed site names (default: sites with obs=)")
    p.add_argument("--structure", choices=STRUCTURES, default="faithful", help="inverse structure (default: faithful)")
    p.add_argument("--mode", choices=("auto", "top", "bottom"), default="auto", help="inversion frontier (default: auto)")
    p.add_argument("--granularity", choices=("element", "site"), default="element", help="tracing granularity")
    p.add_argument("--flow", choices=sorted(FLOW_CLASSES) + ["none"], default="straf",
                   help="flow compiled to show masks and parameter counts (default: straf; none to skip)")
    p.add_argument("--hidden", default=None, help="hidden widths of each masked network, e.g. 64,64")
    p.add_argument("--layers", type=int, default=None, help="number of flow layers")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, help="folder for the plots and JSON (default: ./FUNCTION_structure)")
    p.add_argument("--no-plots", action="store_true", help="write only the JSON")


def _run_inspect(args) -> int:
    kwargs = _parse_json_arg(args.kwargs, "--kwargs")
    flow_options = _flow_options(args)
    model, name = load_model(args.model, kwargs)
    _seed(args.seed)
    from . import flows as flow_module
    from .inspect import CompiledStructure
    from .inversion import inverse_structure
    from .trace import trace_model

    observed = _observed_list(args.observed)
    try:
        bn = trace_model(model, observed=observed, granularity=args.granularity)
    except Exception as e:
        raise CLIError(f"tracing '{name}' failed: {_one_line(e)}") from None
    if not bn.observed_sites:
        print(f"note: '{name}' observes no site when called without arguments; name the observed sites with --observed")
    inverse = inverse_structure(bn, kind=args.structure, seed=args.seed, mode=args.mode)
    flow = None
    if args.flow != "none":
        cls = getattr(flow_module, FLOW_CLASSES[args.flow])
        A = inverse.adjacency()
        flow = cls(A, context_dim=A.shape[1] - A.shape[0], **flow_options)
    structure = CompiledStructure(bn, inverse, flow)
    print(f"model {name} from {args.model.rpartition(':')[0]}")
    print(structure.summary())
    out = Path(args.out) if args.out else Path(f"{name}_structure")
    if args.no_plots:
        written = {"json": out / "structure.json"}
        structure.to_json(written["json"])
    else:
        written = structure.save_plots(out)
    print(f"\nwritten: {', '.join(str(p) for p in written.values())}")
    return 0


# ---------------------------------------------------------------------------- fit
def _add_fit(p):
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model (or a factory returning one)")
    p.add_argument("--out", required=True, help="where to save the trained guide (e.g. guide.pt)")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--observed", default=None, help="comma-separated observed site names (default: sites with obs=)")
    _add_flow_arguments(p, 2000)


def _run_fit(args) -> int:
    _positive("--steps", args.steps)
    _positive("--lr", args.lr)
    _positive("--batch-size", args.batch_size)
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise CLIError(f"--out '{out}' is a folder; give a file name such as {out / 'guide.pt'}")
    kwargs = _parse_json_arg(args.kwargs, "--kwargs")
    observed = _observed_list(args.observed)
    _flow_options(args)  # validate before the (slow) model import
    model, name = load_model(args.model, kwargs)
    _seed(args.seed)
    guide = _build_guide(model, args, observed=observed)
    if not guide.observed_sites:
        raise CLIError(
            f"'{name}' observes no site when called without arguments, so there is nothing to condition on; "
            "name the observed sites with --observed"
        )
    print(guide.structure.summary())
    start = time.perf_counter()
    history = _loss_history(guide, _fit(guide, args))
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    guide.save(out)
    tail = history[-max(1, len(history) // 10):]
    final = f", final loss {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)" if history else ""
    print(f"trained '{name}' for {args.steps} steps in {seconds:.1f} s{final}; guide saved to {out}")
    return 0


# ---------------------------------------------------------------------------- posterior
def _add_posterior(p):
    p.add_argument("guide", metavar="GUIDE.pt", help="a guide saved by 'pyro-struct fit' or guide.save()")
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model the guide was trained for")
    p.add_argument("--obs", required=True, help="JSON file mapping observed site names to numbers or lists")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--samples", type=int, default=1000, help="posterior samples (default: 1000)")
    p.add_argument("--level", type=float, default=0.9, help="probability of the central interval (default: 0.9)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, help="write the summary and the samples to this JSON file")


def _run_posterior(args) -> int:
    import torch

    from .guide import StructuredGuide

    _positive("--samples", args.samples)
    if not 0 < args.level < 1:
        raise CLIError(f"--level must be between 0 and 1; got {args.level}")
    guide_path = Path(args.guide)
    if not guide_path.is_file():
        raise CLIError(f"cannot read guide '{guide_path}': no such file")
    obs = load_observations(args.obs)
    model, name = load_model(args.model, _parse_json_arg(args.kwargs, "--kwargs"))
    _seed(args.seed)
    try:
        guide = StructuredGuide.load(guide_path, model)
    except Exception as e:
        raise CLIError(f"loading guide '{guide_path}' failed: {_one_line(e)}") from None
    known = list(guide.bn.observed_sites)
    unknown = sorted(set(obs) - set(known))
    if unknown:
        raise CLIError(f"'{args.obs}' names {', '.join(unknown)}, which the guide does not observe; observed sites: {', '.join(known)}")
    missing = [n for n in known if n not in obs]
    if missing:
        raise CLIError(f"'{args.obs}' lacks the observed site(s) {', '.join(missing)}")
    try:
        post = guide.posterior(obs)
        samples = post.sample(args.samples)
    except Exception as e:
        raise CLIError(f"posterior for '{args.obs}' failed: {_one_line(e)}") from None
    batch_dims = {n: v.dim() - 1 - len(guide.bn.sites[n].shape) for n, v in samples.items()}
    if any(b > 0 for b in batch_dims.values()):
        # a batch of observations: summarise each one
        batch_shape = next(tuple(v.shape[1:1 + batch_dims[n]]) for n, v in samples.items())
        rows = []
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in batch_shape]).reshape(-1, len(batch_shape)).tolist():
            one = {n: v[(slice(None), *idx)] for n, v in samples.items()}
            rows.append({"index": idx, "summary": posterior_summary(one, level=args.level)})
            print(f"posterior of '{name}' for observation {idx} of '{args.obs}':")
            print(format_summary(rows[-1]["summary"], level=args.level))
        summary: Any = rows
    else:
        summary = posterior_summary(samples, level=args.level)
        print(f"posterior of '{name}' given '{args.obs}' ({args.samples} samples):")
        print(format_summary(summary, level=args.level))
    if args.out:
        _write_json(Path(args.out), {
            "model": args.model,
            "guide": str(guide_path),
            "observations": _tensor_dict_to_lists(obs),
            "level": args.level,
            "summary": summary,
            "samples": _tensor_dict_to_lists(samples),
        })
        print(f"written: {args.out}")
    return 0


def _add_bench(p):
    p.add_argument("name", nargs="?", help="benchmark name (omit to list them)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see: bench NAME --help)")


def _benchmarks_entry():
    """The ``benchmarks`` package's ``main``: the benchmarks live in the source checkout, not
    in the installed package, so look in the current folder and beside this package."""
    candidates = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            from benchmarks.__main__ import main as bench_main

            return bench_main
    raise CLIError(
        "the benchmarks are part of the source checkout, not of the installed package: run "
        "'pyro-struct bench' from the repository root (no benchmarks/ folder in "
        f"{' or '.join(str(c) for c in candidates)})"
    )


def _run_bench(args) -> int:
    bench_main = _benchmarks_entry()
    argv = ([args.name] if args.name else []) + list(args.options)
    return bench_main(argv)


# ---------------------------------------------------------------------------- check
def _add_check(p):
    p.add_argument("guide", metavar="GUIDE.pt", help="a guide saved by 'pyro-struct fit' or guide.save()")
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model the guide was trained for")
    p.add_argument("--obs", default=None, help="JSON file of observations: also report their Pareto-k, ESS and prior-predictive range")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--out", default="pyro_struct_check", help="report folder (default: ./pyro_struct_check)")
    p.add_argument("--simulations", type=int, default=200, help="simulated data sets for calibration (default: 200)")
    p.add_argument("--samples", type=int, default=100, help="posterior draws per simulated data set (default: 100)")
    p.add_argument("--importance-samples", type=int, default=1000, help="importance draws per observation (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _run_check(args) -> int:
    from .diagnostics import calibration, importance
    from .guide import StructuredGuide

    if args.simulations < 10:
        raise CLIError(f"--simulations must be at least 10 for a rank test (100 or more is better); got {args.simulations}")
    _positive("--samples", args.samples)
    _positive("--importance-samples", args.importance_samples)
    guide_path, out = Path(args.guide), Path(args.out)
    if not guide_path.is_file():
        raise CLIError(f"cannot read guide '{guide_path}': no such file")
    obs = load_observations(args.obs) if args.obs else None
    model, name = load_model(args.model, _parse_json_arg(args.kwargs, "--kwargs"))
    _seed(args.seed)
    try:
        guide = StructuredGuide.load(guide_path, model)
    except Exception as e:
        raise CLIError(f"loading guide '{guide_path}' failed: {_one_line(e)}") from None
    out.mkdir(parents=True, exist_ok=True)
    result = calibration(guide, num_simulations=args.simulations, num_samples=args.samples)
    print(result.summary())
    report: dict[str, Any] = {"model": args.model, "guide": str(guide_path), "calibration": result.to_dict()}
    result.plot(out / "calibration.png")
    print(f"written: {out / 'calibration.png'}")
    if obs is not None:
        try:
            post = guide.posterior(obs)
        except Exception as e:
            raise CLIError(f"posterior for '{args.obs}' failed: {_one_line(e)}") from None
        notes = prior_predictive_check(guide, obs)
        for note in notes:
            print(f"note: {note}")
        weights = importance(post, args.importance_samples)
        print(f"importance sampling of '{name}' for '{args.obs}' ({args.importance_samples} draws):")
        print(weights.summary())
        report["observations"] = _tensor_dict_to_lists(obs)
        report["prior_predictive"] = [str(n) for n in notes]
        report["importance"] = {
            "pareto_k": weights.pareto_k.tolist(), "ess": weights.ess.tolist(),
            "log_evidence": weights.log_evidence.tolist(), "num_samples": args.importance_samples,
        }
    _write_json(out / "check.json", report)
    print(f"written: {out / 'check.json'}")
    return 0


#: The subcommands, in the order ``--help`` lists them. Append to add one.
COMMANDS: list[Command] = [
    Command("demo", "train a guide for the arithmetic circuit and write a report", _add_demo, _run_demo),
    Command("inspect", "trace and invert a model; print the structure and write plots", _add_inspect, _run_inspect),
    Command("fit", "train a guide for a model and save it", _add_fit, _run_fit),
    Command("posterior", "posterior of observations under a saved guide", _add_posterior, _run_posterior),
    Command("check", "calibration of a saved guide and, given observations, their Pareto-k and ESS", _add_check, _run_check),
    Command("bench", "run a benchmark of benchmarks/ and save its table (python -m benchmarks NAME)", _add_bench, _run_bench),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-struct`` argument parser with one subparser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = _Parser(prog=PROG, description="Structure-aware amortised inference for Pyro models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: $OMP_NUM_THREADS, else 1: small models train fastest on one)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _configure_threads(threads: int | None) -> None:
    """Set torch's CPU threads: ``threads`` if given, else ``$OMP_NUM_THREADS``, else 1
    (when torch is already imported by the caller, only an explicit ``threads`` changes it).

    The networks here are small; several threads per op mostly wait on each other, and on a
    busy machine they can make training an order of magnitude slower.
    """
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be at least 1; got {threads}", exit_code=2)
    if "torch" in sys.modules:
        # called from a program that already uses torch: leave its setting unless asked
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
        return
    if threads is not None or "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads or 1)  # read when torch is first imported


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    stream = sys.stderr if file is None else file
    with contextlib.suppress(OSError, ValueError):
        stream.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success).

    Errors are reported as one line ``pyro-struct: error: ...`` on stderr: usage errors exit
    with 2, every other failure with 1, an interrupt with 130.
    """
    parser = build_parser()
    old_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        args = parser.parse_args(argv)
        _configure_threads(args.threads)
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
