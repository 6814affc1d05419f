"""Benchmark: SVI with a subsampled data plate and the shared-weight plate guide costs O(B) per step.

The hierarchical model ``mu ~ N(0, 1)``, ``z_i ~ N(mu, 1)``, ``x_i ~ N(z_i, 1)`` for ``N`` data points
in ``pyro.plate("data", N, subsample_size=B)``; ``StructuredGuide(model, plates="auto")`` is
compiled once per ``N`` and trained by plain Pyro SVI (``Trace_ELBO``, Adam). Per ``N``: compile
seconds, ms per SVI step (median of the timed steps after a warm-up) and, after ``--steps`` steps,
the guide's posterior of ``mu`` at the full data set against the exact one (mean error in exact
posterior sds, sd ratio; ``N`` up to ``--exact-max`` only, the full-data posterior call is O(N)).

Usage::

    python -m benchmarks subsample                 # writes benchmarks/results/subsample.{md,json}
    python -m benchmarks subsample --sizes 1000 10000 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pyro
import pyro.distributions as dist
import torch

from benchmarks.report import write_results
from pyro_struct.guide import StructuredGuide

__all__ = ["main", "hierarchical_subsampled", "run_size"]


def hierarchical_subsampled(batch: int):
    """The benchmark model over data ``(N,)`` with a subsample of ``batch`` members per run."""

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data), subsample_size=batch) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[ind])

    return model


def run_size(n: int, batch: int, steps: int, timed: int, exact_max: int, seed: int) -> dict:
    """One row: compile, train ``steps`` SVI steps, time the last ``timed``, check ``mu``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data = 0.5 + 2 ** 0.5 * torch.randn(n)
    model = hierarchical_subsampled(batch)
    t0 = time.perf_counter()
    guide = StructuredGuide(model, plates="auto", model_args=(data,), observed=["x"], hidden_sizes=(16,))
    compile_s = time.perf_counter() - t0
    svi = pyro.infer.SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995}), pyro.infer.Trace_ELBO())
    times = []
    for i in range(steps):
        t = time.perf_counter()
        svi.step(data)
        if i >= steps - timed:
            times.append(time.perf_counter() - t)
    row = {"N": n, "B": batch, "compile (s)": round(compile_s, 3), "ms per SVI step": round(1e3 * statistics.median(times), 2)}
    if n <= exact_max:
        prec = 1 + n / 2
        mean, sd = float(data.sum() / 2 / prec), prec ** -0.5
        with torch.no_grad():
            s = guide.posterior(x=data).sample(4000)["mu"]
        row["mu mean error (exact sd)"] = round(abs(float(s.mean()) - mean) / sd, 3)
        row["mu sd ratio"] = round(float(s.std()) / sd, 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--timed", type=int, default=100)
    p.add_argument("--exact-max", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="subsample")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = [run_size(n, args.batch, args.steps, args.timed, args.exact_max, args.seed) for n in args.sizes]
    notes = ("Plain Pyro SVI (Trace_ELBO, ClippedAdam lr 1e-2 decayed by 0.995 per step, one particle) with StructuredGuide(plates='auto', hidden_sizes=(16,)); "
             "the guide reads the subsample's observations, samples mu and the B members' z, and the model replays its indices. "
             f"One torch thread; load average {load:.1f} at the start (a shared 2-core machine). "
             "The mu check uses guide.posterior(x=full data): the globals' pooled summary of all N members. "
             "The step cost is what this table is for; the mu columns show how far --steps SVI steps get: the "
             "gradient's variance grows with N / B while the posterior sd shrinks as N^-1/2, so larger N needs more "
             "steps (or a larger B) to converge, as for any subsampled SVI guide. The remaining growth at N = 1e6 is "
             "the plate's own index draw (Pyro draws a permutation of N per subsample).")
    write_results(args.out, rows, meta=vars(args), notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
