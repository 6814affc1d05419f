"""Faithful against dense inverse structure for each flow family: parameters, speed, NFE, quality, GRF residuals.

Tests the claim of Weilbach et al. (2020): compiling the minimally faithful inverse into the
flow's masks reduces the number of parameters and of adaptive ODE steps at equal quality.
For the arithmetic circuit (DESIGN.md section 10) and ``ecoli70`` (leaves observed), each
family (StrAF, GRF, StrCNF) is built on the faithful and on the dense inverse (same latent
order; every latent depends on every earlier latent and every observation) and trained with
the same budget of forward-KL steps on simulations ``(z, x) ~ p(z, x)``. Reported per row:

- effective (unmasked) and dense parameter counts;
- milliseconds per training step (loss ``-log q(z | x)``, batch 256, simulation excluded);
- solver work per density evaluation (the training direction) and per sample: NFE per solve
  for the CNF, evaluations of ``g`` summed over blocks for the GRF, conditioner passes for
  StrAF; for the CNF also the NFE at initialisation;
- held-out NLL ``E[-log q(z | x)]`` in nats in the model's own units, and for ecoli70 the
  exact expected forward KL ``E_x KL(p(z|x) || q(z|x))`` (NLL minus the exact conditional
  entropy of the Gaussian posterior), so "equal quality" can be checked;
- for the trained GRFs, the inversion residual ``max |y + g(y) - z|`` against the iteration cap.

Usage: ``python -m benchmarks flows [--steps 300] [--seeds 0 1 2] [--models circuit ecoli70] [--families straf grf cnf]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import pyro
import torch

import pyro_struct as ps
from pyro_struct.flows import GraphicalResidualFlow, StrAF, StructuredCNF
from pyro_struct.simulation import ModelSimulator
from pyro_struct.models import LinearGaussianNetwork, arithmetic_circuit

from .report import RESULTS_DIR, markdown_table, write_results

__all__ = [
    "main",
    "Problem",
    "build_problem",
    "build_flow",
    "benchmark_row",
    "summarise",
    "nfe_goal_lines",
]

FAMILIES = ("straf", "grf", "cnf")
STRUCTURES = ("faithful", "dense")
GRF_ITERATIONS = (1, 2, 3, 5, 10, 20, 50)
TOLERANCE_LADDER = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7)


# ------------------------------------------------------------------------ problems
class Problem:
    """One model compiled with each structure (no flow), and standardised simulations from the library.

    Simulations come from :class:`pyro_struct.simulation.ModelSimulator`, packing and
    standardisation from the compiled :class:`~pyro_struct.layout.LatentLayout` /
    :class:`~pyro_struct.layout.ObservedLayout` (the same ones a guide uses).

    Attributes:
        name, model, bn: the model and its traced BayesNet.
        structures: ``kind -> InverseStructure`` (all with the faithful latent order).
        latent_layout, observed_layout: the layouts, standardised on ``stats_samples`` simulations.
        exact_entropy: ``E_x H[p(z | x)]`` in nats when the posterior is known in closed form.
    """

    def __init__(self, name, model, observed, exact_entropy=None, stats_samples=20000, seed=0):
        self.name, self.model = name, model
        compiled = {k: ps.compile_model(model, flow=None, structure=k, observed=observed) for k in STRUCTURES}
        ref = compiled["faithful"]
        self.bn = ref.bn
        self.structures = {k: c.inverse for k, c in compiled.items()}
        for inv in self.structures.values():
            if inv.order != ref.inverse.order or inv.observed != ref.inverse.observed:
                raise RuntimeError("faithful and dense structures must share the latent order for a fair comparison")
        self.latent_layout, self.observed_layout = ref.latent_layout, ref.observed_layout
        self.simulator = ModelSimulator(model, self.bn)
        self.exact_entropy = exact_entropy
        sims = self._simulate(stats_samples, seed=10_000 + seed)
        u, _ = self.latent_layout.pack({s: sims[s] for s in self.latent_layout.sites}, torch.Size((stats_samples,)))
        self.latent_layout.set_statistics(u)
        self.observed_layout.set_statistics(self.observed_layout.pack({s: sims[s] for s in self.observed_layout.sites}, "stats", False)[0])

    def _simulate(self, n: int, seed: int):
        pyro.set_rng_seed(seed)
        return self.simulator.simulate_in_chunks(n)

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` standardised simulations: latents ``(n, d)`` in the flow's order and the context ``(n, c)``."""
        sims = self._simulate(n, seed)
        u, _ = self.latent_layout.pack({s: sims[s] for s in self.latent_layout.sites}, torch.Size((n,)))
        flat, _ = self.observed_layout.pack({s: sims[s] for s in self.observed_layout.sites}, "simulations", False)
        return self.latent_layout.to_flow(u), self.observed_layout.context(flat)

    def nll(self, flow, z: torch.Tensor, x: torch.Tensor) -> float:
        """Mean ``-log q(z | x)`` in the model's units (the standardisation's Jacobian added back)."""
        with torch.no_grad():
            lp = flow.log_prob(z, x)
        return float(-lp.mean() + self.latent_layout.log_scale())


