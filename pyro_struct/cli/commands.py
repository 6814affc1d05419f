"""The ``pyro-struct`` subcommands: demo, inspect, fit, posterior, check and bench (each an ``add``/``run`` pair)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from .base import (
    CLIError, Command, add_flow_arguments, build_guide, check_training_args, fit, flow_options, format_summary,
    lists, load_guide, load_model, load_observations, observed_list, parse_json_arg, positive, seed, usage_error,
    user_code, write_json,
)

__all__ = ["COMMANDS", "DEMO_STEPS", "DEMO_LAYERS"]

#: training steps and StrAF layers of ``pyro-struct demo`` (the arithmetic circuit: about a minute of CPU)
DEMO_STEPS = 2000
DEMO_LAYERS = 2


# ---------------------------------------------------------------------------- demo
def _add_demo(p):
    add_flow_arguments(p, DEMO_STEPS)
    p.add_argument("--out", default="pyro_struct_demo", help="report folder (default: ./pyro_struct_demo)")
    p.add_argument("--samples", type=int, default=4000, help="posterior samples per summary (default: 4000)")
    p.add_argument("--kl-samples", type=int, default=256, help="simulations for the symmetrised-KL estimate (default: 256)")


def _run_demo(args) -> int:
    from ..diagnostics import prior_predictive_check, symmetrized_kl_estimate
    from ..inspect import plot_loss, plot_marginals
    from ..models.circuit import CIRCUIT_OBSERVATION, arithmetic_circuit

    check_training_args(args)
    positive("--samples", args.samples)
    positive("--kl-samples", args.kl_samples)
    if args.flow == "straf" and args.layers is None:
        args.layers = DEMO_LAYERS  # two affine layers reach ~1 nat in 2000 steps (about a minute)
    out = Path(args.out)
    seed(args.seed)
    print("pyro-struct demo: the arithmetic circuit of Weilbach et al. (2020)")
    print("  z0 ~ Laplace(5, 1), z1 ~ Laplace(-2, 1), z2 ~ N(tanh(z0 + z1 - 2.8), 0.1), z3 ~ N(z0 z1, 0.1),")
    print("  z4 ~ N(7, 2), z5 ~ N(tanh(z3 + z4), 0.1), x0 ~ N(z3, 0.1), x1 ~ N(z5, 0.1)\n")
    guide = build_guide(arithmetic_circuit(), args, observed=list(CIRCUIT_OBSERVATION))
    print(guide.structure.summary())
    print(f"\nTraining a {args.flow} guide ({args.structure} inverse) for {args.steps} steps ...", flush=True)
    start = time.perf_counter()
    history = list(fit(guide, args))
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
    write_json(out / "summary.json", {
        "model": "arithmetic_circuit", "flow": args.flow, "structure": args.structure, "steps": args.steps,
        "seed": args.seed, "train_seconds": seconds, "final_loss": history[-1] if history else None,
        "loss_history": history,
        "symmetrized_kl": {"estimate": skl, "standard_error": skl_se, "num_simulations": args.kl_samples},
        "num_effective_parameters": structure.num_effective_parameters, "num_dense_parameters": structure.num_dense_parameters,
        "posterior": {"observation": obs, "summary": rows},
        "fresh": {"observation": lists(fresh_obs), "true_latents": lists(fresh_true), "summary": fresh_rows},
        "files": files,
    })
    print(f"\nreport written to {out}/: " + ", ".join(sorted(Path(p).name for p in files.values())))
    return 0


# ---------------------------------------------------------------------------- inspect
def _add_inspect(p):
    from ..compile import FLOWS, STRUCTURES

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
    from ..compile import compile_model
    from ..inspect import CompiledStructure

    kwargs = parse_json_arg(args.kwargs, "--kwargs")
    options, observed = flow_options(args), observed_list(args.observed)
    model, name = load_model(args.model, kwargs)
    seed(args.seed)
    with user_code(f"tracing '{name}' failed"):
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
    add_flow_arguments(p, 2000)
    p.add_argument("--nproc", type=int, default=1, help="train data-parallel in N local processes (runs torchrun; default 1)")


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
    from ..training.distributed import is_main, launch

    if args.nproc != 1:  # re-run this command line in N processes under torchrun
        return launch(sys.argv[1:], args.nproc)
    check_training_args(args)
    if args.resume and not args.checkpoint:
        raise usage_error("--resume needs --checkpoint FILE (the checkpoint to continue from)")
    out = Path(args.out)
    _check_writable(out)
    kwargs, observed = parse_json_arg(args.kwargs, "--kwargs"), observed_list(args.observed)
    model, name = load_model(args.model, kwargs)
    seed(args.seed)
    guide = build_guide(model, args, observed=observed)
    print(guide.structure.summary())
    start = time.perf_counter()
    checkpointing = {"checkpoint": args.checkpoint, "resume": args.resume} if args.checkpoint else {}
    history = list(fit(guide, args, **checkpointing))
    seconds = time.perf_counter() - start
    if not is_main():
        return 0  # every rank holds the same parameters; rank 0 writes the file
    guide.save(out)
    tail = history[-max(1, len(history) // 10):]
    final = f", final loss {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)" if history else ""
    print(f"trained '{name}' for {len(history)} steps in {seconds:.1f} s{final}; guide saved to {out}")
    return 0


# ---------------------------------------------------------------------------- posterior
def _add_guide_arguments(p, obs_help: str, obs_required: bool) -> None:
    """The arguments of commands that read a saved guide: GUIDE.pt, FILE.py:FUNCTION, --obs, --kwargs, --seed."""
    p.add_argument("guide", metavar="GUIDE.pt", help="a guide saved by 'pyro-struct fit' or guide.save()")
    p.add_argument("model", metavar="FILE.py:FUNCTION", help="the model the guide was trained for")
    p.add_argument("--obs", required=obs_required, default=None, help=obs_help)
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for FUNCTION")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_posterior(p):
    _add_guide_arguments(p, "JSON file mapping observed site names to numbers or lists", True)
    p.add_argument("--samples", type=int, default=1000, help="posterior samples (default: 1000)")
    p.add_argument("--level", type=float, default=0.9, help="probability of the central interval (default: 0.9)")
    p.add_argument("--out", default=None, help="write the summary and the samples to this JSON file")


def _run_posterior(args) -> int:
    import torch

    from ..diagnostics import prior_predictive_check

    positive("--samples", args.samples)
    if not 0 < args.level < 1:
        raise usage_error(f"--level must be between 0 and 1; got {args.level}")
    obs = load_observations(args.obs)
    guide, name = load_guide(args)
    with user_code(f"posterior for '{args.obs}' failed"):
        post = guide.posterior(obs)
        samples = post.sample(args.samples)
    from ..guide import summarize_samples

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
        write_json(Path(args.out), {"model": args.model, "guide": args.guide, "observations": lists(obs),
                                     "level": args.level, "summary": summary, "samples": lists(samples)})
        print(f"written: {args.out}")
    return 0


# ---------------------------------------------------------------------------- check
def _add_check(p):
    _add_guide_arguments(p, "JSON file of observations: also report their Pareto-k, ESS and prior-predictive range", False)
    p.add_argument("--out", default="pyro_struct_check", help="report folder (default: ./pyro_struct_check)")
    p.add_argument("--simulations", type=int, default=200, help="simulated data sets for calibration (default: 200)")
    p.add_argument("--samples", type=int, default=100, help="posterior draws per simulated data set (default: 100)")
    p.add_argument("--importance-samples", type=int, default=1000, help="importance draws per observation (default: 1000)")


def _run_check(args) -> int:
    from ..diagnostics import calibration, importance, prior_predictive_check

    if args.simulations < 10:
        raise usage_error(f"--simulations must be at least 10 for a rank test (100 or more is better); got {args.simulations}")
    positive("--samples", args.samples)
    positive("--importance-samples", args.importance_samples)
    obs = load_observations(args.obs) if args.obs else None
    guide, name = load_guide(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = calibration(guide, num_simulations=args.simulations, num_samples=args.samples)
    print(result.summary())
    report: dict[str, Any] = {"model": args.model, "guide": args.guide, "calibration": result.to_dict()}
    result.plot(out / "calibration.png")
    print(f"written: {out / 'calibration.png'}")
    if obs is not None:
        with user_code(f"posterior for '{args.obs}' failed"):
            post = guide.posterior(obs)
        notes = prior_predictive_check(guide, obs)
        for note in notes:
            print(f"note: {note}")
        weights = importance(post, args.importance_samples)
        print(f"importance sampling of '{name}' for '{args.obs}' ({args.importance_samples} draws):\n{weights.summary()}")
        report["observations"] = lists(obs)
        report["prior_predictive"] = [str(n) for n in notes]
        report["importance"] = {"pareto_k": weights.pareto_k.tolist(), "ess": weights.ess.tolist(),
                                "log_evidence": weights.log_evidence.tolist(), "num_samples": args.importance_samples}
    write_json(out / "check.json", report)
    print(f"written: {out / 'check.json'}")
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
    Command("check", "calibration of a saved guide and, given observations, their Pareto-k and ESS", _add_check, _run_check),
    Command("bench", "run a benchmark of benchmarks/ and save its table (python -m benchmarks NAME)", _add_bench, _run_bench),
]
