"""Causal queries: interventional means and counterfactuals of StrAF on the true DAG vs CAREFL vs regression.

The StrNN paper's claim: a causal StrAF (the flow follows the true DAG) answers interventional
and counterfactual queries better than a dense autoregressive flow given only the causal order
(CAREFL, Khemakhem et al. 2021), because the dense flow must learn that non-descendants placed
later in the order do not depend on the intervened node. Three nonlinear SCMs (5, 7 and 10
nodes) are fitted on ``--n`` observational rows; per SCM and intervention ``do(x_j = a)``
(``a`` = the node's mean + 1 sd) the table reports:

- interventional-mean error: mean over the non-intervened nodes of ``|E_fit - E_true| / sd``
  (``E_true`` by Monte Carlo of the true SCM, ``--mc`` rows; the fitted one from as many samples);
- counterfactual RMSE: root mean square over the non-intervened nodes and ``--num-factual``
  held-out factual rows of ``(x_cf - x_cf_true) / sd``, where ``x_cf_true`` reruns the true
  mechanisms on the rows' true noise;
- fit seconds.

Methods: ``straf`` (CausalFlow on the true DAG), ``carefl`` (CausalFlow, ``flow="dense"``: every
node depends on every earlier node in a topological order), ``regression`` (linear least squares
on the true parents, residuals as the noise: a linear additive-noise SCM).

Usage: ``python -m benchmarks causal [--n 1000] [--steps 1500] [--seeds 0] [--scms chain5 hetero7 random10]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import torch

from pyro_struct.density import CausalFlow

from .report import write_results

__all__ = ["main", "SCM", "make_scm", "LinearRegressionSCM", "SCMS"]


@dataclass
class SCM:
    """A structural causal model ``x_i = f_i(parents, u_i)``, ``u ~ N(0, I)``, nodes in topological order.

    Attributes:
        names: node names in topological order; parents: ``name -> list of parent names``.
        mechanisms: ``name -> f(parent values dict, u (n,)) -> (n,)``.
    """

    names: list
    parents: dict
    mechanisms: dict

    @property
    def graph(self) -> nx.DiGraph:
        """The causal DAG (edges parent -> child)."""
        g = nx.DiGraph()
        g.add_nodes_from(self.names)
        g.add_edges_from((p, c) for c in self.names for p in self.parents[c])
        return g

    def run(self, u: torch.Tensor, do: dict | None = None) -> dict:
        """Values ``name -> (n,)`` from noise ``u`` ``(n, d)`` (columns in ``names`` order), with ``do`` applied."""
        do = do or {}
        x = {}
        for i, name in enumerate(self.names):
            if name in do:
                x[name] = torch.full((u.shape[0],), float(do[name]), dtype=u.dtype)
            else:
                x[name] = self.mechanisms[name]({p: x[p] for p in self.parents[name]}, u[:, i])
        return x


def _mechanisms_chain5():
    return SCM(
        names=["a", "b", "c", "d", "e"],
        parents={"a": [], "b": ["a"], "c": [], "d": ["b", "c"], "e": ["a", "d"]},
        mechanisms={
            "a": lambda p, u: u,
            "b": lambda p, u: torch.sin(2 * p["a"]) + 0.5 * p["a"] + 0.4 * u,
            "c": lambda p, u: 0.8 * u + 0.5,
            "d": lambda p, u: torch.tanh(p["b"] + p["c"]) * 2 + 0.3 * u,
            "e": lambda p, u: 0.5 * p["a"] ** 2 - p["d"] + 0.3 * u,
        },
    )


def _mechanisms_hetero7():
    sig = torch.sigmoid
    return SCM(
        names=[f"x{i}" for i in range(7)],
        parents={"x0": [], "x1": [], "x2": ["x0"], "x3": ["x0", "x1"], "x4": ["x2"], "x5": ["x3", "x4"], "x6": ["x1"]},
        mechanisms={
            "x0": lambda p, u: u,
            "x1": lambda p, u: 0.5 * u - 1,
            "x2": lambda p, u: p["x0"] ** 2 / 2 + (0.2 + 0.3 * sig(p["x0"])) * u,
            "x3": lambda p, u: torch.sin(p["x0"]) * p["x1"] + (0.2 + 0.2 * sig(p["x1"])) * u,
            "x4": lambda p, u: torch.tanh(p["x2"] - 1) + 0.3 * u,
            "x5": lambda p, u: p["x3"] - 0.7 * p["x4"] + (0.2 + 0.3 * sig(p["x4"])) * u,
            "x6": lambda p, u: torch.cos(p["x1"]) + 0.3 * u,
        },
    )


def _random_mlp(num_in: int, gen: torch.Generator) -> Callable:
    w1 = torch.randn(num_in, 8, generator=gen) * 1.2
    b1 = torch.randn(8, generator=gen) * 0.5
    w2 = torch.randn(8, generator=gen) / math.sqrt(8) * 1.5
    return lambda X: torch.tanh(X @ w1 + b1) @ w2


def _mechanisms_random10(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    names = [f"v{i}" for i in range(10)]
    parents = {}
    for i, n in enumerate(names):
        cand = [names[j] for j in range(max(0, i - 4), i) if torch.rand((), generator=gen) < 0.5]
        parents[n] = cand[-3:]
    mechanisms = {}
    for n in names:
        ps_, scale = parents[n], float(0.3 + 0.3 * torch.rand((), generator=gen))
        if not ps_:
            mechanisms[n] = lambda p, u, s=scale: u
            continue
        f = _random_mlp(len(ps_), gen)
        mechanisms[n] = lambda p, u, f=f, ps_=ps_, s=scale: f(torch.stack([p[q] for q in ps_], -1)) + s * u
    return SCM(names, parents, mechanisms)


SCMS = {"chain5": _mechanisms_chain5, "hetero7": _mechanisms_hetero7, "random10": _mechanisms_random10}


def make_scm(name: str) -> SCM:
    """One of the benchmark SCMs by name (``chain5``, ``hetero7``, ``random10``)."""
    if name not in SCMS:
        raise ValueError(f"unknown SCM {name!r}; choose from {sorted(SCMS)}")
    return SCMS[name]()


class LinearRegressionSCM:
    """The regression baseline: each node regressed linearly on its true parents (least squares);
    the residuals are its noise (abduction), and interventions resample the training residuals."""

    def __init__(self, scm: SCM, data: dict):
        self.scm, self.coef, self.residuals = scm, {}, {}
        for name in scm.names:
            X = torch.stack([torch.ones_like(data[name])] + [data[p] for p in scm.parents[name]], -1)
            coef = torch.linalg.lstsq(X, data[name].unsqueeze(-1)).solution.squeeze(-1)
            self.coef[name] = coef
            self.residuals[name] = data[name] - X @ coef

    def _run(self, noise: dict, do: dict) -> dict:
        x = {}
        for name in self.scm.names:
            if name in do:
                x[name] = torch.full_like(noise[name], float(do[name]))
                continue
            cols = [torch.ones_like(noise[name])] + [x[p] for p in self.scm.parents[name]]
            x[name] = torch.stack(cols, -1) @ self.coef[name] + noise[name]
        return x

    def intervene_sample(self, do: dict, n: int) -> dict:
        """``n`` rows of ``p(x | do)``: the training residuals resampled as noise."""
        noise = {k: r[torch.randint(len(r), (n,))] for k, r in self.residuals.items()}
        return self._run(noise, do)

    def counterfactual(self, factual: dict, do: dict) -> dict:
        """The factual rows' residuals (abduction) pushed through the fitted equations under ``do``."""
        noise = {}
        for name in self.scm.names:
            X = torch.stack([torch.ones_like(factual[name])] + [factual[p] for p in self.scm.parents[name]], -1)
            noise[name] = factual[name] - X @ self.coef[name]
        return self._run(noise, do)


