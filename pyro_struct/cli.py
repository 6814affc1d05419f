"""The ``pyro-struct`` command line: demo, inspect, fit, posterior, check and bench (parsing and printing only).

Usage::

    pyro-struct [--threads N] COMMAND ...
    pyro-struct demo [--flow straf] [--structure faithful] [--steps N] [--seed S] [--out FOLDER]
    pyro-struct inspect FILE.py:FUNCTION [--observed a,b] [--structure faithful] [--flow straf|none] [--out FOLDER]
    pyro-struct fit FILE.py:FUNCTION --observed x --out guide.pt [--flow straf] [--steps N] [--time-budget S]
                    [--checkpoint FILE [--resume]]
    pyro-struct posterior guide.pt FILE.py:FUNCTION --obs obs.json [--samples N] [--out post.json]
    pyro-struct bench NAME [options]     (from a source checkout: same as ``python -m benchmarks NAME``)

``FUNCTION`` is a Pyro model, or a factory that returns one when called (with ``--kwargs``).
Every failure ends with one line ``pyro-struct: error: ...`` on stderr: exit status 2 for usage
errors (bad arguments), 1 for failures, 130 for an interrupt. Subcommands register in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "load_model", "load_observations", "format_summary", "COMMANDS", "Command", "CLIError"]

PROG = "pyro-struct"
#: training steps and StrAF layers of ``pyro-struct demo`` (the arithmetic circuit: about a minute of CPU)
DEMO_STEPS = 2000
DEMO_LAYERS = 2
# Python spellings in library messages -> the flags that set the same thing here
_FLAG_ADVICE = {"objective='fkl'": "--objective fkl", "a smaller lr": "a smaller --lr", "a tighter clip_grad": "a smaller --clip-grad"}


class CLIError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` is the process exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(message: str) -> CLIError:
    """A :class:`CLIError` for a bad argument (exit status 2)."""
    return CLIError(message, exit_code=2)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (raised, reported by :func:`main`)."""

    def error(self, message):
        raise usage_error(f"{message} (see '{self.prog} --help')")