def build_problem(name: str, seed: int = 0) -> Problem:
    """``"circuit"`` (Weilbach et al.'s arithmetic circuit, both observations) or a bnlearn network
    name such as ``"ecoli70"`` (leaves observed; the exact posterior entropy is recorded)."""
    if name == "circuit":
        return Problem("circuit", arithmetic_circuit(), ["x0", "x1"], seed=seed)
    net = LinearGaussianNetwork.from_name(name)
    cov = net.posterior_cov
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    problem = Problem(name, net.model, list(net.observed_sites), exact_entropy=entropy, seed=seed)
    return problem


def build_flow(family: str, A: torch.Tensor, context_dim: int, args) -> torch.nn.Module:
    """The family's flow on adjacency ``A`` with the benchmark's settings."""
    hidden = tuple(args.hidden)
    if family == "straf":
        return StrAF(
            A, context_dim, num_layers=args.straf_layers, hidden_sizes=hidden, normalizer="affine", activation="relu"
        )
    if family == "grf":
        return GraphicalResidualFlow(A, context_dim, num_layers=args.grf_layers, hidden_sizes=hidden[:1])
    if family.split(":")[0] == "cnf":
        options = {**args.cnf_options, **args.cnf_variants.get(family, {})}
        return StructuredCNF(A, context_dim, hidden_sizes=hidden, rtol=args.cnf_tol, atol=args.cnf_tol, **options)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def cnf_variant_families(args) -> list[str]:
    """The CNF rows' family names: ``"cnf"`` alone, or ``"cnf:NAME"`` per ``--cnf-variants`` entry."""
    return list(args.cnf_variants) if args.cnf_variants else ["cnf"]


def _solve_with(flow, tol: float, fn):
    """``fn()`` with the CNF's rtol = atol = ``tol`` and a fixed seed for its auxiliary draws."""
    saved = (flow.rtol, flow.atol)
    flow.rtol = flow.atol = tol
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            return fn()
    finally:
        flow.rtol, flow.atol = saved


def nfe_at_equal_accuracy(flow, z: torch.Tensor, x: torch.Tensor, accuracy: float = 0.01) -> tuple[float, int]:
    """The loosest tolerance in :data:`TOLERANCE_LADDER` whose density solve of ``z, x`` is within
    ``accuracy`` nats (max over points) of a solve at 1e-8, and its NFE: the work that accuracy costs."""
    ref = _solve_with(flow, 1e-8, lambda: flow.log_prob(z, x))
    for tol in TOLERANCE_LADDER:
        lp = _solve_with(flow, tol, lambda: flow.log_prob(z, x))
        if float((lp - ref).abs().max()) <= accuracy:
            return tol, flow.last_stats["inverse"]["nfe"]
    return 1e-8, flow.last_stats["inverse"]["nfe"]


def cnf_field_stats(flow, z: torch.Tensor, x: torch.Tensor, steps: int = 10) -> tuple[float, float]:
    """The trained field along density trajectories of ``z, x`` (rk4, ``steps`` steps from T to 0):
    the largest spectral norm of ``df/dy`` (a Lipschitz estimate, what sets an explicit solver's
    step) and the mean kinetic energy ``E |f|^2``."""
    y = z
    if flow.augment:
        with torch.no_grad():
            y = torch.cat([z, flow.auxiliary_sample(z, x)[0]], -1)
    h, t = flow.T / steps, flow.T
    lips, kinetic = [], []

    def f(tq, yq):
        return flow.velocity(yq, x, torch.tensor(tq))

    for k in range(steps + 1):
        tt = torch.tensor(t)
        J = torch.func.vmap(torch.func.jacrev(lambda yy, xx: flow.velocity(yy, xx, tt)))(y, x)
        lips.append(float(torch.linalg.matrix_norm(J.detach(), ord=2).max()))
        with torch.no_grad():
            k1 = f(t, y)
            kinetic.append(float(k1.pow(2).sum(-1).mean()))
            if k < steps:
                k2 = f(t - h / 2, y - h / 2 * k1)
                k3 = f(t - h / 2, y - h / 2 * k2)
                y = y - h / 6 * (k1 + 2 * k2 + 2 * k3 + f(t - h, y - h * k3))
        t -= h
    return max(lips), sum(kinetic) / len(kinetic)


