"""The default fit on models that broke it (issue #14): options of the skl objective and the flow, against NUTS.

Each option trains a fresh guide with ``fit(time_budget=B, seed=s)`` (nothing else set) on a zoo
model (``tests/zoo``) and compares the amortised posterior at the model's fixed observation with
the NUTS reference moments of ``tests/zoo/references.json``: per scalar latent coordinate the mean
error in NUTS sds and the sd ratio; the table keeps the worst of each (goal: 0.1 and within 10%).
A run that stops with a ``TrainingError`` is reported with the step it stopped at.

Options (``--options``):

* ``plain``: the plain, unbiased symmetrised-KL estimator (no warm-up, no soft clip, no masking);
* ``fkl``: the forward KL;
* ``robust``: the default ``"skl"`` (:class:`~pyro_struct.objectives.RobustSymmetrizedKL`) and the
  default flow (for a model with a constrained latent: a spline layer on the noise, then an affine one);
* ``affine``: the default objective with the one-layer affine StrAF (the default flow before);
* ``plain_affine``: the plain estimator with the one-layer affine StrAF (main before this change,
  apart from the context standardisation and the finite-value guard, which are not options);
* ``before``: ``plain_affine`` with the context standardisation (mean/sd, no tail compression) and
  the unguarded constrained values of main before this change, patched back in for the run (the
  training loop's skip of a step with a non-finite gradient is not undone; the committed ``before``
  rows ran before it existed);
* ``no_warmup`` / ``no_clip``: the default without its warm-up / without its soft clip;
* ``spline``, ``affine_spline``, ``affine3``: the default objective with a one-layer spline StrAF,
  an affine layer then a spline layer, or three affine layers.

Usage: ``python -m benchmarks robust_fit [--models eight_schools_noncentered funnel ...]
[--options robust plain ...] [--budget 30 | --steps 400] [--seeds 0] [--append] [--out robust_fit]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import pyro
import torch

from benchmarks.report import RESULTS_DIR, write_results
from pyro_struct.objectives import RobustSymmetrizedKL
from pyro_struct.threads import DEFAULT_NUM_THREADS
from pyro_struct.training import TrainingError

__all__ = ["OPTIONS", "DEFAULT_MODELS", "evaluate", "run_one", "main"]

#: option -> (objective, flow options)
OPTIONS = {
    "plain": (lambda: RobustSymmetrizedKL(0, 0, log_ratio_bound=None, mask_nonfinite=False), {}),
    "fkl": (lambda: "fkl", {}),
    "robust": (lambda: "skl", {}),
    "affine": (lambda: "skl", {"normalizer": "affine"}),
    "plain_affine": (lambda: RobustSymmetrizedKL(0, 0, log_ratio_bound=None, mask_nonfinite=False), {"normalizer": "affine"}),
    "before": (lambda: RobustSymmetrizedKL(0, 0, log_ratio_bound=None, mask_nonfinite=False), {"normalizer": "affine"}),
    "no_warmup": (lambda: RobustSymmetrizedKL(warmup_steps=0, ramp_steps=0), {}),
    "no_clip": (lambda: RobustSymmetrizedKL(log_ratio_bound=None), {}),
    "fixed_clip": (lambda: RobustSymmetrizedKL(bound_doubling_steps=None), {}),
    "spline": (lambda: "skl", {"normalizer": "spline"}),
    "affine_spline": (lambda: "skl", {"normalizer": ["affine", "spline"]}),
    "affine3": (lambda: "skl", {"num_layers": 3}),
}

def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """main's standardisation before this change: the mean and sd of the finite rows."""
    finite = torch.isfinite(x).all(-1)
    x = x[finite] if finite.any() else torch.zeros_like(x)
    loc = x.mean(0)
    scale = x.std(0) if x.shape[0] > 1 else torch.ones_like(loc)
    return loc, torch.where(torch.isfinite(scale) & (scale > 1e-6), scale, torch.ones_like(scale))