@dataclass
class Command:
    """One subcommand: its name, help line, argument builder and runner (returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    for python, flag in _FLAG_ADVICE.items():
        text = text.replace(python, flag)
    return text if isinstance(e, CLIError) or type(e).__name__ in text else f"{type(e).__name__}: {text}"


@contextlib.contextmanager
def _user_code(what: str):
    """Run user code (a model): any exception, ``sys.exit`` included, becomes one CLI error line."""
    try:
        yield
    except CLIError:
        raise
    except SystemExit as e:
        raise CLIError(f"{what}: the model called sys.exit({e.code!r})") from None
    except Exception as e:
        raise CLIError(f"{what}: {_one_line(e)}") from None


# ---------------------------------------------------------------------------- loading
def _parse_json_arg(text: str | None, what: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise usage_error(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise usage_error(f"{what} must be a JSON object such as '{{\"T\": 5}}'; got {type(value).__name__}")
    return value


def _import_file(path: Path):
    """Import a Python file as a fresh module (its folder is importable while it loads)."""
    spec = importlib.util.spec_from_file_location(f"_pyro_struct_user_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import '{path}': not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        with _user_code(f"importing '{path}' failed"):
            spec.loader.exec_module(module)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def load_model(ref: str, kwargs: dict | None = None) -> tuple[Callable, str]:
    """Load a Pyro model from ``"FILE.py:FUNCTION"`` (a model, or a factory called once with ``kwargs``
    that samples nothing and returns the model).

    Returns:
        ``(model, name)``.

    Raises:
        CLIError: malformed reference, unreadable file, missing function, failing call.
    """
    import pyro

    kwargs = dict(kwargs or {})
    file, sep, func = ref.rpartition(":")
    if not sep or not file or not func:
        raise usage_error(f"model reference {ref!r} must look like FILE.py:FUNCTION")
    path = Path(file)
    if not path.is_file():
        raise CLIError(f"cannot read model file '{file}': no such file")
    obj = module = _import_file(path)
    for part in func.split("."):
        if not hasattr(obj, part):
            callables = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise CLIError(f"'{file}' has no function {func!r}; it defines: {', '.join(callables) or 'nothing callable'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"'{file}:{func}' is a {type(obj).__name__}, not a function")
    obj = getattr(obj, "model", obj) if type(obj).__name__ == "AmortizedModel" else obj
    with _user_code(f"calling '{func}' failed"):
        trace = pyro.poutine.trace(obj).get_trace(**kwargs)
    num_sites = sum(1 for s in trace.nodes.values() if s["type"] == "sample")
    returned = trace.nodes["_RETURN"]["value"]
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read observations '{path}': {_one_line(e)}") from None
    if not isinstance(data, dict) or not data:
        raise CLIError(f"observations '{path}' must be a JSON object mapping site names to numbers or lists")
    try:
        return {name: torch.as_tensor(v, dtype=torch.get_default_dtype()) for name, v in data.items()}
    except (TypeError, ValueError, RuntimeError):
        raise CLIError(f"observations in '{path}' must be numbers or (nested) lists of numbers") from None


# ---------------------------------------------------------------------------- printing
def format_summary(rows: list[dict], level: float = 0.9, max_rows: int = 40) -> str:
    """The rows of :meth:`pyro_struct.Posterior.summary` as an aligned text table."""
    has_truth = any("true" in r for r in rows)
    width = max([len("latent")] + [len(r["name"]) for r in rows])
    head = f"{'latent':<{width}} {'mean':>9} {'sd':>8} {f'{100 * level:g}% interval':>22}" + (f" {'true':>9}  inside" if has_truth else "")
    lines = [head]
    for r in rows[:max_rows]:
        line = f"{r['name']:<{width}} {r['mean']:9.3f} {r['sd']:8.3f} {f'[{r['lower']:8.3f}, {r['upper']:8.3f}]':>22}"
        if "true" in r:
            line += f" {r['true']:9.3f}  {'yes' if r['inside'] else 'no'}"
        lines.append(line)
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more coordinates (all of them in the JSON output)")
    return "\n".join(lines)


def _write_json(path: Path, data) -> None:
    from .io import atomic_write_text

    atomic_write_text(json.dumps(data, indent=1), path)


def _lists(d: dict) -> dict:
    return {k: v.detach().to("cpu").tolist() for k, v in d.items()}


# ---------------------------------------------------------------------------- shared pieces
def _observed_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise usage_error("--observed needs at least one site name, e.g. --observed x0,x1")
    return names


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise usage_error(f"{name} must be positive; got {value}")


def _flow_options(args) -> dict:
    opts = {}
    if getattr(args, "hidden", None):
        try:
            opts["hidden_sizes"] = [int(h) for h in args.hidden.split(",")]
        except ValueError:
            raise usage_error(f"--hidden must be comma-separated integers such as 64,64; got {args.hidden!r}") from None
        if any(h < 1 for h in opts["hidden_sizes"]):
            raise usage_error(f"--hidden widths must be positive; got {args.hidden!r}")
    if getattr(args, "layers", None) is not None:
        _positive("--layers", args.layers)
        opts["num_layers"] = args.layers
    return opts


def _build_guide(model, args, observed=None):
    from .guide import StructuredGuide

    with _user_code("compiling a guide for the model failed"):
        return StructuredGuide(model, flow=args.flow, structure=args.structure, observed=observed, **_flow_options(args))


def _fit(guide, args, **extra):
    options = {"num_steps": args.steps, "progress": not args.no_progress, **extra}
    for key in ("objective", "lr", "batch_size", "time_budget", "clip_grad"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    with _user_code("training failed"):
        return guide.fit(**options)


def _add_flow_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    from .compile import FLOWS, STRUCTURES
    from .objectives import OBJECTIVES

    p.add_argument("--flow", choices=sorted(FLOWS), default="straf", help="flow family (default: straf)")
    p.add_argument("--structure", choices=STRUCTURES, default="faithful", help="inverse structure (default: faithful)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--hidden", default=None, help="hidden widths of each masked network, e.g. 64,64")
    p.add_argument("--layers", type=int, default=None, help="number of flow layers (StrAF, GRF)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default=None, help="training objective (default: skl)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="simulations per step")
    p.add_argument("--clip-grad", type=float, default=None, help="maximum gradient norm (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_training_args(args) -> None:
    for flag in ("steps", "lr", "batch_size", "time_budget", "clip_grad"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag, None))
    _flow_options(args)


def _seed(seed: int) -> None:
    import pyro

    pyro.set_rng_seed(seed)


# ---------------------------------------------------------------------------- demo
def _add_demo(p):
    _add_flow_arguments(p, DEMO_STEPS)
    p.add_argument("--out", default="pyro_struct_demo", help="report folder (default: ./pyro_struct_demo)")
    p.add_argument("--samples", type=int, default=4000, help="posterior samples per summary (default: 4000)")
    p.add_argument("--kl-samples", type=int, default=256, help="simulations for the symmetrised-KL estimate (default: 256)")


def _run_demo(args) -> int:
    from .diagnostics import prior_predictive_check, symmetrized_kl_estimate
    from .inspect import plot_loss, plot_marginals
    from .models.circuit import CIRCUIT_OBSERVATION, arithmetic_circuit

    _check_training_args(args)
    _positive("--samples", args.samples)
    _positive("--kl-samples", args.kl_samples)
    if args.flow == "straf" and args.layers is None:
        args.layers = DEMO_LAYERS  # two affine layers reach ~1 nat in 2000 steps (about a minute)
    out = Path(args.out)
    _seed(args.seed)
    print("pyro-struct demo: the arithmetic circuit of Weilbach et al. (2020)")
    print("  z0 ~ Laplace(5, 1), z1 ~ Laplace(-2, 1), z2 ~ N(tanh(z0 + z1 - 2.8), 0.1), z3 ~ N(z0 z1, 0.1),")
    print("  z4 ~ N(7, 2), z5 ~ N(tanh(z3 + z4), 0.1), x0 ~ N(z3, 0.1), x1 ~ N(z5, 0.1)\n")
    guide = _build_guide(arithmetic_circuit(), args, observed=list(CIRCUIT_OBSERVATION))
    print(guide.structure.summary())
    print(f"\nTraining a {args.flow} guide ({args.structure} inverse) for {args.steps} steps ...", flush=True)
    start = time.perf_counter()
    history = list(_fit(guide, args))
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s")
    skl, skl_se = symmetrized_kl_estimate(guide, args.kl_samples)
    print(f"\nexpected symmetrised KL (nats, {args.kl_samples} simulations): {skl:.3f} +- {skl_se:.3f}")
    obs = {k: float(v) for k, v in CIRCUIT_OBSERVATION.items()}
    post = guide.posterior(obs)
    rows, samples = post.summary(num_samples=args.samples), post.sample(args.samples)
    print(f"\nposterior for {', '.join(f'{k}={v}' for k, v in obs.items())} ({args.samples} samples):")
    print(format_summary(rows))
    for note in prior_predictive_check(guide, post.observations):
        print(f"note: {note}")
    simulation = guide.simulator().simulate(1)
    fresh_obs = {n: simulation[n][0] for n in guide.observed_sites}
    fresh_true = {n: simulation[n][0] for n in guide.latent_sites}
    fresh = guide.posterior(fresh_obs)
    fresh_rows = fresh.summary(num_samples=args.samples, truth=fresh_true)
    print(f"\nposterior for a fresh simulation {', '.join(f'{k}={float(v):.3f}' for k, v in fresh_obs.items())}, next to its true latents:")
    print(format_summary(fresh_rows))
    files = {kind: str(p) for kind, p in guide.structure.save_plots(out).items()}
    files["loss"], files["posterior"] = str(plot_loss(history, out / "loss.png")), str(out / "posterior.png")
    plot_marginals([(", ".join(f"{k}={v}" for k, v in obs.items()), samples, None),
                    ("fresh simulation", fresh.sample(args.samples), fresh_true)], out / "posterior.png")
    guide.save(out / "guide.pt")
    files["guide"], files["summary"] = str(out / "guide.pt"), str(out / "summary.json")
    structure = guide.structure
    _write_json(out / "summary.json", {
        "model": "arithmetic_circuit", "flow": args.flow, "structure": args.structure, "steps": args.steps,
        "seed": args.seed, "train_seconds": seconds, "final_loss": history[-1] if history else None,
        "loss_history": history,
        "symmetrized_kl": {"estimate": skl, "standard_error": skl_se, "num_simulations": args.kl_samples},
        "num_effective_parameters": structure.num_effective_parameters, "num_dense_parameters": structure.num_dense_parameters,
        "posterior": {"observation": obs, "summary": rows},
        "fresh": {"observation": _lists(fresh_obs), "true_latents": _lists(fresh_true), "summary": fresh_rows},
        "files": files,
    })
    print(f"\nreport written to {out}/: " + ", ".join(sorted(Path(p).name for p in files.values())))
    return 0


# ---------------------------------------------------------------------------- inspect
def _add_inspect(p):
    from .compile import FLOWS, STRUCTURES

    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model (or a factory returning one)")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--observed", default=None, help="comma-separated observed site names (default: sites with obs=)")
    p.add_argument("--structure", choices=STRUCTURES, default="faithful", help="inverse structure (default: faithful)")
    p.add_argument("--mode", choices=("auto", "top", "bottom"), default="auto", help="inversion frontier (default: auto)")
    p.add_argument("--granularity", choices=("element", "site"), default="element", help="tracing granularity")
    p.add_argument("--flow", choices=sorted(FLOWS) + ["none"], default="straf",
                   help="flow compiled to show masks and parameter counts (default: straf; none to skip)")
    p.add_argument("--hidden", default=None, help="hidden widths of each masked network, e.g. 64,64")
    p.add_argument("--layers", type=int, default=None, help="number of flow layers")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, help="folder for the plots and JSON (default: ./FUNCTION_structure)")
    p.add_argument("--no-plots", action="store_true", help="write only the JSON")


def _run_inspect(args) -> int:
    from .compile import compile_model
    from .inspect import CompiledStructure

    kwargs = _parse_json_arg(args.kwargs, "--kwargs")
    options, observed = _flow_options(args), _observed_list(args.observed)
    model, name = load_model(args.model, kwargs)
    _seed(args.seed)
    with _user_code(f"tracing '{name}' failed"):
        compiled = compile_model(model, flow=None if args.flow == "none" else args.flow, structure=args.structure,
                                 observed=[] if observed is None and _observes_nothing(model) else observed,
                                 structure_seed=args.seed, inversion_mode=args.mode, granularity=args.granularity, **options)
    if not compiled.bn.observed_sites:
        print(f"note: '{name}' observes no site when called without arguments; name the observed sites with --observed")
    structure = CompiledStructure(compiled.bn, compiled.inverse, compiled.flow)
    print(f"model {name} from {args.model.rpartition(':')[0]}")
    print(structure.summary())
    out = Path(args.out) if args.out else Path(f"{name}_structure")
    written = {"json": out / "structure.json"} if args.no_plots else structure.save_plots(out)
    if args.no_plots:
        structure.to_json(written["json"])
    print(f"\nwritten: {', '.join(str(p) for p in written.values())}")
    return 0


def _observes_nothing(model) -> bool:
    """Inspecting structure needs no observations: a model that observes nothing is shown as it is."""
    import pyro

    with pyro.poutine.block(), contextlib.suppress(Exception):
        trace = pyro.poutine.trace(model).get_trace()
        return not any(s["type"] == "sample" and s["is_observed"] for s in trace.nodes.values())
    return False


# ---------------------------------------------------------------------------- fit
def _add_fit(p):
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model (or a factory returning one)")
    p.add_argument("--out", required=True, help="where to save the trained guide (e.g. guide.pt)")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--observed", default=None, help="comma-separated observed site names (default: sites with obs=)")
    p.add_argument("--checkpoint", default=None, help="write a training checkpoint here every 100 steps (Ctrl-C keeps it)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    _add_flow_arguments(p, 2000)


def _check_writable(out: Path) -> None:
    """Fail before training, not after, when ``--out`` cannot be written."""
    if out.exists() and out.is_dir():
        raise usage_error(f"--out '{out}' is a folder; give a file name such as {out / 'guide.pt'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".pyro-struct-write-test-{os.getpid()}", "w"):
            pass
        os.unlink(out.parent / f".pyro-struct-write-test-{os.getpid()}")
    except OSError as e:
        raise CLIError(f"cannot write --out '{out}': {e.strerror or e}") from None


def _run_fit(args) -> int:
    _check_training_args(args)
    if args.resume and not args.checkpoint:
        raise usage_error("--resume needs --checkpoint FILE (the checkpoint to continue from)")
    out = Path(args.out)
    _check_writable(out)
    kwargs, observed = _parse_json_arg(args.kwargs, "--kwargs"), _observed_list(args.observed)
    model, name = load_model(args.model, kwargs)
    _seed(args.seed)
    guide = _build_guide(model, args, observed=observed)
    print(guide.structure.summary())
    start = time.perf_counter()
    checkpointing = {"checkpoint": args.checkpoint, "resume": args.resume} if args.checkpoint else {}
    history = list(_fit(guide, args, **checkpointing))
    seconds = time.perf_counter() - start
    guide.save(out)
    tail = history[-max(1, len(history) // 10):]
    final = f", final loss {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)" if history else ""
    print(f"trained '{name}' for {len(history)} steps in {seconds:.1f} s{final}; guide saved to {out}")
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


def _load_guide(args):
    """``(guide, model name)`` from the ``guide`` and ``model`` arguments of a command."""
    from .guide import StructuredGuide

    path = Path(args.guide)
    if not path.is_file():
        raise CLIError(f"cannot read guide '{path}': no such file")
    model, name = load_model(args.model, _parse_json_arg(args.kwargs, "--kwargs"))
    _seed(args.seed)
    with _user_code(f"loading guide '{path}' failed"):
        return StructuredGuide.load(path, model), name


def _run_posterior(args) -> int:
    import torch

    from .diagnostics import prior_predictive_check

    _positive("--samples", args.samples)
    if not 0 < args.level < 1:
        raise usage_error(f"--level must be between 0 and 1; got {args.level}")
    obs = load_observations(args.obs)
    guide, name = _load_guide(args)
    with _user_code(f"posterior for '{args.obs}' failed"):
        post = guide.posterior(obs)
        samples = post.sample(args.samples)
    from .guide import summarize_samples

    if post.batch_shape:
        summary: Any = []
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in post.batch_shape]).reshape(-1, len(post.batch_shape)).tolist():
            rows = summarize_samples({n: v[(slice(None), *idx)] for n, v in samples.items()}, level=args.level)
            summary.append({"index": idx, "summary": rows})
            print(f"posterior of '{name}' for observation {idx} of '{args.obs}':\n{format_summary(rows, level=args.level)}")
    else:
        summary = summarize_samples(samples, level=args.level)
        print(f"posterior of '{name}' given '{args.obs}' ({args.samples} samples):\n{format_summary(summary, level=args.level)}")
    for note in prior_predictive_check(guide, post.observations):
        print(f"warning: {note}", file=sys.stderr)
    if args.out:
        _write_json(Path(args.out), {"model": args.model, "guide": args.guide, "observations": _lists(obs),
                                     "level": args.level, "summary": summary, "samples": _lists(samples)})
        print(f"written: {args.out}")
    return 0


# ---------------------------------------------------------------------------- bench
def _add_bench(p):
    p.add_argument("name", nargs="?", help="benchmark name (omit to list them)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see: bench NAME --help)")


def _run_bench(args) -> int:
    # the benchmarks live in the source checkout, not in the installed package
    candidates = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            from benchmarks.__main__ import main as bench_main

            return bench_main(([args.name] if args.name else []) + list(args.options))
    raise CLIError(
        "the benchmarks are part of the source checkout, not of the installed package: run 'pyro-struct bench' "
        f"from the repository root (no benchmarks/ folder in {' or '.join(str(c) for c in candidates)})"
    )


#: The subcommands, in the order ``--help`` lists them. Append to add one.
COMMANDS: list[Command] = [
    Command("demo", "train a guide for the arithmetic circuit and write a report", _add_demo, _run_demo),
    Command("inspect", "trace and invert a model; print the structure and write plots", _add_inspect, _run_inspect),
    Command("fit", "train a guide for a model and save it", _add_fit, _run_fit),
    Command("posterior", "posterior of observations under a saved guide", _add_posterior, _run_posterior),
    Command("bench", "run a benchmark of benchmarks/ and save its table (python -m benchmarks NAME)", _add_bench, _run_bench),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-struct`` argument parser with one subparser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = _Parser(prog=PROG, description="Structure-aware amortised inference for Pyro models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: $PYRO_STRUCT_THREADS, else 1: small models train fastest on one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _configure_threads(threads: int | None) -> None:
    """Training and sampling use :func:`pyro_struct.threads.torch_threads`; ``--threads`` sets its default."""
    if threads is not None:
        if threads < 1:
            raise usage_error(f"--threads must be at least 1; got {threads}")
        os.environ["PYRO_STRUCT_THREADS"] = str(threads)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    with contextlib.suppress(OSError, ValueError):
        (sys.stderr if file is None else file).write(f"{PROG}: warning: {' '.join(str(message).split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 usage error, 1 failure, 130 interrupt)."""
    old_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help and --version
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        _configure_threads(args.threads)
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (Exception, SystemExit) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
