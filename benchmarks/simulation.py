"""Simulation throughput of ordinary Pyro models: batched over particles against one draw at a time.

Six model styles, each written the way a user would (no broadcasting over a leading particle
dimension): logistic regression ``X @ w + b``, an AR(1) chain built in a Python loop and
``torch.stack``-ed, eight schools with ``pyro.deterministic`` in a plate, a hierarchical model
(one plate), nested plates, and Dirichlet latents. For each, the simulator's chosen strategy
(:data:`pyro_struct.simulation.STRATEGIES`) is timed against the per-sample loop:

- ``sims_per_s``: ``simulate(batch)`` draws per second, chosen strategy / loop, and their ratio;
- ``log_joint_per_s``: ``log_joint`` evaluations per second, forward and backward (the
  gradient into the values, as reverse-KL training needs), chosen strategy / loop, and ratio;
- ``vmap_sims_per_s``: ``simulate(batch)`` forced through ``torch.func.vmap`` (for the styles
  whose chosen strategy is the cheaper particle plate).

Goal: every style batched (not the loop), at least 50x the loop's simulation rate at batch 256.

Usage: ``python -m benchmarks simulation [--batch 256] [--repeats 21] [--loop-repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from pyro_struct import trace_model
from pyro_struct.simulation import ModelSimulator

from .report import write_results

__all__ = ["STYLES", "Style", "main", "simulator_for"]

_GEN = torch.Generator().manual_seed(0)
_X = torch.randn(50, 3, generator=_GEN)  # a fixed design matrix
_SIGMA_SCHOOLS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
_GROUP = torch.arange(20) % 4  # a fixed group index per observation


def logistic_regression(y=None):
    """``y_i ~ Bernoulli(logits = X_i @ w + b)`` with ``w`` a ``(3,)`` site and a fixed ``X`` ``(50, 3)``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    logits = _X @ w + b
    with pyro.plate("data", _X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def linear_regression(y=None):
    """``y_i ~ Normal(X_i @ w + b, sigma)``, with ``w`` ``(3,)`` and ``X.T`` used for the design."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (w @ _X.T) + b
    with pyro.plate("data", _X.shape[0]):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def ar1(y=None, T: int = 12):
    """An AR(1) chain ``h_t ~ Normal(phi h_(t-1), sigma)`` in a Python loop, stacked and observed."""
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    h = [pyro.sample("h_0", dist.Normal(0.0, sigma))]
    for t in range(1, T):
        h.append(pyro.sample(f"h_{t}", dist.Normal(phi * h[-1], sigma)))
    with pyro.plate("time", T):
        pyro.sample("y", dist.Normal(torch.stack(h), 0.5), obs=y)


def eight_schools(y=None):
    """Eight schools, non-centred, with ``theta`` a ``pyro.deterministic`` site inside the plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, _SIGMA_SCHOOLS), obs=y)


def plates(x=None):
    """A hierarchical model indexed by a fixed design: group means ``z_g ~ Normal(mu, tau)`` in a
    plate of 4, observations ``x_i ~ Normal(z[group_i], 1)`` in a plate of 20."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
    with pyro.plate("groups", 4):
        z = pyro.sample("z", dist.Normal(mu, tau))
    with pyro.plate("data", _GROUP.shape[0]):
        pyro.sample("x", dist.Normal(z[_GROUP], 1.0), obs=x)


def nested_plates(x=None):
    """Group means in a plate of 4, item effects in a plate of 5, and a 5 x 4 grid of observations
    in nested plates."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", 4, dim=-1):
        g = pyro.sample("g", dist.Normal(mu, 1.0))
    with pyro.plate("items", 5, dim=-2):
        a = pyro.sample("a", dist.Normal(0.0, 0.5))
        with pyro.plate("groups_obs", 4, dim=-1):
            pyro.sample("x", dist.Normal(g + a, 0.5), obs=x)


def dirichlet(x=None):
    """Mixture weights ``pi ~ Dirichlet(1, 1, 1)`` and a scale ``s ~ Gamma``; ``x_i ~ Categorical(pi)``
    and ``m ~ Normal(centres @ pi, s)``."""
    pi = pyro.sample("pi", dist.Dirichlet(torch.ones(3)))
    s = pyro.sample("s", dist.Gamma(2.0, 2.0))
    with pyro.plate("data", 30):
        pyro.sample("x", dist.Categorical(pi), obs=x)
    pyro.sample("m", dist.Normal(torch.tensor([-1.0, 0.0, 2.0]) @ pi, s))