@contextlib.contextmanager
def _as_before():
    """The context standardisation and constrained values of main before the robust default (for ``before``)."""
    from pyro_struct import layout

    def unguarded(block, u):
        v = block.transform(u)
        return v, block.transform.log_abs_det_jacobian(u, v)

    saved = layout.robust_moments, layout.CONTEXT_TAIL, layout.SiteBlock.constrain
    layout.robust_moments, layout.CONTEXT_TAIL, layout.SiteBlock.constrain = _moments, math.inf, unguarded
    try:
        yield
    finally:
        layout.robust_moments, layout.CONTEXT_TAIL, layout.SiteBlock.constrain = saved


DEFAULT_MODELS = ("eight_schools_noncentered", "eight_schools_centered", "funnel", "ar1", "stochastic_volatility")


def evaluate(samples: dict, shapes: dict, reference: dict) -> dict:
    """Worst mean error (in NUTS sds) and worst sd ratio (farthest from 1, in log) over the coordinates,
    with the coordinates they occur at; draws site -> ``(n, *shape)``."""
    from tests.zoo import flatten_latents

    flat = flatten_latents({k: samples[k] for k in shapes}, shapes)
    worst_mean, worst_ratio, at_mean, at_ratio, nonfinite = 0.0, 1.0, None, None, 0
    for name, draws in flat.items():
        ref = reference["coordinates"][name]
        nonfinite += int((~torch.isfinite(draws)).sum())
        draws = draws[torch.isfinite(draws)].double()
        err = abs(float(draws.mean()) - ref["mean"]) / ref["sd"]
        ratio = float(draws.std()) / ref["sd"]
        if not err <= worst_mean:  # (NaN counts as worst)
            worst_mean, at_mean = err, name
        if not abs(math.log(ratio)) <= abs(math.log(worst_ratio)):
            worst_ratio, at_ratio = ratio, name
    return {"worst_mean_err": worst_mean, "at": at_mean, "worst_sd_ratio": worst_ratio, "sd_at": at_ratio, "nonfinite": nonfinite}


