"""The arithmetic circuit: flows x structures x objectives at equal wall-clock budget.

Each row trains a guide for the same wall-clock budget and reports the symmetrised-KL
estimate on 1,000 fresh simulations (nats; 0 at the exact posterior), parameters, seconds
per step, the CNF's function evaluations, and the distance (MMD with a Gaussian kernel on
standardised coordinates) between the guide's posterior for ``x0=0.3, x1=5.2`` and a
reference sample: by default an exact sampling-importance-resampling sample built from the
circuit's analytic Gaussian conditionals (:func:`importance_reference`, effective sample size
recorded), or a NUTS run (``--reference-method nuts``; on the shared 2-core machine NUTS
needed seconds per iteration on this posterior, which lies along the curve ``z0 z1 = z3``).
For scale, the MMD between two halves of the reference is reported as ``reference_split_mmd``.

Training runs for a wall-clock budget per row (``fit(time_budget=...)``, a cosine schedule in elapsed time),
so every row gets a complete schedule. ``--flow-options``
passes options per flow (e.g. ``'{"straf": {"normalizer": "spline", "num_layers": 3}}'``);
``--variants`` adds named StrAF variants (``affine1``, ``affine3``, ``spline1``, ``spline3``,
``umnn1``) as extra "flows".

Usage: ``python -m benchmarks circuit [--budget 300] [--flows straf grf cnf] [--structures ...]
[--objectives skl fkl elbo] [--variants spline3] [--out NAME]``
"""

from __future__ import annotations

import argparse
import math
import os
import time

import pyro
import torch
from pyro.infer import MCMC, NUTS

import pyro_struct as ps
from pyro_struct.models import arithmetic_circuit
from pyro_struct.models.circuit import CIRCUIT_OBSERVATION
from pyro_struct.objectives import symmetrized_kl

from .report import write_results
from .training_budget import apply_training_arguments, fit_for

__all__ = ["main", "mmd", "nuts_reference", "importance_reference", "log_evidence", "make_guide", "evaluate_skl", "VARIANTS"]

LATENTS = ["z0", "z1", "z2", "z3", "z4", "z5"]
OBSERVED = ["x0", "x1"]

#: named StrAF variants (flow "straf" with these options)
VARIANTS = {
    "affine1": {"normalizer": "affine", "num_layers": 1},
    "affine3": {"normalizer": "affine", "num_layers": 3},
    "spline1": {"normalizer": "spline", "num_layers": 1},
    "spline3": {"normalizer": "spline", "num_layers": 3},
    "umnn1": {"normalizer": "umnn", "num_layers": 1},
}


def mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared MMD between sample sets ``a (n, d)`` and ``b (m, d)``.

    Gaussian kernel with the median-heuristic bandwidth, on coordinates standardised by
    ``b``'s moments (the reference).
    """
    mu, sd = b.mean(0), b.std(0).clamp_min(1e-8)
    a, b = (a - mu) / sd, (b - mu) / sd
    ab = torch.cat([a, b])
    d2 = torch.cdist(ab, ab).pow(2)
    h = d2[d2 > 0].median()
    k = torch.exp(-d2 / h)
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        - 2 * kab.mean()
    )


def _proposal(n: int, x0: torch.Tensor, x1: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` proposals per observation and their exact log importance weights ``log p(z, x) - log r(z | x)``.

    Proposal ``r``: ``z0, z1, z4`` and the barren ``z2`` from the prior (shared by every observation);
    ``z3`` from its exact conditional given ``z0, z1, x0`` and ``z5`` from its exact conditional given
    ``z3, z4, x1`` (products of two Gaussians with scale 0.1: mean of the two centres, scale
    ``0.1 / sqrt(2)``). The weight is then ``N(x0; z0 z1, sqrt(0.02)) N(x1; tanh(z3 + z4), sqrt(0.02))``
    (the marginal likelihoods of the two Gaussian links, normalised), so ``E_r[w] = p(x)``.

    Args:
        x0, x1: observations ``(m,)`` (float64).

    Returns:
        ``z`` ``(n, m, 6)`` (columns ``z0..z5``) and ``log w`` ``(n, m)``.
    """
    link = 0.02**0.5
    half = 0.1 / 2**0.5

    def laplace(loc):
        u = torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5
        return loc - torch.sign(u) * torch.log1p(-2 * u.abs())

    def normal(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    m = x0.shape[0]
    z0, z1 = laplace(5.0), laplace(-2.0)
    z2 = torch.tanh(z0 + z1 - 2.8) + 0.1 * normal((n, 1))
    z3 = 0.5 * (z0 * z1 + x0) + half * normal((n, m))  # drawn in site order: the same stream for m = 1
    z4 = 7.0 + 2.0 * normal((n, 1))
    t = torch.tanh(z3 + z4)
    z5 = 0.5 * (t + x1) + half * normal((n, m))
    log_norm = -torch.log(torch.tensor(link, dtype=torch.float64)) - 0.5 * math.log(2 * math.pi)
    logw = 2 * log_norm - 0.5 * ((x0 - z0 * z1) / link) ** 2 - 0.5 * ((x1 - t) / link) ** 2
    z = torch.stack([c.expand(n, m) for c in (z0, z1, z2, z3, z4, z5)], -1)
    return z, logw


def importance_reference(num_samples: int, num_proposals: int, seed: int, chunk: int = 1_000_000) -> tuple[torch.Tensor, float]:
    """Exact posterior samples ``(num_samples, 6)`` of the circuit at ``x0=0.3, x1=5.2`` by
    sampling-importance-resampling with analytic conditionals (the proposal of :func:`_proposal`),
    so the resampled set is an exact posterior sample up to Monte-Carlo error.

    Returns:
        the samples (float64, columns ``z0..z5``) and the effective sample size of the weights.
    """
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.tensor([v], dtype=torch.float64) for k, v in CIRCUIT_OBSERVATION.items()}
    parts, logw = [], []
    for start in range(0, num_proposals, chunk):
        z, lw = _proposal(min(chunk, num_proposals - start), x["x0"], x["x1"], g)
        parts.append(z[:, 0])
        logw.append(lw[:, 0])
    z = torch.cat(parts)
    w = torch.softmax(torch.cat(logw), 0)
    ess = float(1.0 / (w * w).sum())
    idx = torch.multinomial(w, num_samples, replacement=True, generator=g)
    return z[idx], ess