class Style:
    """One ordinary model style: a name, the model and its observed sites."""

    def __init__(self, name: str, model: Callable, observed: tuple[str, ...]):
        self.name, self.model, self.observed = name, model, observed


#: the benchmarked styles (``linear_regression`` is tested but not benchmarked: it is ``X @ w`` again)
STYLES = {
    "X @ w (logistic)": Style("X @ w (logistic)", logistic_regression, ("y",)),
    "loop (AR(1), torch.stack)": Style("loop (AR(1), torch.stack)", ar1, ("y",)),
    "deterministic (eight schools)": Style("deterministic (eight schools)", eight_schools, ("y",)),
    "plate": Style("plate", plates, ("x",)),
    "nested plates": Style("nested plates", nested_plates, ("x",)),
    "Dirichlet": Style("Dirichlet", dirichlet, ("x",)),
}


def simulator_for(model: Callable, observed, vectorize=None) -> ModelSimulator:
    """A :class:`ModelSimulator` for ``model`` traced with ``observed`` sites."""
    return ModelSimulator(model, trace_model(model, observed=list(observed)), vectorize=vectorize)


def _rate(fn: Callable, items: int, repeats: int) -> float:
    """Items per second of ``fn()`` (median of ``repeats`` timed calls after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return items / statistics.median(times)


def _log_joint_step(sim: ModelSimulator, sims) -> Callable:
    def step():
        values = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in sims.items()}
        sim.log_joint(values).sum().backward()

    return step


def _row(style: Style, batch: int, repeats: int, loop_repeats: int) -> dict:
    sim = simulator_for(style.model, style.observed)
    sim.prepare()
    loop = simulator_for(style.model, style.observed, vectorize=False)
    vmap = simulator_for(style.model, style.observed, vectorize="vmap")
    sims = sim.simulate(batch)
    rates = {
        "sim": _rate(lambda: sim.simulate(batch), batch, repeats),
        "sim_loop": _rate(lambda: loop.simulate(batch), batch, loop_repeats),
        "lj": _rate(_log_joint_step(sim, sims), batch, repeats),
        "lj_loop": _rate(_log_joint_step(loop, sims), batch, loop_repeats),
        "vmap": _rate(lambda: vmap.simulate(batch), batch, repeats),
    }
    return {
        "style": style.name,
        "strategy": sim.strategy,
        "sims_per_s": round(rates["sim"]),
        "loop_sims_per_s": round(rates["sim_loop"]),
        "speedup": round(rates["sim"] / rates["sim_loop"], 1),
        "log_joint_per_s": round(rates["lj"]),
        "loop_log_joint_per_s": round(rates["lj_loop"]),
        "log_joint_speedup": round(rates["lj"] / rates["lj_loop"], 1),
        "vmap_sims_per_s": round(rates["vmap"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks simulation", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="simulations per call")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per batched rate (median)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed calls per per-sample-loop rate (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--note", default="", help="extra text for the table notes (e.g. the machine's load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    load_before = os.getloadavg()[0]
    rows = [_row(style, args.batch, args.repeats, args.loop_repeats) for style in STYLES.values()]
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    goal = all(r["strategy"] != "loop" and r["speedup"] >= 50 for r in rows)
    notes = (
        f"Rates are per simulation (or per log-density evaluation, forward + backward into the values) at batch "
        f"{args.batch}, median of {args.repeats} timed calls after one warm-up ({args.loop_repeats} for the "
        f"per-sample loop), {args.threads} torch thread(s). `strategy` is what `ModelSimulator` chose; "
        f"`vmap_sims_per_s` forces torch.func.vmap. Goal (every style batched, >= 50x the loop): "
        f"{'met' if goal else 'NOT met'}. {args.note}"
    )
    write_results(
        "simulation",
        rows,
        meta={
            "batch": args.batch,
            "repeats": args.repeats,
            "loop_repeats": args.loop_repeats,
            "threads": args.threads,
            "load_avg_1min_before_after": load,
        },
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