def run_one(name: str, option: str, budget: float | None, seed: int, num_samples: int, reference: dict,
            num_steps: int | None = None) -> dict:
    """One fresh guide of zoo model ``name`` trained with ``option`` for ``budget`` seconds (or
    ``num_steps`` steps), evaluated."""
    from tests.zoo import get

    m = get(name)
    make_objective, flow_options = OPTIONS[option]
    with _as_before() if option == "before" else contextlib.nullcontext():
        torch.manual_seed(seed)
        guide = m.guide(**flow_options)
        t0, c0 = time.perf_counter(), time.process_time()
        status, skipped = "ok", None
        try:
            skipped = guide.fit(num_steps=num_steps, time_budget=budget, seed=seed, progress=False,
                                objective=make_objective()).skipped_steps
        except TrainingError as e:
            status = "TrainingError at step " + str(len(guide.history))
            print(f"  {name}/{option}: {str(e)[:160]}")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():
            samples = guide.posterior(dict(m.observations)).sample(num_samples)
    row = {"model": name, "option": option, "seed": seed, "status": status, "steps": len(guide.history),
           "seconds": round(seconds, 1), "cpu_s": round(cpu, 1), "skipped": skipped}
    if reference is not None:
        row.update(evaluate(samples, m.latent_shapes(), reference))
    else:
        row["nonfinite"] = sum(int((~torch.isfinite(v)).sum()) for v in samples.values())
    tail = guide.history[-max(1, len(guide.history) // 10):]
    row["final_loss"] = sum(tail) / len(tail) if tail else None
    if reference is not None:
        row["within_goal"] = bool(row["worst_mean_err"] <= 0.1 and abs(math.log(row["worst_sd_ratio"])) <= math.log(1.1))
    return row


def main(argv=None) -> int:
    from tests.zoo.references import load_references

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--options", nargs="+", default=["plain_affine", "fkl", "affine", "robust"], choices=sorted(OPTIONS))
    p.add_argument("--budget", type=float, default=30.0, help="seconds of training per run (time_budget)")
    p.add_argument("--steps", type=int, default=None,
                   help="train for this many steps instead of a time budget (comparable across loads)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--num-samples", type=int, default=4000, help="posterior draws per evaluation")
    p.add_argument("--references", default=None, help="reference moments file (default tests/zoo/references.json)")
    p.add_argument("--append", action="store_true", help="keep the rows already in the table (other models/options)")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from its JSON rows, running nothing")
    p.add_argument("--out", default="robust_fit")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    references = (load_references() if args.references is None else load_references(args.references))["models"]
    missing = [n for n in args.models if n not in references]
    if missing:  # (still run: whether training holds is measured without a reference)
        print(f"no NUTS reference for {missing} (python -m tests.zoo.references --models {' '.join(missing)}): "
              "their accuracy columns stay empty")
    rows, previous = [], Path(args.results_dir or RESULTS_DIR) / f"{args.out}.json"
    if args.table_only:
        args.append, args.models = True, []
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        done = {(m, o, s) for m in args.models for o in args.options for s in args.seeds}
        rows = [r for r in old["rows"] if (r["model"], r["option"], r["seed"]) not in done]
    for name in args.models:
        for option in args.options:
            for seed in args.seeds:
                pyro.clear_param_store()
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                budget = None if args.steps else args.budget
                row = run_one(name, option, budget, seed, args.num_samples, references.get(name), args.steps)
                row["load"] = round(load, 1)
                print(row, flush=True)
                rows.append(row)
    meta = {"budget": f"{args.steps} steps" if args.steps else f"{args.budget} s", "seeds": args.seeds,
            "num_samples": args.num_samples, "fit_threads": DEFAULT_NUM_THREADS,
            "references": args.references or "tests/zoo/references.json"}
    if args.table_only and previous.exists():
        meta = old["meta"]
    if args.append and not args.table_only and previous.exists() and old["meta"] != meta:
        meta["earlier_rows"] = old["meta"]  # (rows kept from a run with other settings)
    notes = (
        "Each row: a fresh guide, `fit(time_budget=budget, seed=seed)` (or `fit(num_steps=...)` where the budget is in "
        "steps) with only the objective/flow of the option changed; cpu_s: the process's CPU seconds; skipped: steps "
        "skipped for a non-finite gradient (– where not recorded), "
        "then 4,000 posterior draws at the zoo model's fixed observation against the NUTS reference "
        "(tests/zoo/references.json). worst_mean_err: the largest |mean - NUTS mean| / NUTS sd over scalar latents "
        "(at: where); worst_sd_ratio: the sd ratio farthest from 1 (sd_at: where). Goal (issue #14): 0.1 and within 10% "
        "in <= 2 CPU-minutes. Timings were taken on a shared, loaded machine (2 cores, several jobs): steps per "
        "budget vary with the load (load: the 1-minute load average when the run started), so the same budget gives "
        "fewer steps than on an idle machine. Options: `before` is main before the robust default (the plain "
        "estimator, mean/sd context standardisation, no guard on constrained values, one affine layer); "
        "`plain_affine` the plain estimator with the new context and guard; `affine` the robust objective with one "
        "affine layer; `robust` the default (robust objective; a spline layer before the affine one where a latent is "
        "constrained: for the funnel, whose latents are real, it is the `affine` configuration). Rows without a "
        "NUTS reference (accuracy columns empty) measure whether training holds. One seed: differences of a few "
        "hundredths are within seed noise."
    )
    write_results(args.out, rows, ["model", "option", "seed", "status", "steps", "seconds", "cpu_s", "worst_mean_err", "at",
                                   "worst_sd_ratio", "sd_at", "nonfinite", "skipped", "final_loss", "within_goal", "load"],
                  meta=meta, notes=notes, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
