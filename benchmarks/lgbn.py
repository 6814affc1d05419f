"""Linear-Gaussian networks: exact forward and reverse KL of amortised guides against baselines.

For each network (bnlearn JSON, leaves observed), each flow x structure x training regime
is trained and evaluated on the same new observations against the closed-form Gaussian
posterior: forward ``KL(p(z|x) || q)`` from exact posterior samples and reverse
``KL(q || p(z|x))`` from guide samples (both unbiased Monte-Carlo estimates of exact KLs).

Regimes: ``skl`` (fresh simulations, fixed wall-clock budget, cosine schedule in elapsed
time) and ``fklN`` (forward KL on a fixed budget of N simulations, ``--fkl-steps`` steps or
``--fkl-budget`` seconds, whichever ends first; ``fit`` holds out 10% of the N simulations and
keeps the parameters with the best held-out loss).
Baselines: an amortised mean-field Gaussian guide (the same training; every latent depends
on the observations only, affine normaliser, one layer) and sbi's NPE with its default
density estimator (skipped with a note if sbi is not installed: ``pip install -e ".[bench]"``),
and, for the fklN rows, the least-squares oracle: each latent's linear-Gaussian conditional on its
faithful-inverse parents fitted by least squares to the same N simulations, the floor that any
faithful affine guide trained on them can approach.

Usage: ``python -m benchmarks lgbn [--networks PATH ...] [--budget 180] [--regimes skl fkl5000]
[--flows straf] [--structures faithful dense] [--baselines meanfield sbi] [--out NAME]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import pyro_struct as ps
from pyro_struct.models import LinearGaussianNetwork, data_dir

from .report import write_results
from .training_budget import apply_training_arguments, fit_for

__all__ = ["main", "evaluate_kl", "meanfield_guide", "train_npe", "DEFAULT_NETWORKS"]

DEFAULT_NETWORKS = ("ecoli70.json", "magic-niab.json")


def evaluate_kl(net: LinearGaussianNetwork, obs: dict, log_q, sample_q, num_samples: int) -> tuple[float, float]:
    """Mean exact forward and reverse KL over a batch of observations.

    Args:
        net: the network (exact posterior).
        obs: observed site -> ``(B,)`` values.
        log_q: ``z (n, B, d) -> log q (n, B)`` in ``net.latent_sites`` order.
        sample_q: ``n -> (z (n, B, d), log q (n, B))``.
        num_samples: Monte-Carlo samples per observation.

    Returns:
        ``(forward KL, reverse KL)`` averaged over the batch, in nats.
    """
    fkl = net.forward_kl(obs, log_q, num_samples).mean()
    rkl = net.reverse_kl(obs, sample_q, num_samples).mean()
    return float(fkl), float(rkl)


def _kl_row(net, obs, log_q, sample_q, args, **fields) -> dict:
    """A table row: ``fields`` plus the exact forward and reverse KL and the evaluation's seconds."""
    t0 = time.perf_counter()
    fkl, rkl = evaluate_kl(net, obs, log_q, sample_q, args.num_samples)
    row = {**fields, "forward_kl": fkl, "reverse_kl": rkl}
    row["eval_s"] = time.perf_counter() - t0
    return row


def meanfield_guide(net: LinearGaussianNetwork, **flow_options) -> ps.StructuredGuide:
    """An amortised mean-field Gaussian guide: ``q(z|x) = prod_i N(z_i; m_i(x), s_i(x))``
    (``structure="meanfield"``: every latent sees the observations only; one affine layer)."""
    options = {"num_layers": 1, "normalizer": "affine", **flow_options}
    return ps.StructuredGuide(net.model, flow="straf", structure="meanfield", observed=net.observed_sites, **options)


def _param_count(guide) -> int:
    try:
        return int(guide.structure.num_effective_parameters)
    except Exception:  # the inspection module is optional for a benchmark row
        return sum(p.numel() for p in guide.parameters())