def _queries(scm: SCM, data: dict) -> list[dict]:
    """Two interventions per SCM: a root and a node in the middle of the order, at mean + 1 sd."""
    g = scm.graph
    roots = [n for n in scm.names if g.in_degree(n) == 0 and g.out_degree(n) > 0]
    middle = [n for n in scm.names[len(scm.names) // 3 :] if g.in_degree(n) > 0 and g.out_degree(n) > 0]
    chosen = [roots[0]] + ([middle[0]] if middle else [])
    return [{n: float(data[n].mean() + data[n].std())} for n in chosen]


def _errors(scm, sd, do, sample, counterfactual, mc, u_fact, factual):
    truth_int = scm.run(torch.randn(mc, len(scm.names)), do)
    fitted_int = sample(do, mc)
    others = [n for n in scm.names if n not in do]
    int_err = statistics.mean(float((fitted_int[n].mean() - truth_int[n].mean()).abs() / sd[n]) for n in others)
    truth_cf = scm.run(u_fact, do)
    fitted_cf = counterfactual(factual, do)
    sq = torch.stack([((fitted_cf[n] - truth_cf[n]) / sd[n]) ** 2 for n in others])
    return int_err, float(sq.mean().sqrt())


def run_scm(name: str, args, seed: int) -> list[dict]:
    """The table rows of one SCM and seed (every method, every query)."""
    torch.manual_seed(seed)
    scm = make_scm(name)
    d = len(scm.names)
    data = scm.run(torch.randn(args.n, d))
    u_fact = torch.randn(args.num_factual, d)
    factual = scm.run(u_fact)
    sd = {k: float(v.std()) for k, v in data.items()}
    rows = []
    fitted = {}
    for method in args.methods:
        t0 = time.perf_counter()
        if method == "regression":
            model = LinearRegressionSCM(scm, data)
            sample, cf = model.intervene_sample, model.counterfactual
        else:
            model = CausalFlow(scm.graph, flow="straf" if method == "straf" else "dense", num_layers=args.layers,
                               hidden_sizes=tuple(args.hidden), normalizer=args.normalizer)
            model.fit(data, num_steps=args.steps, batch_size=args.batch_size, lr=args.lr, validation=0.1, progress=False)
            sample = lambda do, n, m=model: m.intervene(do).sample(n)  # noqa: E731
            cf = model.counterfactual
        fitted[method] = (sample, cf, time.perf_counter() - t0)
    for do in _queries(scm, data):
        for method, (sample, cf, seconds) in fitted.items():
            torch.manual_seed(seed + 1000)
            int_err, cf_rmse = _errors(scm, sd, do, sample, cf, args.mc, u_fact, factual)
            (node, value), = do.items()
            rows.append({"scm": name, "d": d, "seed": seed, "do": f"{node}={value:.2f}", "method": method,
                         "int. mean err (sd)": int_err, "cf RMSE (sd)": cf_rmse, "fit s": seconds})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over queries and seeds per SCM and method."""
    out = []
    keys = dict.fromkeys((r["scm"], r["method"]) for r in rows)
    for scm, method in keys:
        sel = [r for r in rows if r["scm"] == scm and r["method"] == method]
        out.append({"scm": scm, "d": sel[0]["d"], "seed": "mean", "do": "all", "method": method,
                    "int. mean err (sd)": statistics.mean(r["int. mean err (sd)"] for r in sel),
                    "cf RMSE (sd)": statistics.mean(r["cf RMSE (sd)"] for r in sel),
                    "fit s": statistics.mean(r["fit s"] for r in sel)})
    return out


def main(argv=None) -> int:
    """Run the benchmark (arguments as in the module docstring) and write ``results/causal.md``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks causal", description=__doc__.splitlines()[0])
    parser.add_argument("--scms", nargs="+", default=list(SCMS), choices=list(SCMS))
    parser.add_argument("--methods", nargs="+", default=["straf", "carefl", "regression"],
                        choices=["straf", "carefl", "regression"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=1000, help="observational training rows")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--normalizer", default="affine", choices=["affine", "umnn", "spline"])
    parser.add_argument("--mc", type=int, default=20000, help="Monte Carlo rows per interventional mean")
    parser.add_argument("--num-factual", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="causal")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for name in args.scms for seed in args.seeds for r in run_scm(name, args, seed)]
    rows += summarise(rows)
    notes = (
        "Errors in units of each node's observational sd; int. mean err averages |E_fit - E_true| over the "
        "non-intervened nodes, cf RMSE over those nodes and the factual rows. 'mean' rows average the queries "
        "(and seeds). Budgets are reduced for the shared 2-core machine (the steps and seeds in Settings)."
    )
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir")}
    write_results(args.out, rows, meta=meta, notes=notes, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
