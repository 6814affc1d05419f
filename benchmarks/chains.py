"""Chain guides (``chains="auto"``): compile time, parameters and time per training step against the chain length T.

Models: the example HMM ``hmm(T)`` (no globals) and ``ar1_state_space(T)`` (an AR(1) chain with the
global coefficient and scale), both a Python loop of scalar sites. For each length the row reports

- ``trace_s``: ``ps.trace_model``; ``chain_s``: chain detection, the filtering inverse
  (``ordered_inverse``, ``O(T^2)`` edges: ``z_t <- x_0..x_t``) and its one-step template;
  ``guide_s``: the whole ``StructuredGuide(model, chains="auto")`` (all of the above plus the flow
  and layouts), each timed once;
- ``params``: trainable parameters (they do not depend on T);
- ``standardize_s``: the first ``fit`` simulating the standardisation statistics;
- ``ms_per_step_<objective>``: the mean wall-clock time of a training step (``batch`` simulations,
  forward and backward) after warm-up steps (the step of ``benchmarks.scaling``);
- ``kl_per_coord``: with ``--train-steps`` (only for T <= ``--kl-max-T``, HMM only), the exact
  ``KL(p(z | x) || q)`` per latent coordinate of a guide trained that many fkl steps (batch 64),
  averaged over 3 simulated data sets (the linear-Gaussian posterior from the joint precision).

``--flat`` adds, per length, the per-coordinate guide (``chains=None``) for comparison (one step
timed when it exceeds ``--max-step-s``).

Usage: ``python -m benchmarks chains [--hmm 10 100 1000] [--ar 1000] [--objectives skl fkl]
[--steps 3] [--warmup 1] [--flat] [--train-steps 300] [--out chains]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pyro_struct as ps
from pyro_struct.chains import chain_elimination, chain_inverse, detect_chain
from pyro_struct.inversion import ordered_inverse
from pyro_struct.models import ar1_state_space, hmm
from pyro_struct.models.hmm import hmm_posterior

from .report import RESULTS_DIR, write_results
from .scaling import _step_time_in_child, _timed

__all__ = ["main", "chain_row"]

def _kl_per_coord(guide, T: int, seed: int, data_sets: int = 3, samples: int = 1000) -> float:
    torch.manual_seed(seed + 1)
    sims = guide.simulator().simulate(data_sets)
    kls = []
    for i in range(data_sets):
        x = torch.stack([sims[f"x_{t}"][i] for t in range(T)])
        p = hmm_posterior(x)
        z = p.sample((samples,))
        with torch.no_grad():
            log_q = guide.posterior({f"x_{t}": x[t] for t in range(T)}).log_prob({f"z_{t}": z[:, t].float() for t in range(T)})
        kls.append(float((p.log_prob(z) - log_q.double()).mean()))
    return sum(kls) / len(kls) / T


def chain_row(name: str, T: int, args, chains: str | None = "auto") -> dict:
    """Compile and step timings of one chain length (see the module docstring)."""
    model = hmm(T) if name == "hmm" else ar1_state_space(T)
    options = dict(args.flow_options)
    row = {"model": name if chains else f"{name} (per-coordinate)", "T": T}
    bn, row["trace_s"] = _timed(lambda: ps.trace_model(model))
    if chains:
        def template():
            chain, _ = detect_chain(bn)
            return chain_inverse(ordered_inverse(bn, chain_elimination(chain)), chain)

        _, row["chain_s"] = _timed(template)
    torch.manual_seed(args.seed)
    guide, row["guide_s"] = _timed(lambda: ps.StructuredGuide(model, chains=chains, **options))
    if chains and guide.chain_layout is None:
        raise RuntimeError(f"chains='auto' fell back: {guide.chain_note}")
    row["params"] = sum(p.numel() for p in guide.parameters())
    _, row["standardize_s"] = _timed(lambda: guide.fit(num_steps=0, objective=args.objectives[0], batch_size=args.batch_size, progress=False))
    for objective in args.objectives:
        try:
            s, n = _step_time_in_child(guide, objective, args.batch_size, args.steps, args.warmup, args.max_step_s, args.memory_gib)
            row[f"ms_per_step_{objective}"] = 1e3 * s
            if n == 1:
                row["note"] = (row.get("note", "") + f" {objective}: one step timed (> {args.max_step_s}s)").strip()
        except Exception as e:  # a failure is a result here: record it and go on
            row[f"ms_per_step_{objective}"] = None
            row["note"] = (row.get("note", "") + f" {objective}: {str(e)[:160]}").strip()
    if args.train_steps and name == "hmm" and T <= args.kl_max_T:
        guide.fit(num_steps=args.train_steps, objective="fkl", batch_size=64, lr=5e-3, progress=False, seed=args.seed)
        row["kl_per_coord"] = _kl_per_coord(guide, T, args.seed)
    return row


def _earlier_rows(name: str, redone: set) -> tuple[list[dict], dict | None]:
    """``--merge``: the rows of ``NAME.json`` this run does not redo, and when and with what settings they ran."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return [], None
    data = json.loads(path.read_text())
    kept = [r for r in data.get("rows", []) if (r["model"], r["T"]) not in redone]
    return kept, {"rows": [(r["model"], r["T"]) for r in kept], "date": data.get("environment", {}).get("date"),
                  "commit": data.get("environment", {}).get("commit"), "load_average": data.get("meta", {}).get("load_average")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks chains", description=__doc__.splitlines()[0])
    p.add_argument("--hmm", nargs="*", type=int, default=[10, 100, 1000], help="HMM lengths T")
    p.add_argument("--ar", nargs="*", type=int, default=[1000], help="AR(1) state-space lengths T")
    p.add_argument("--flow-options", default="{}", help="JSON options of the chain flow")
    p.add_argument("--objectives", nargs="+", default=["skl", "fkl"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-step-s", type=float, default=60.0)
    p.add_argument("--memory-gib", type=float, default=16.0)
    p.add_argument("--flat", action="store_true", help="also time the per-coordinate guide at each HMM length")
    p.add_argument("--train-steps", type=int, default=0, help="fkl steps before the exact-KL column (0: no KL)")
    p.add_argument("--kl-max-T", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="chains")
    p.add_argument("--merge", action="store_true", help="keep the rows of the earlier table that this run does not redo")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.flow_options = json.loads(args.flow_options)
    columns = ["model", "T", "trace_s", "chain_s", "guide_s", "params", "standardize_s"]
    columns += [f"ms_per_step_{o}" for o in args.objectives] + ["kl_per_coord", "note"]
    jobs = [("hmm", t, "auto") for t in args.hmm] + [("ar1", t, "auto") for t in args.ar]
    jobs += [("hmm", t, None) for t in args.hmm] if args.flat else []
    label = {("hmm", "auto"): "hmm", ("ar1", "auto"): "ar1", ("hmm", None): "hmm (per-coordinate)"}
    rows, earlier = _earlier_rows(args.out, {(label[n, c], t) for n, t, c in jobs}) if args.merge else ([], None)
    for name, T, chains in jobs:
        rows.append(chain_row(name, T, args, chains))
        print(rows[-1], flush=True)
        write_results(
            args.out, rows, columns,
            meta={**vars(args), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg(),
                  "merged_from_earlier_run": earlier},
            notes=("Seconds of one compilation per stage; ms_per_step_<objective>: mean wall-clock ms of a training step "
                   f"with batch {args.batch_size} after {args.warmup} warm-up step(s), {args.steps} timed, StrAF step flows, "
                   "default options. Taken on a shared, loaded 2-core machine (load_average in the settings): times are upper "
                   "bounds of the cost itself. Before the chain guide (benchmarks/results/scaling.md, per-coordinate guide): "
                   "HMM T = 1,000: 94 s per skl step, 1.2 s per fkl step, guide_s 1.4 s, 1,009,998 parameters."),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