def _work(flow, direction: str) -> int:
    """Network evaluations of the latest call in ``direction`` (``"forward"``: sampling, ``"inverse"``:
    density): NFE for the CNF, evaluations of ``g`` summed over blocks for the GRF, conditioner
    passes for StrAF (the flows' common ``last_stats``; the CNF's solver NFE, without its auxiliary pass)."""
    stats = flow.last_stats[direction]
    return stats.get("nfe", stats["evaluations"])


def grf_residuals(flow, z: torch.Tensor, x: torch.Tensor) -> dict[str, list[float]]:
    """``max |y + g(y) - z|`` over blocks after each iteration cap in :data:`GRF_ITERATIONS`, for
    both inversion methods (the flow's settings are restored afterwards)."""
    saved = (flow.inverse_method, flow.inverse_max_iter, flow.inverse_tol)
    out = {}
    try:
        for method in ("newton", "fixed_point"):
            flow.inverse_method = method
            flow.inverse_tol = 1e-12  # run every allowed iteration
            res = []
            for k in GRF_ITERATIONS:
                flow.inverse_max_iter = k
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    flow.inverse(z, x)
                res.append(float(flow.last_stats["inverse"]["residual"]))
            out[method] = res
    finally:
        flow.inverse_method, flow.inverse_max_iter, flow.inverse_tol = saved
    return out


