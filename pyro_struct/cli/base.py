"""What every ``pyro-struct`` command shares: errors, loading models and observations, flow options, printing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "PROG", "CLIError", "usage_error", "Parser", "Command", "one_line", "user_code", "load_model", "load_observations",
    "format_summary", "write_json", "lists", "observed_list", "positive", "flow_options", "build_guide", "fit",
    "add_flow_arguments", "check_training_args", "seed", "load_guide", "parse_json_arg",
]

PROG = "pyro-struct"
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


class Parser(argparse.ArgumentParser):
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


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    for python, flag in _FLAG_ADVICE.items():
        text = text.replace(python, flag)
    return text if isinstance(e, CLIError) or type(e).__name__ in text else f"{type(e).__name__}: {text}"


@contextlib.contextmanager
def user_code(what: str):
    """Run user code (a model): any exception, ``sys.exit`` included, becomes one CLI error line."""
    try:
        yield
    except CLIError:
        raise
    except SystemExit as e:
        raise CLIError(f"{what}: the model called sys.exit({e.code!r})") from None
    except Exception as e:
        raise CLIError(f"{what}: {one_line(e)}") from None


# ---------------------------------------------------------------------------- loading
def parse_json_arg(text: str | None, what: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise usage_error(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise usage_error(f"{what} must be a JSON object such as '{{\"T\": 5}}'; got {type(value).__name__}")
    return value


def import_file(path: Path):
    """Import a Python file as a fresh module (its folder is importable while it loads)."""
    spec = importlib.util.spec_from_file_location(f"_pyro_struct_user_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import '{path}': not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        with user_code(f"importing '{path}' failed"):
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
    obj = module = import_file(path)
    for part in func.split("."):
        if not hasattr(obj, part):
            callables = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise CLIError(f"'{file}' has no function {func!r}; it defines: {', '.join(callables) or 'nothing callable'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"'{file}:{func}' is a {type(obj).__name__}, not a function")
    obj = getattr(obj, "model", obj) if type(obj).__name__ == "AmortizedModel" else obj
    with user_code(f"calling '{func}' failed"):
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
        raise CLIError(f"cannot read observations '{path}': {one_line(e)}") from None
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
        interval = f"[{r['lower']:8.3f}, {r['upper']:8.3f}]"
        line = f"{r['name']:<{width}} {r['mean']:9.3f} {r['sd']:8.3f} {interval:>22}"
        if "true" in r:
            line += f" {r['true']:9.3f}  {'yes' if r['inside'] else 'no'}"
        lines.append(line)
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more coordinates (all of them in the JSON output)")
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    from ..io import atomic_write_text

    atomic_write_text(json.dumps(data, indent=1), path)


def lists(d: dict) -> dict:
    return {k: v.detach().to("cpu").tolist() for k, v in d.items()}


# ---------------------------------------------------------------------------- shared pieces
def observed_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise usage_error("--observed needs at least one site name, e.g. --observed x0,x1")
    return names


def positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise usage_error(f"{name} must be positive; got {value}")


def flow_options(args) -> dict:
    opts = {}
    if getattr(args, "hidden", None):
        try:
            opts["hidden_sizes"] = [int(h) for h in args.hidden.split(",")]
        except ValueError:
            raise usage_error(f"--hidden must be comma-separated integers such as 64,64; got {args.hidden!r}") from None
        if any(h < 1 for h in opts["hidden_sizes"]):
            raise usage_error(f"--hidden widths must be positive; got {args.hidden!r}")
    if getattr(args, "layers", None) is not None:
        positive("--layers", args.layers)
        opts["num_layers"] = args.layers
    return opts


def build_guide(model, args, observed=None):
    from ..guide import StructuredGuide

    with user_code("compiling a guide for the model failed"):
        return StructuredGuide(model, flow=args.flow, structure=args.structure, observed=observed, **flow_options(args))


def fit(guide, args, **extra):
    options = {"num_steps": args.steps, "progress": not args.no_progress, **extra}
    for key in ("objective", "lr", "batch_size", "time_budget", "clip_grad"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    with user_code("training failed"):
        return guide.fit(**options)


def add_flow_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    from ..compile import FLOWS, STRUCTURES
    from ..objectives import OBJECTIVES

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


def check_training_args(args) -> None:
    for flag in ("steps", "lr", "batch_size", "time_budget", "clip_grad"):
        positive("--" + flag.replace("_", "-"), getattr(args, flag, None))
    flow_options(args)


def seed(seed: int) -> None:
    import pyro

    pyro.set_rng_seed(seed)


def load_guide(args):
    """``(guide, model name)`` from the ``guide`` and ``model`` arguments of a command."""
    from ..guide import StructuredGuide

    path = Path(args.guide)
    if not path.is_file():
        raise CLIError(f"cannot read guide '{path}': no such file")
    model, name = load_model(args.model, parse_json_arg(args.kwargs, "--kwargs"))
    seed(args.seed)
    with user_code(f"loading guide '{path}' failed"):
        return StructuredGuide.load(path, model), name
