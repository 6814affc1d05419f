"""Structured VAEs in the regime of SIReN-VAE's Table 1: test NLL and reconstruction error of learned BN decoders with each encoder.

For each bnlearn network (ecoli70, magic-niab; leaves observed, the rest latent) data are drawn
from the true linear-Gaussian network. A VAE is trained on ``100 x |G|`` points and on a small
``2 x |G|`` set (Mouton & Kroon's two regimes):

- decoder: :class:`pyro_struct.StructuredDecoder` on the true DAG ``G`` (one masked Gaussian
  conditional per node, learned; a fresh initialisation per seed);
- encoders: ``StructuredGuide`` of the one-data-point model, structure ``meanfield`` (the vanilla
  VAE's independent posterior), ``dense`` (fully connected, SIReN-VAE_FC's encoder) or
  ``faithful`` (the faithful inverse of ``G``, SIReN-VAE_true's), each as a graphical residual flow
  (``grf``) and a structured affine autoregressive flow (``straf``);
- training: ``guide.fit(objective="elbo", data=...)`` (decoder and encoder jointly, Adam,
  cosine schedule, 10% of the training points held out for early stopping);
- metrics on 100 fresh test points: NLL (``pyro_struct.evaluate.nll``, 500 importance samples,
  nats per point) and reconstruction error (``evaluate.reconstruction_error``: squared error
  summed over the observed coordinates, posterior means through the decoder), mean ± sd over seeds.

The defaults are the full protocol (3 seeds, both regimes, every encoder). ``--steps``,
``--seeds``, ``--regimes``, ``--encoders`` and ``--networks`` reduce it; the settings are recorded
with the table.

Usage: ``python -m benchmarks vae [--networks ecoli70 magic-niab] [--regimes small full] [--seeds 0 1 2]
[--steps 2000] [--encoders meanfield:grf dense:grf faithful:grf meanfield:straf dense:straf faithful:straf]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import networkx as nx
import pyro
import torch

import pyro_struct as ps
from pyro_struct import evaluate
from pyro_struct.models import LinearGaussianNetwork

from .report import write_results

__all__ = ["main", "vae_model", "run_cell", "exact_nll"]

ENCODERS = ["meanfield:grf", "dense:grf", "faithful:grf", "meanfield:straf", "dense:straf", "faithful:straf"]
COLUMNS = ["network", "train", "encoder", "NLL", "NLL sd", "RE", "RE sd", "s/run"]
#: training-set size per regime, as a multiple of the number of nodes |G|
REGIMES = {"small": 2, "full": 100}


def vae_model(net: LinearGaussianNetwork, seed: int, hidden: int = 32):
    """The one-data-point SIReN-VAE model: a fresh :class:`~pyro_struct.StructuredDecoder` on ``net``'s DAG."""
    torch.manual_seed(seed)
    g = nx.relabel_nodes(net.graph, net.site_names)
    decoder = ps.StructuredDecoder(g, latent=net.latent_sites, observed=net.observed_sites, hidden_sizes=(hidden,))

    def model(**observations):
        pyro.module("decoder", decoder)
        return decoder(observations)

    return model, decoder


def run_cell(net: LinearGaussianNetwork, train: dict, test: dict, encoder: str, seed: int, steps: int, lr: float) -> dict:
    """Train one VAE (decoder + encoder) and evaluate it: ``{"nll", "re", "seconds"}``."""
    pyro.clear_param_store()
    structure, flow = encoder.split(":")
    model, _ = vae_model(net, seed)
    guide = ps.StructuredGuide(model, flow=flow, structure=structure, observed=net.observed_sites)
    n = next(iter(train.values())).shape[0]
    start = time.perf_counter()
    guide.fit(objective="elbo", data=train, num_steps=steps, batch_size=min(128, n), lr=lr, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    return {"nll": evaluate.nll(model, guide, test, num_samples=500),
            "re": evaluate.reconstruction_error(model, guide, test, num_samples=100), "seconds": seconds}


def exact_nll(net: LinearGaussianNetwork, test: dict) -> float:
    """``-mean log p(x)`` of the test points under the true network (its Gaussian marginal): the floor."""
    idx = [net.order.index(v) for v in net.observed]
    marginal = torch.distributions.MultivariateNormal(net.joint_mean[idx], net.joint_cov[idx][:, idx])
    x = torch.stack([test[s] for s in net.observed_sites], -1).double()
    return float(-marginal.log_prob(x).mean())


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["ecoli70", "magic-niab"])
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--encoders", nargs="+", default=ENCODERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--name", default="vae")
    args = p.parse_args(argv)
    rows = []
    for name in args.networks:
        net = LinearGaussianNetwork.from_name(name)
        size = len(net.order)
        for regime in args.regimes:
            exact = []
            for seed in args.seeds:
                gen = torch.Generator().manual_seed(1000 + seed)
                net.sample_observations(REGIMES[regime] * size, gen)
                exact.append(exact_nll(net, net.sample_observations(args.test, gen)))
            rows.append({"network": name, "train": f"{REGIMES[regime]} x nodes = {REGIMES[regime] * size}",
                         "encoder": "true network (exact)", "NLL": _mean_sd(exact)[0], "NLL sd": _mean_sd(exact)[1]})
            for encoder in args.encoders:
                cells = []
                for seed in args.seeds:
                    gen = torch.Generator().manual_seed(1000 + seed)
                    train = net.sample_observations(REGIMES[regime] * size, gen)
                    test = net.sample_observations(args.test, gen)
                    cells.append(run_cell(net, train, test, encoder, seed, args.steps, args.lr))
                    print(name, regime, encoder, seed, {k: round(v, 3) for k, v in cells[-1].items()}, flush=True)
                nll, nll_sd = _mean_sd([c["nll"] for c in cells])
                re, re_sd = _mean_sd([c["re"] for c in cells])
                rows.append({"network": name, "train": f"{REGIMES[regime]} x nodes = {REGIMES[regime] * size}", "encoder": encoder,
                             "NLL": nll, "NLL sd": nll_sd, "RE": re, "RE sd": re_sd,
                             "s/run": statistics.fmean(c["seconds"] for c in cells)})
                _write(args, rows)  # after every row: a long run that is stopped keeps its finished rows
    _write(args, rows)
    return 0


def _write(args, rows: list[dict]) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    notes = (
        "NLL: -log p(x) per test point, 500 importance samples of the encoder (lower is better); RE: squared error "
        "summed over observed coordinates, posterior means through the decoder. Decoder: StructuredDecoder on the "
        "true DAG (learned). Encoders: structure:flow. Mean ± sd over the seeds listed in the settings. Timings on a "
        f"shared, loaded machine (1-minute load average {load} when the table was written)."
    )
    write_results(args.name, rows, COLUMNS, meta=vars(args), notes=notes)


if __name__ == "__main__":
    raise SystemExit(main())