def benchmark_row(
    problem: Problem, family: str, structure: str, args, train, held_out, seed: int = 0
) -> tuple[dict, dict | None]:
    """Train one flow with the shared budget and measure it. Returns the table row and, for the
    GRF, its residual curves."""
    inv = problem.structures[structure]
    A = inv.adjacency()
    torch.manual_seed(seed)
    flow = build_flow(family, A, A.shape[1] - A.shape[0], args)
    effective, dense = flow.num_effective_parameters(), flow.num_dense_parameters()
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    z_train, x_train = train
    times, work = [], []
    follows = callable(getattr(flow, "set_training_progress", None))  # a CNF's tolerance schedule
    for step in range(args.steps):
        if follows:
            flow.set_training_progress(step / args.steps)
        i = (step * args.batch) % len(z_train)
        zb, xb = z_train[i : i + args.batch], x_train[i : i + args.batch]
        t0 = time.perf_counter()
        loss = -flow.log_prob(zb, xb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        work.append(_work(flow, "inverse"))
        if not torch.isfinite(loss):
            raise RuntimeError(f"{problem.name}/{family}/{structure}: non-finite loss at step {step}")
    if follows:
        flow.set_training_progress(None)
    skip = min(3, len(times) - 1)  # first steps include allocator warm-up
    ms = 1000 * sum(times[skip:]) / max(1, len(times) - skip)
    tail = work[-max(1, len(work) // 5):]
    z_h, x_h = held_out
    is_cnf = family.split(":")[0] == "cnf"
    if is_cnf and flow.augment:
        flow.aux_samples = args.cnf_aux_samples  # the importance-weighted bound, tighter than the ELBO over a
    nll = problem.nll(flow, z_h, x_h)
    density_work = _work(flow, "inverse")
    if is_cnf:
        flow.aux_samples = 1
    with torch.no_grad():
        flow.rsample_and_log_prob(x_h[: args.batch], 1)
    sampling_work = _work(flow, "forward")
    cnf = {"nfe_tight": None, "tol_eq_acc": None, "nfe_eq_acc": None, "lip_max": None, "kinetic": None}
    if is_cnf:
        # the trained dynamics' difficulty: at a tighter tolerance than training used, and at equal accuracy
        zb, xb = z_h[: args.batch], x_h[: args.batch]
        _solve_with(flow, args.cnf_eval_tol, lambda: flow.log_prob(zb, xb))
        cnf["nfe_tight"] = _work(flow, "inverse")
        cnf["tol_eq_acc"], cnf["nfe_eq_acc"] = nfe_at_equal_accuracy(flow, zb, xb, args.cnf_accuracy)
        cnf["lip_max"], cnf["kinetic"] = cnf_field_stats(flow, zb[:64], xb[:64])
    row = {
        "model": problem.name,
        "family": family,
        "structure": structure,
        "seed": seed,
        "edges": inv.num_edges,
        "depth": inv.depth,
        "params_eff": effective,
        "params_dense": dense,
        "ms_per_step": ms,
        "work_init": work[0],
        "work_train": sum(tail) / len(tail),
        "work_density": density_work,
        "work_sample": sampling_work,
        **cnf,
        "heldout_nll": nll,
        "fwd_kl": (nll - problem.exact_entropy) if problem.exact_entropy is not None else None,
        "final_loss": float(loss.detach()),
    }
    curves = grf_residuals(flow, z_h[:512], x_h[:512]) if family == "grf" else None
    return row, curves


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks flows", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per flow (equal budget)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--models", nargs="+", default=["circuit", "ecoli70"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--hidden", nargs="+", type=int, default=[64, 64])
    p.add_argument("--straf-layers", type=int, default=2)
    p.add_argument("--grf-layers", type=int, default=4, help="GRF residual blocks (its num_layers)")
    p.add_argument("--cnf-tol", type=float, default=1e-4, help="rtol = atol of the CNF's dopri5")
    p.add_argument("--cnf-eval-tol", type=float, default=1e-6, help="tolerance of the trained CNF's NFE probe")
    p.add_argument("--cnf-accuracy", type=float, default=0.01,
                   help="nats: max |log q error| against a 1e-8 solve that defines the equal-accuracy NFE")
    p.add_argument("--cnf-options", type=json.loads, default={}, help="JSON options for every CNF row")
    p.add_argument("--cnf-variants", type=json.loads, default={},
                   help='JSON {"cnf:NAME": options}: CNF rows per variant (family "cnf" runs them all)')
    p.add_argument("--cnf-aux-samples", type=int, default=16,
                   help="importance samples of an augmented CNF's held-out log q bound")
    p.add_argument("--heldout", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one training run per seed and row")
    p.add_argument("--name", default="flows", help="results file stem")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing NAME.json that this run does not redo (re-run some rows only)")
    return p.parse_args(argv)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else float("nan"))


def _pm(values: list[float]) -> str | float:
    m, sd = _mean_sd(values)
    return m if len(values) == 1 else f"{m:.3g} ± {sd:.2g}"


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per (model, family, structure): means over seeds (``±`` one standard deviation when there are
    several); and per (model, family): faithful against dense (ratios of means, and the
    faithful-minus-dense NLL difference paired by seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["family"], r["structure"]), []).append(r)
    summary = []
    for (model, family, structure), rs in groups.items():
        out = {k: rs[0][k] for k in ("model", "family", "structure", "edges", "depth", "params_eff", "params_dense")}
        out["seeds"] = len(rs)
        for k in ("ms_per_step", "work_init", "work_train", "work_density", "work_sample", "nfe_tight", "tol_eq_acc",
                  "nfe_eq_acc", "lip_max", "kinetic", "heldout_nll", "fwd_kl"):
            vals = [r[k] for r in rs if r[k] is not None]
            out[k] = _pm(vals) if vals else None
        summary.append(out)
    comparison = []
    for model, family in dict.fromkeys((r["model"], r["family"]) for r in rows):
        f = {r["seed"]: r for r in groups.get((model, family, "faithful"), [])}
        d = {r["seed"]: r for r in groups.get((model, family, "dense"), [])}
        seeds = sorted(set(f) & set(d))
        if not seeds:
            continue

        def ratio(key):
            if f[seeds[0]][key] is None:
                return None
            return _mean_sd([f[s][key] for s in seeds])[0] / _mean_sd([d[s][key] for s in seeds])[0]

        comparison.append({
            "model": model,
            "family": family,
            "params_eff faithful/dense": ratio("params_eff"),
            "ms_per_step faithful/dense": ratio("ms_per_step"),
            "work_train faithful/dense": ratio("work_train"),
            "work_sample faithful/dense": ratio("work_sample"),
            "nfe_tight faithful/dense": ratio("nfe_tight"),
            "nfe_eq_acc faithful/dense": ratio("nfe_eq_acc"),
            "lip_max faithful/dense": ratio("lip_max"),
            "NLL faithful - dense (nats)": _pm([f[s]["heldout_nll"] - d[s]["heldout_nll"] for s in seeds]),
        })
    return summary, comparison


def nfe_goal_lines(rows: list[dict]) -> list[str]:
    """Issue 18's NFE goal per model (the CNF's work at equal accuracy, faithful below dense), paired
    by seed, with what the structure leaves to save: the faithful field's unmasked parameters
    against dense (with the closure velocity mask, the closure of ``H`` sets them)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        pair = {s: {r["seed"]: r for r in rows if r["model"] == model and r["family"] == "cnf" and r["structure"] == s}
                for s in ("faithful", "dense")}
        seeds = sorted(set(pair["faithful"]) & set(pair["dense"]))
        if not seeds:
            continue
        f, d = ([pair[s][k]["nfe_eq_acc"] for k in seeds] for s in ("faithful", "dense"))
        below, ties = sum(a < b for a, b in zip(f, d)), sum(a == b for a, b in zip(f, d))
        mean = {k: _mean_sd(v) for k, v in (("faithful", f), ("dense", d))}
        shown = {k: f"{m:.3g}" + (f" ± {sd:.2g}" if len(seeds) > 1 else "") for k, (m, sd) in mean.items()}
        params = _mean_sd([pair["faithful"][k]["params_eff"] / pair["dense"][k]["params_eff"] for k in seeds])[0]
        met = "met" if mean["faithful"][0] < mean["dense"][0] else "NOT met"
        lines.append(f"- {model}: NFE at equal accuracy faithful {shown['faithful']}, dense {shown['dense']} "
                     f"({len(seeds)} seeds; faithful below dense on {below}, equal on {ties}): {met}. The faithful "
                     f"field has {params:.2f} of dense's unmasked parameters.")
    return lines


def _merge_earlier(args, rows: list[dict], curves: list[dict]) -> dict | None:
    """``--merge``: keep the per-seed rows (and GRF curves) of ``NAME.json`` that this run did not
    redo, in place, in ``rows`` / ``curves``; returns a note of what was kept and the earlier settings."""
    path = RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    redone = {(r["model"], r["family"], r["structure"], r["seed"]) for r in rows}
    kept = [r for r in data.get("per_seed_rows", []) if (r["model"], r["family"], r["structure"], r["seed"]) not in redone]
    rows[:0] = kept
    if not curves:  # the earlier run's curves, each with the seed that measured it
        first = (data.get("meta", {}).get("seeds") or [0])[0]
        curves.extend({**c, "seed": c.get("seed", first)} for c in data.get("grf_residuals", []))
    meta = data.get("meta", {})
    families = sorted({r["family"] for r in kept})
    return {"families": families, "date": data.get("environment", {}).get("date"),
            "cnf_variants": meta.get("cnf_variants"), "steps": meta.get("steps"), "seeds": meta.get("seeds")}


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    rows, curves = [], []
    start = time.perf_counter()
    for name in args.models:
        problem = build_problem(name)  # one standardisation and held-out set for every seed (and --merge)
        held_out = problem.sample(args.heldout, seed=2)
        for seed in args.seeds:
            train = problem.sample(args.steps * args.batch, seed=1000 * (seed + 1) + 1)
            families = [f for fam in args.families for f in (cnf_variant_families(args) if fam == "cnf" else [fam])]
            for family in families:
                for structure in STRUCTURES:
                    t0 = time.perf_counter()
                    row, curve = benchmark_row(problem, family, structure, args, train, held_out, seed=seed)
                    row["train_s"] = time.perf_counter() - t0
                    rows.append(row)
                    print(f"[flows] {name:8s} seed {seed} {family:5s} {structure:8s} nll={row['heldout_nll']:.3f} "
                          f"ms/step={row['ms_per_step']:.1f} work={row['work_train']:.1f} ({row['train_s']:.0f}s)",
                          file=sys.stderr, flush=True)
                    if curve is not None and seed == args.seeds[0]:
                        for method, res in curve.items():
                            curves.append({"model": name, "structure": structure, "method": method, "seed": seed,
                                           **{f"it{k}": r for k, r in zip(GRF_ITERATIONS, res)}})
    earlier = _merge_earlier(args, rows, curves) if args.merge else None
    summary, comparison = summarise(rows)
    columns = ["model", "family", "structure", "edges", "depth", "params_eff", "params_dense", "seeds", "ms_per_step",
               "work_init", "work_train", "work_density", "work_sample", "nfe_tight", "tol_eq_acc", "nfe_eq_acc", "lip_max",
               "kinetic", "heldout_nll", "fwd_kl"]
    notes = [
        "Columns: `params_eff` unmasked parameters (all flows are masked; for `dense` the mask is the full "
        "lower-triangular inverse); `ms_per_step` one forward-KL step (`-log q(z|x)`, batch "
        f"{args.batch}, simulation excluded, mean after 3 warm-up steps, {args.threads} thread(s) on a machine "
        "shared with other jobs, so differences within ~30% are noise); `work_*`: "
        "solver work of one density evaluation (at initialisation, mean over the last 20% of training, after "
        "training) and of one sampling pass after training: NFE per dopri5 solve for `cnf` (2 of them for the "
        "gradient-free initial step size), evaluations of g summed over blocks for `grf`, conditioner passes "
        "for `straf` (depth + 1 per layer when sampling); `nfe_tight` NFE of one density solve of the trained CNF "
        f"at rtol = atol = {args.cnf_eval_tol} (batch {args.batch}); `tol_eq_acc` / `nfe_eq_acc` the loosest tolerance "
        f"of {list(TOLERANCE_LADDER)} whose density solve of that batch is within {args.cnf_accuracy} nats (max "
        "over points) of a 1e-8 solve, and its NFE (the work at equal accuracy); `lip_max` the largest spectral "
        "norm of df/dy along 64 density trajectories (rk4, 10 steps) and `kinetic` their mean E|f|^2 (what sets "
        "an explicit solver's steps); CNF variants `cnf:NAME` are listed under Settings (`cnf` alone: the "
        "defaults); an augmented CNF's `heldout_nll` is the importance-weighted bound with "
        f"{args.cnf_aux_samples} auxiliary samples (an upper bound of its NLL, so `fwd_kl` is an upper bound); `heldout_nll` E[-log q(z|x)] in nats on "
        f"{args.heldout} held-out simulations in the model's units; `fwd_kl` E_x KL(p(z|x) || q) = NLL minus "
        "the exact posterior entropy (Gaussian networks only). Values: mean (± sd over seeds when several).",
        "",
        "Faithful against dense (ratios of means over seeds; the NLL difference is paired by seed, "
        "negative = faithful better):",
        "",
        markdown_table(comparison) if comparison else "(no pairs)\n",
        "Goal (issue 18): the CNF's NFE at equal accuracy, faithful < dense (mean over seeds):",
        "",
        *(nfe_goal_lines(rows) or ["(no CNF pairs)"]),
        "",
        f"GRF inversion residual max|y + g(y) - z| (max over blocks, {min(512, args.heldout)} held-out points, "
        "one seed: the `seed` column) against the iteration cap per block:",
        "",
        markdown_table(curves) if curves else "(no GRF rows)\n",
        f"Total wall time {time.perf_counter() - start:.0f} s.",
    ]
    meta = {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": "Adam", "objective": "forward KL",
        "hidden": args.hidden, "straf_layers": args.straf_layers, "straf_normalizer": "affine",
        "grf_layers": args.grf_layers, "grf_hidden": args.hidden[:1], "cnf_method": "dopri5",
        "cnf_tol": args.cnf_tol, "cnf_eval_tol": args.cnf_eval_tol, "cnf_divergence": "exact",
        "cnf_options": args.cnf_options, "cnf_variants": args.cnf_variants, "cnf_accuracy": args.cnf_accuracy,
        "cnf_aux_samples": args.cnf_aux_samples,
        "heldout": args.heldout, "seeds": args.seeds,
    }
    if earlier is not None:
        meta["merged_from_earlier_run"] = earlier
    write_results(args.name, summary, columns=columns, meta=meta, notes="\n".join(notes))
    # keep the per-seed rows, the comparison and the residual curves in the JSON as data
    path = RESULTS_DIR / f"{args.name}.json"
    data = json.loads(path.read_text())
    data["per_seed_rows"] = rows
    data["comparison"] = comparison
    data["grf_residuals"] = curves
    path.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