def _guide_row(net, obs, flow, structure, regime, args, seed):
    torch.manual_seed(seed)
    options = dict(args.flow_options.get(flow, {}))
    if structure == "meanfield":
        guide = meanfield_guide(net)
        method = "mean-field"
    else:
        guide = ps.StructuredGuide(net.model, flow=flow, structure=structure, observed=net.observed_sites, **options)
        method = flow
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=seed, **args.fit_options)
    if regime == "skl":
        history, seconds = fit_for(guide, args.budget, objective="skl", **common)
        sims = len(history) * args.batch_size
    else:
        n = int(regime[3:])
        t0 = time.perf_counter()
        common["batch_size"] = min(args.batch_size, n)
        history = guide.fit(
            objective="fkl", num_simulations=n, num_steps=args.fkl_steps, time_budget=args.fkl_budget, progress=False, **common
        )
        seconds = time.perf_counter() - t0
        sims = n
    post = guide.posterior(**obs)
    sites = net.latent_sites

    def log_q(z):
        return post.log_prob({s: z[..., k].to(torch.get_default_dtype()) for k, s in enumerate(sites)})

    def sample_q(n):
        samples, lq = post.sample_and_log_prob(n)
        return torch.stack([samples[s] for s in sites], -1), lq

    return _kl_row(
        net, obs, log_q, sample_q, args, method=method, structure=structure, regime=regime, simulations=sims,
        steps=len(history), train_s=seconds, final_loss=history[-1] if history else None, params=_param_count(guide),
    )


