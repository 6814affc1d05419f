"""Density estimation at small n: DensityFlow on the true / learned / dense DAG against zuko's MAF and NSF.

Data: rows of the bnlearn linear-Gaussian networks ``ecoli70`` and ``magic-niab`` (read with
``LinearGaussianNetwork.from_json`` from the shared data folder) and of two nonlinear Bayesian
networks (the ``hetero7`` and ``random10`` SCMs of ``benchmarks/causal.py``). Every method is
fitted on the same ``--n`` training rows (at most 1,000: the small-data regime where structure
should help) with the shared training loop (10% held out for early stopping) and scored on
``--n-test`` fresh rows. Reported per row:

- test NLL in nats per dimension, in the data's units (the true joint's entropy per dimension
  for the linear-Gaussian networks as ``oracle``);
- for the learned DAG, its structural Hamming distance (SHD: missing + extra + reversed edges)
  to the true DAG and its edge count;
- fit seconds (structure learning included for ``learned``).

Methods: ``true`` (DensityFlow on the true DAG), ``learned`` (``DensityFlow("learn")``:
:func:`pyro_struct.learn_structure`, then the flow on that DAG), ``dense`` (fully autoregressive
in a topological order of the true DAG), ``maf`` and ``nsf`` (zuko, the ``bench`` extra).

Usage: ``python -m benchmarks density [--n 1000] [--steps 1500] [--datasets ecoli70 magic-niab hetero7 random10]``
"""

from __future__ import annotations

import argparse
import math
import time

import networkx as nx
import torch

from pyro_struct.density import DensityFlow, parse_graph

from .report import write_results

__all__ = ["main", "load_dataset", "shd", "METHODS"]

METHODS = ("true", "learned", "dense", "maf", "nsf")
LINEAR = ("ecoli70", "magic-niab")


def shd(learned: torch.Tensor, true: torch.Tensor) -> int:
    """Structural Hamming distance of two ``(d, d)`` DAG adjacencies: node pairs whose edge differs
    (missing, extra or reversed each count once)."""
    d = true.shape[0]
    upper = torch.triu(torch.ones(d, d, dtype=torch.bool), 1)
    # per unordered pair: 0 no edge, 1 i <- j, 2 j <- i
    a = learned.long() + 2 * learned.T.long()
    b = true.long() + 2 * true.T.long()
    return int(((a != b) & upper).sum())


def load_dataset(name: str, n: int, seed: int):
    """``(graph, data dict name -> (n,), oracle NLL per dim or None)`` for a dataset name."""
    gen = torch.Generator().manual_seed(seed)
    if name in LINEAR:
        from pyro_struct.models import LinearGaussianNetwork

        net = LinearGaussianNetwork.from_name(name)
        graph = nx.DiGraph()
        graph.add_nodes_from(net.site_names[v] for v in net.order)
        graph.add_edges_from((net.site_names[p], net.site_names[c]) for p, c in net.graph.edges)
        data = net.sample_joint(n, gen)
        d = len(net.order)
        entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * net.joint_cov)) / d
        return graph, data, entropy
    from .causal import make_scm

    scm = make_scm(name)
    u = torch.randn(n, len(scm.names), generator=gen)
    return scm.graph, scm.run(u), None


class _ZukoDensity(torch.nn.Module):
    """A zuko flow on standardised columns, scored in data units."""

    def __init__(self, kind: str, d: int, loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        import zuko

        make = {"maf": lambda: zuko.flows.MAF(d, transforms=3, hidden_features=(64, 64)),
                "nsf": lambda: zuko.flows.NSF(d, transforms=3, hidden_features=(64, 64))}[kind]
        self.flow = make()
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def standard_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z)`` ``(n,)`` of standardised rows ``z`` ``(n, d)``."""
        return self.flow().log_prob(z)

    def log_prob(self, X: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` ``(n,)`` in data units for rows ``X`` ``(n, d)``."""
        return self.standard_log_prob((X - self.loc) / self.scale) - torch.log(self.scale).sum()


def _fit_zuko(kind: str, X: torch.Tensor, args) -> _ZukoDensity:
    from pyro_struct.training import train
    from pyro_struct.training.batches import PoolSource, TensorPool

    loc, scale = X.mean(0), X.std(0)
    model = _ZukoDensity(kind, X.shape[1], loc, scale)
    Z = ((X - loc) / scale)[torch.randperm(X.shape[0])]
    train(model, lambda b: -model.standard_log_prob(b.data).mean(), PoolSource(TensorPool(Z), args.batch_size, 0.1),
          num_steps=args.steps, lr=args.zuko_lr, progress=False, desc=kind)
    return model


def run_dataset(name: str, args, seed: int) -> list[dict]:
    """Rows of one dataset and seed."""
    torch.manual_seed(seed)
    graph, train_data, entropy = load_dataset(name, args.n, seed)
    _, test_data, _ = load_dataset(name, args.n_test, seed + 10_000)
    names, A_true = parse_graph(graph)
    X_test = torch.stack([test_data[k] for k in names], -1)
    X_train = torch.stack([train_data[k] for k in names], -1)
    d = len(names)
    options = dict(num_layers=args.layers, hidden_sizes=tuple(args.hidden), normalizer=args.normalizer)
    rows = []
    if entropy is not None:
        rows.append({"dataset": name, "d": d, "n": args.n, "seed": seed, "method": "oracle", "test NLL/dim": entropy,
                     "SHD": None, "edges": int(A_true.sum()), "fit s": None})
    for method in args.methods:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        learned = None
        if method in ("maf", "nsf"):
            model = _fit_zuko(method, X_train, args)
            with torch.no_grad():
                nll = -float(model.log_prob(X_test).mean()) / d
        else:
            if method == "learned":
                model = DensityFlow("learn", structure_options=dict(seed=seed, steps_per_round=args.structure_steps),
                                    **options)
            else:
                model = DensityFlow(graph, flow="straf" if method == "true" else "dense", **options)
            model.fit(train_data, num_steps=args.steps, batch_size=args.batch_size, lr=args.lr, progress=False)
            with torch.no_grad():
                nll = -float(model.log_prob(test_data).mean()) / d
            if method == "learned":
                pos = [model.names.index(k) for k in names]
                learned = model.adjacency[pos][:, pos]
        rows.append({"dataset": name, "d": d, "n": args.n, "seed": seed, "method": method, "test NLL/dim": nll,
                     "SHD": None if learned is None else shd(learned, A_true),
                     "edges": int((learned if learned is not None else A_true).sum()) if method in ("true", "learned") else None,
                     "fit s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    """Run the benchmark (arguments as in the module docstring) and write ``results/density.md``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks density", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ecoli70", "magic-niab", "hetero7", "random10"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=1000, help="training rows (small-n regime: <= 1000)")
    parser.add_argument("--n-test", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--structure-steps", type=int, default=500, help="steps per augmented-Lagrangian round")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--zuko-lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--normalizer", default="affine", choices=["affine", "spline", "umnn"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="density")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for name in args.datasets for seed in args.seeds for r in run_dataset(name, args, seed)]
    notes = (
        "test NLL in nats per dimension in data units (lower is better); oracle: the true joint's entropy per "
        "dimension (linear-Gaussian networks). SHD of the learned DAG against the true one. Budgets reduced for the "
        "shared 2-core machine (one seed, the step counts in Settings)."
    )
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir")}
    write_results(args.out, rows, meta=meta, notes=notes, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