def log_evidence(x0: torch.Tensor, x1: torch.Tensor, num_proposals: int = 20_000, seed: int = 0, chunk: int = 100) -> torch.Tensor:
    """``log p(x0, x1)`` ``(m,)`` of the circuit for observations ``(m,)``, by importance sampling with
    the analytic-conditional proposal of :func:`_proposal` (``num_proposals`` per observation).

    With it, the negative ELBO becomes the expected reverse KL ``E_x KL(q(z|x) || p(z|x))``
    (Weilbach et al.'s Figure 3 measure, here without the unknown constant ``E_x log p(x)``).
    """
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.as_tensor(x0, dtype=torch.float64).reshape(-1), torch.as_tensor(x1, dtype=torch.float64).reshape(-1)
    out = []
    for start in range(0, x0.shape[0], chunk):
        _, lw = _proposal(num_proposals, x0[start:start + chunk], x1[start:start + chunk], g)
        out.append(torch.logsumexp(lw, 0) - math.log(num_proposals))
    return torch.cat(out) if out else x0.new_zeros(0)


def nuts_reference(num_samples: int, warmup: int, seed: int, progress: bool = False, max_tree_depth: int = 10) -> torch.Tensor:
    """NUTS samples ``(num_samples, 6)`` of the circuit's posterior at ``x0=0.3, x1=5.2`` (dense mass matrix)."""
    pyro.set_rng_seed(seed)
    model = arithmetic_circuit()
    obs = {k: torch.tensor(v) for k, v in CIRCUIT_OBSERVATION.items()}
    # a dense mass matrix: the posterior concentrates along the curve z0 * z1 = z3, and a diagonal
    # mass matrix needs trees of hundreds of leapfrog steps there
    kernel = NUTS(model, target_accept_prob=0.9, max_tree_depth=max_tree_depth, full_mass=True)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress)
    mcmc.run(**obs)
    s = mcmc.get_samples()
    return torch.stack([s[k] for k in LATENTS], -1)


def make_guide(flow: str, structure: str, flow_options: dict, seed: int) -> ps.StructuredGuide:
    """The circuit's guide for a flow family or a named StrAF variant (:data:`VARIANTS`), seeded first;
    ``seed`` also draws the ``"random"`` structure, so seeds of a random cell are different structures.

    Args:
        flow: ``"straf"``, ``"grf"``, ``"cnf"`` or a variant name.
        structure: ``"faithful"``, ``"dense"`` or ``"random"``.
        flow_options: flow (or variant) name -> extra options (a variant's options come first).
    """
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    kind, options = ("straf", dict(VARIANTS[flow])) if flow in VARIANTS else (flow, {})
    options.update(flow_options.get(flow, {}))
    return ps.StructuredGuide(arithmetic_circuit(), flow=kind, structure=structure, observed=OBSERVED, structure_seed=seed,
                              **options)


def evaluate_skl(guide, simulator, sims) -> tuple[float | None, str | None]:
    """The symmetrised-KL estimate (nats) of ``guide`` on simulations ``sims``, without gradients,
    and a note when it could not be computed (e.g. a non-finite model density at a guide sample)."""
    with torch.no_grad():
        try:
            return float(symmetrized_kl(guide, simulator, sims)), None
        except Exception as e:  # a failed estimate is a row's result, not the benchmark's end
            return None, f"{type(e).__name__}: {str(e)[:80]}"