def _oracle_row(net, obs, regime, args, seed):
    """The statistical floor of a faithful affine guide: each latent's conditional given its
    faithful-inverse parents fitted by least squares (the maximum-likelihood linear-Gaussian
    conditional) on the same ``N`` simulations, no network and no optimiser."""
    n = int(regime[3:])
    bn = ps.trace_model(net.model, observed=net.observed_sites)
    inverse = ps.faithful_inverse(bn)
    joint = net.sample_joint(n, torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    conditionals = []
    for v in inverse.order:
        parents = list(inverse.parents(v))
        X = torch.stack([joint[u].double() for u in parents] + [torch.ones(n, dtype=torch.float64)], -1)
        y = joint[v].double()
        coef = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution.squeeze(-1)
        sd = (y - X @ coef).pow(2).mean().sqrt()
        conditionals.append((v, parents, coef, sd))
    seconds = time.perf_counter() - t0
    sites = net.latent_sites

    def log_q_of(values):
        total = 0.0
        for v, parents, coef, sd in conditionals:
            mean = torch.stack([values[u] for u in parents] + [torch.ones_like(values[v])], -1) @ coef
            total = total + torch.distributions.Normal(mean, sd).log_prob(values[v])
        return total

    def with_obs(values, shape):
        values.update({s: obs[s].double().expand(shape) for s in net.observed_sites})
        return values

    def log_q(z):
        return log_q_of(with_obs({s: z[..., k].double() for k, s in enumerate(sites)}, z.shape[:-1]))

    def sample_q(m):
        shape = (m,) + next(iter(obs.values())).shape
        values = with_obs({}, shape)
        for v, parents, coef, sd in conditionals:
            mean = torch.stack([values[u] for u in parents] + [torch.ones(shape, dtype=torch.float64)], -1) @ coef
            values[v] = mean + sd * torch.randn(shape, dtype=torch.float64)
        return torch.stack([values[s] for s in sites], -1), log_q_of(values)

    return _kl_row(
        net, obs, log_q, sample_q, args, method="least-squares oracle", structure="faithful", regime=regime,
        simulations=n, train_s=seconds, params=sum(len(c[1]) + 2 for c in conditionals),
        note="linear-Gaussian conditionals on the faithful inverse fitted by least squares: the floor for N simulations",
    )


def train_npe(net, num_simulations: int, seed: int):
    """sbi's NPE (default density estimator, early stopping) on ``num_simulations`` joint draws of ``net``.

    Returns:
        ``(estimator, seconds, epochs)``: the trained conditional density estimator (``log_prob(z (n, B, d),
        condition=x (B, dx))``, ``sample((n,), condition=x)``), its training seconds and epochs trained.
    """
    from sbi.inference import NPE

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    joint = net.sample_joint(num_simulations, gen)
    theta = torch.stack([joint[s] for s in net.latent_sites], -1).float()
    x = torch.stack([joint[s] for s in net.observed_sites], -1).float()
    lat = [net.order.index(v) for v in net.latent]
    # the exact prior of the latents (jointly Gaussian); NPE with a Gaussian prior on all of R^d leaks no mass
    prior = torch.distributions.MultivariateNormal(
        net.joint_mean[lat].float(), covariance_matrix=net.joint_cov[lat][:, lat].float()
    )
    t0 = time.perf_counter()
    inference = NPE(prior=prior, show_progress_bars=False)
    estimator = inference.append_simulations(theta, x).train(show_train_summary=False)
    seconds = time.perf_counter() - t0
    estimator.eval()
    return estimator, seconds, (getattr(inference, "_summary", {}).get("epochs_trained") or [None])[-1]


def _sbi_row(net, obs, regime, args, seed):
    try:
        import sbi  # noqa: F401
    except ImportError:
        return {"method": "sbi NPE", "structure": "dense", "regime": regime, "note": 'sbi not installed: pip install -e ".[bench]"'}
    if regime == "skl":
        return {"method": "sbi NPE", "structure": "dense", "regime": regime, "note": "NPE trains on a fixed simulation budget; see the fkl rows"}
    n = int(regime[3:])
    estimator, seconds, epochs = train_npe(net, n, seed)
    xo = torch.stack([obs[s] for s in net.observed_sites], -1).float()  # (B, dx)

    # the trained density estimator, batched over observations (the posterior object loops over them)
    def log_q(z):
        return estimator.log_prob(z.float(), condition=xo)

    def sample_q(m):
        zs = estimator.sample((m,), condition=xo)
        return zs, estimator.log_prob(zs, condition=xo)

    return _kl_row(
        net, obs, log_q, sample_q, args, method="sbi NPE", structure="dense", regime=regime, simulations=n,
        steps=epochs, train_s=seconds,
        params=sum(p.numel() for p in estimator.parameters()), note="steps = epochs (early stopping)",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks lgbn", description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=None, help="network JSON files (default: ecoli70, magic-niab)")
    p.add_argument("--flows", nargs="*", default=["straf", "grf", "cnf"])
    p.add_argument("--structures", nargs="+", default=["faithful", "dense"])
    p.add_argument("--regimes", nargs="+", default=["skl", "fkl1000", "fkl5000", "fkl20000"])
    p.add_argument("--baselines", nargs="*", default=["meanfield", "sbi", "oracle"], help="meanfield, sbi, oracle (fklN rows only)")
    p.add_argument("--budget", type=float, default=180.0, help="wall-clock seconds for the skl regime")
    p.add_argument("--fkl-steps", type=int, default=3000, help="optimisation steps on a fixed simulation budget")
    p.add_argument(
        "--fkl-budget", type=float, default=180.0,
        help="wall-clock cap in seconds for the fklN rows (the CNF cannot take --fkl-steps steps in minutes)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: fit's default)")
    p.add_argument("--flow-options", default="{}", help='JSON: flow -> options, e.g. \'{"straf": {"num_layers": 2}}\'')
    p.add_argument("--fit-options", default="{}", help='JSON: extra options of fit, e.g. \'{"weight_decay": 0.3}\'')
    p.add_argument("--num-obs", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores slows training a lot)")
    p.add_argument("--out", default="lgbn")
    p.add_argument("--results-dir", default=None, help="folder for the table (default: benchmarks/results)")
    args = p.parse_args(argv)
    apply_training_arguments(args)
    args.fit_options = json.loads(args.fit_options)
    networks = args.networks or [str(data_dir() / "bnlearn" / f) for f in DEFAULT_NETWORKS]
    rows = []
    columns = ["network", "method", "structure", "regime", "simulations", "steps", "train_s", "final_loss",
               "forward_kl", "reverse_kl", "params", "note"]

    def save():
        write_results(
            args.out,
            rows,
            columns,
            meta={**vars(args), "networks": [Path(n).name for n in networks], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            results_dir=args.results_dir,
            notes=(
                "KLs are in nats, averaged over the observations (the same new observations for every row); "
                f"forward = KL(p(z|x) || q), reverse = KL(q || p(z|x)), {args.num_samples} samples per observation. "
                "skl rows: fresh simulations for a wall-clock budget (train_s) with a cosine schedule in elapsed "
                "time; fklN rows: N simulations reused for fkl_steps steps or fkl_budget seconds, whichever ends first "
                "(10% held out, best held-out parameters kept). final_loss is the last training loss."
            ),
        )

    for path in networks:
        net = LinearGaussianNetwork.from_json(path)
        name = Path(path).stem
        obs = net.sample_observations(args.num_obs, torch.Generator().manual_seed(args.seed + 1))
        for regime in args.regimes:
            jobs = [(f, s) for f in args.flows for s in args.structures]
            if "meanfield" in args.baselines:
                jobs.append(("straf", "meanfield"))
            for flow, structure in jobs:
                row = _guide_row(net, obs, flow, structure, regime, args, args.seed)
                rows.append({"network": name, **row})
                print(rows[-1], flush=True)
                save()
            if "oracle" in args.baselines and regime != "skl":
                rows.append({"network": name, **_oracle_row(net, obs, regime, args, args.seed)})
                print(rows[-1], flush=True)
                save()
            if "sbi" in args.baselines and regime != "skl":
                rows.append({"network": name, **_sbi_row(net, obs, regime, args, args.seed)})
                print(rows[-1], flush=True)
                save()
    if not rows:
        save()
    return 0