def _row(flow, structure, objective, args, reference):
    guide = make_guide(flow, structure, args.flow_options, args.seed)
    kind = guide.options["flow"]
    history, seconds = fit_for(guide, args.budget, objective=objective, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    row = {
        "flow": flow,
        "structure": structure,
        "objective": objective,
        "H_edges": int(guide.inverse.num_edges),
        "steps": len(history),
        "s_per_step": seconds / max(1, len(history)),
        "params": None,
    }
    try:
        row["params"] = int(guide.structure.num_effective_parameters)
    except Exception:  # the inspection module is optional for a benchmark row
        row["params"] = sum(p.numel() for p in guide.parameters())
    torch.manual_seed(args.seed + 1)
    simulator = guide.simulator()
    sims = simulator.simulate(1000)
    if kind == "cnf" and hasattr(guide.flow, "reset_nfe"):
        guide.flow.reset_nfe()
    row["skl_1000_sims"], note = evaluate_skl(guide, simulator, sims)
    if note:
        row["note"] = note
    if kind == "cnf":
        nfe = {k: v["evaluations"] for k, v in guide.flow.last_stats.items()}
        row["cnf_nfe"] = "/".join(f"{k[0]}{v}" for k, v in nfe.items()) or None
    post = guide.posterior(**CIRCUIT_OBSERVATION)
    samples = post.sample(args.num_posterior_samples)
    q = torch.stack([samples[k] for k in LATENTS], -1).double()
    row["mmd_to_ref"] = mmd(q, reference)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks circuit", description=__doc__.splitlines()[0])
    p.add_argument("--flows", nargs="*", default=["straf", "grf", "cnf"], help="flow families (none: only --variants)")
    p.add_argument("--variants", nargs="*", default=[], help=f"extra StrAF variants: {', '.join(VARIANTS)}")
    p.add_argument("--structures", nargs="+", default=["faithful", "dense", "random"])
    p.add_argument("--objectives", nargs="+", default=["skl", "fkl", "elbo"])
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds of training per row")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: fit's default)")
    p.add_argument("--flow-options", default="{}", help="JSON: flow -> options")
    p.add_argument("--num-posterior-samples", type=int, default=2000)
    p.add_argument("--reference-method", choices=["importance", "nuts"], default="importance",
                   help="exact sampling-importance-resampling (default) or a NUTS run")
    p.add_argument("--reference-samples", type=int, default=4000, help="importance: resampled reference size")
    p.add_argument("--num-proposals", type=int, default=4_000_000, help="importance: proposals drawn")
    p.add_argument("--nuts-samples", type=int, default=4000)
    p.add_argument("--nuts-warmup", type=int, default=2000)
    p.add_argument("--nuts-max-tree-depth", type=int, default=10)
    p.add_argument("--reference", default=None, help="a .pt file of NUTS samples (n, 6): loaded if it exists, else written after the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="circuit")
    args = p.parse_args(argv)
    apply_training_arguments(args)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    ess = None
    if args.reference_method == "importance":
        reference, ess = importance_reference(args.reference_samples, args.num_proposals, args.seed)
        nuts_s = time.perf_counter() - t0
    elif args.reference and os.path.exists(args.reference):
        saved = torch.load(args.reference, weights_only=True)
        reference, nuts_s = saved["samples"].double(), float(saved["seconds"])
        args.nuts_samples, args.nuts_warmup = saved["num_samples"], saved["warmup"]
        args.nuts_max_tree_depth = saved.get("max_tree_depth", args.nuts_max_tree_depth)
    else:
        reference = nuts_reference(args.nuts_samples, args.nuts_warmup, args.seed, progress=True, max_tree_depth=args.nuts_max_tree_depth).double()
        nuts_s = time.perf_counter() - t0
        if args.reference:
            torch.save({"samples": reference, "seconds": nuts_s, "num_samples": args.nuts_samples,
                        "warmup": args.nuts_warmup, "max_tree_depth": args.nuts_max_tree_depth, "seed": args.seed}, args.reference)
    half = len(reference) // 2
    split = mmd(reference[:half], reference[half:])
    print(f"{args.reference_method} reference: {len(reference)} samples in {nuts_s:.0f}s (ESS {ess}); split-half MMD {split:.4g}", flush=True)
    rows = []
    columns = ["flow", "structure", "objective", "H_edges", "steps", "s_per_step", "skl_1000_sims", "mmd_to_ref", "params", "cnf_nfe", "note"]
    for flow in list(args.flows) + list(args.variants):
        for structure in args.structures:
            for objective in args.objectives:
                rows.append(_row(flow, structure, objective, args, reference))
                print(rows[-1], flush=True)
                write_results(
                    args.out,
                    rows,
                    columns,
                    meta={**vars(args), "variant_options": {v: VARIANTS[v] for v in args.variants},
                          "reference_seconds": round(nuts_s, 1), "reference_split_mmd": split, "importance_ess": ess, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                    notes=(
                        "skl_1000_sims: symmetrised-KL estimate (nats) on 1,000 fresh simulations, 0 at the exact posterior. "
                        f"mmd_to_ref: unbiased squared MMD (Gaussian kernel, median bandwidth, coordinates standardised by "
                        f"the reference) between {args.num_posterior_samples} guide samples and {len(reference)} reference "
                        f"samples ({args.reference_method}) at x0=0.3, x1=5.2; two halves of the reference differ by {split:.4f}. "
                        "cnf_nfe: function evaluations of the last forward (f) / inverse (i) solve."
                    ),
                )
    return 0
