"""Benchmark: the amortised default guide on a linear-Gaussian network against tuned per-observation SVI, NUTS and sbi's NPE.

The network (``--network``: ecoli70 by default, 22 latent nodes and 24 observed leaves; any bnlearn
network by name, e.g. magic-niab; or ``deep_chain``, 64 latents of depth 34) is linear-Gaussian, so
every observation's posterior is a known Gaussian and every method is scored against it:

- exact ``KL(p(z|x) || q(z|x))``: closed form for SVI's Gaussian ``q`` and for the Gaussian
  moment-matched to NUTS's samples (which includes the chain's Monte Carlo error); the unbiased
  ``E_p[log p - log q]`` with exact posterior samples for the amortised guide and NPE;
- the worst latent's mean error in posterior sds and its sd error ``|sd_q / sd_p - 1|``.

Methods, all on the same ``--baseline-obs`` observations, one torch thread each, timed in
process CPU seconds (scoring excluded):

- pyro_struct's default ``StructuredGuide`` (StrAF, hidden (64, 64), ``skl``), trained once with
  ``--steps`` / ``--train-budget``, then answering each observation without optimisation;
- per-observation SVI with ``AutoMultivariateNormal`` (whose family holds the exact posterior) and
  ``AutoNormal``, with the tuned recipe below and a convergence check (the exact KL, or for
  AutoNormal the reverse-KL gap to its family's closed-form optimum, and the relative change of
  the windowed ELBO);
- NUTS (JIT, dense mass matrix), scored on prefixes of its chain, with its ESS;
- sbi's NPE (default MAF, early stopping) on ``--npe-simulations`` simulations, if sbi is installed.

The comparison is stated both ways: accuracy at equal time (each peer's KL after the amortised
guide's cost per observation, training divided over K observations) and time at equal accuracy
(each peer's seconds to reach the amortised guide's mean KL).

Usage::

    python -m benchmarks amortization            # writes benchmarks/results/amortization.{md,json}
    python -m benchmarks amortization --network magic-niab   # amortization_magic-niab.{md,json}
    python -m benchmarks amortization --network deep_chain   # amortization_deep_chain.{md,json}
    python -m benchmarks amortization --quick    # tiny budgets; prints, does not write results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, JitTrace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.ops.stats import effective_sample_size
from pyro.optim import ClippedAdam

from pyro_struct.guide import StructuredGuide
from pyro_struct.models import LinearGaussianNetwork
from pyro_struct.models.linear_gaussian import gaussian_kl

__all__ = ["main", "run", "run_svi", "run_nuts", "svi_gaussian", "svi_config", "svi_one", "gaussian_scores", "family_optimum", "SVI_FAMILIES"]

RESULTS = Path(__file__).resolve().parent / "results"
SVI_FAMILIES = {"AutoMultivariateNormal": AutoMultivariateNormal, "AutoNormal": AutoNormal}


class _Clock:
    """Process-CPU and wall seconds that can be paused, so that scoring is not timed."""

    def __init__(self):
        self.cpu = self.wall = 0.0
        self._start = None

    def __enter__(self):
        self._start = (time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        cpu, wall = self._start
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall


def _conditioned(network: LinearGaussianNetwork, obs_i: dict):
    def model():
        return network.model(**obs_i)

    return model


def gaussian_scores(network: LinearGaussianNetwork, obs_i: dict, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    """Exact ``KL(p || N(mean, cov))`` and worst moment errors for one observation (``mean (d,)``, ``cov (d, d)``)."""
    mean_p, cov_p = network.exact_posterior(obs_i)
    sd_p = cov_p.diagonal().sqrt()
    mean, cov = mean.double(), cov.double()
    try:
        kl = float(gaussian_kl(mean_p, cov_p, mean, cov))
    except RuntimeError:  # a sample covariance of fewer draws than dimensions is singular
        kl = float("inf")
    return {
        "kl": kl,
        "mean_err": float(((mean - mean_p).abs() / sd_p).max()),
        "sd_err": float((cov.diagonal().sqrt() / sd_p - 1).abs().max()),
    }


def _sample_scores(network, obs_i, log_q, z_q: torch.Tensor, kl_samples: int) -> dict:
    """Unbiased exact-sample KL of a density ``log_q(z (n, d)) -> (n,)`` and the moment errors of its samples ``z_q (n, d)``."""
    scores = gaussian_scores(network, obs_i, z_q.double().mean(0), torch.cov(z_q.double().T))
    scores["kl"] = float(network.forward_kl(obs_i, log_q, kl_samples))
    return scores


def family_optimum(network: LinearGaussianNetwork, obs_i: dict, family: str):
    """The ``KL(q || p)`` minimiser in an SVI family, closed form: ``(mean (d,), cov (d, d))``.

    AutoMultivariateNormal holds the posterior itself; AutoNormal's optimum has the exact mean and
    variances ``1 / Lambda_ii`` (the diagonal of the posterior precision).
    """
    mean_p, cov_p = network.exact_posterior(obs_i)
    if family == "AutoMultivariateNormal":
        return mean_p, cov_p
    return mean_p, torch.diag(1.0 / torch.linalg.inv(cov_p).diagonal())


def svi_gaussian(guide, network: LinearGaussianNetwork):
    """The fitted Gaussian of an AutoMultivariateNormal / AutoNormal guide: ``(mean (d,), cov (d, d))`` in latent order.

    AutoMultivariateNormal's ``scale_tril`` parameter is only the unit lower-triangular factor; its
    covariance factor is ``scale[:, None] * scale_tril`` (``get_posterior``). The first version of
    this benchmark scored ``scale_tril`` alone, which is where its "16 nats" came from.
    """
    with torch.no_grad():
        if isinstance(guide, AutoMultivariateNormal):
            order = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
            if order != network.latent_sites:
                raise RuntimeError(f"the guide's latent order {order} is not the network's {network.latent_sites}")
            q = guide.get_posterior()
            return q.loc.double(), q.covariance_matrix.double()
        loc = torch.stack([getattr(guide.locs, s) for s in network.latent_sites]).double()
        scale = torch.stack([getattr(guide.scales, s) for s in network.latent_sites]).double()
        return loc, torch.diag(scale**2)


def _elbo_rel_change(losses: list, window: int) -> float:
    """``|mean(last window) - mean(window before)| / |mean(last window)|`` of the loss history."""
    if len(losses) < 2 * window:
        return float("nan")
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    return abs(last - before) / abs(last)


def svi_one(network, obs_i: dict, family: str, cfg: dict, seed: int) -> dict:
    """One observation's SVI run with the recipe ``cfg``; the exact scores every ``cfg['eval_every']`` steps."""
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model = _conditioned(network, obs_i)
    clock, losses, trace = _Clock(), [], []
    with clock:
        guide = SVI_FAMILIES[family](model, init_scale=cfg["init_scale"])
        guide()  # builds the parameters, so the initial state can be scored
        # the learning rate decays by cfg["lr_decay"] over the run (ClippedAdam multiplies it by lrd each step)
        optim = ClippedAdam({"lr": cfg["lr"], "lrd": cfg["lr_decay"] ** (1.0 / cfg["steps"])})
        elbo = JitTrace_ELBO(num_particles=cfg["particles"], vectorize_particles=cfg["particles"] > 1, ignore_jit_warnings=True)
        svi = SVI(model, guide, optim, elbo)
    rel_stop = None
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            trace.append({"step": step, "cpu_s": clock.cpu, "wall_s": clock.wall, **gaussian_scores(network, obs_i, *svi_gaussian(guide, network))})
        if step % cfg["window"] == 0 and rel_stop is None and _elbo_rel_change(losses, cfg["window"]) < cfg["rel_tol"]:
            rel_stop = {"step": step, **trace[-1]} if trace[-1]["step"] == step else {"step": step}
        if step == cfg["steps"]:
            break
        with clock:
            losses.append(svi.step())
    opt_mean, opt_cov = family_optimum(network, obs_i, family)
    mean_p, cov_p = network.exact_posterior(obs_i)
    q_mean, q_cov = svi_gaussian(guide, network)
    gap = float(gaussian_kl(q_mean, q_cov, mean_p, cov_p) - gaussian_kl(opt_mean, opt_cov, mean_p, cov_p))
    return {
        "trace": trace, "final": trace[-1], "cpu_s": clock.cpu, "wall_s": clock.wall,
        "family_optimum_kl": float(gaussian_kl(mean_p, cov_p, opt_mean, opt_cov)),
        "reverse_kl_gap_to_optimum": gap, "converged": gap <= cfg["kl_tol"],
        "elbo_rel_change_last_window": _elbo_rel_change(losses, cfg["window"]), "elbo_rule_stop": rel_stop,
        "final_loss_mean_last_window": sum(losses[-cfg["window"]:]) / cfg["window"],
    }


def run_svi(network, obs_list: list, family: str, cfg: dict, seed: int) -> list:
    """:func:`svi_one` on each observation (seeds ``seed + i``)."""
    return [svi_one(network, obs_i, family, cfg, seed + i) for i, obs_i in enumerate(obs_list)]


def nuts_one(network, obs_i: dict, warmup: int, num_samples: int, prefixes: list, seed: int) -> dict:
    """One NUTS chain (JIT, dense mass); the moment-matched scores on its first ``n`` samples for ``n`` in ``prefixes``."""
    pyro.set_rng_seed(seed)
    stamps = []

    def hook(kernel, params, stage, i):  # one call per iteration: its CPU time since the start
        stamps.append((time.process_time() - start[0], time.perf_counter() - start[1]))

    # JIT and a dense mass matrix: the fastest NUTS Pyro offers on this correlated posterior
    kernel = NUTS(_conditioned(network, obs_i), jit_compile=True, full_mass=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, hook_fn=hook, disable_progbar=True)
    start = (time.process_time(), time.perf_counter())
    mcmc.run()
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    z = network.stack_latents(mcmc.get_samples()).double()
    trace = []
    for n in sorted({min(p, num_samples) for p in prefixes} | {num_samples}):
        c, w = stamps[warmup + n - 1]
        trace.append({"samples": n, "cpu_s": c, "wall_s": w, **gaussian_scores(network, obs_i, z[:n].mean(0), torch.cov(z[:n].T))})
    ess = effective_sample_size(z.unsqueeze(0).float(), chain_dim=0, sample_dim=1)
    return {
        "trace": trace, "final": trace[-1], "cpu_s": cpu, "wall_s": wall, "warmup_cpu_s": stamps[warmup - 1][0],
        "ess_min": float(ess.min()), "ess_median": float(ess.median()),
        "step_size": float(kernel.step_size), "num_steps_last": int(getattr(kernel, "_num_steps", 0) or 0),
    }


def run_nuts(network, obs_list: list, warmup: int, num_samples: int, prefixes: list, seed: int) -> list:
    """:func:`nuts_one` on each observation (seeds ``seed + i``)."""
    return [nuts_one(network, obs_i, warmup, num_samples, prefixes, seed + i) for i, obs_i in enumerate(obs_list)]


def _answer_scores(network, obs_list: list, draw, log_q, args) -> list:
    """Per observation: CPU seconds of ``draw(obs_i, n)`` for ``--num-samples`` samples, then the scores."""
    out = []
    for obs_i in obs_list:
        clock = _Clock()
        with clock, torch.no_grad():
            draw(obs_i, args.num_samples)
        z_q = draw(obs_i, args.moment_samples)
        out.append({"cpu_s": clock.cpu, "wall_s": clock.wall,
                    **_sample_scores(network, obs_i, lambda z, o=obs_i: log_q(o, z), z_q, args.kl_samples)})
    return out


def run_amortised(network, obs_all: dict, obs_list: list, args) -> dict:
    """Train the default StructuredGuide once, then answer every observation: timings and scores."""
    guide = StructuredGuide(network.model, observed=network.observed_sites)
    clock = _Clock()
    with clock:
        guide.fit(num_steps=args.steps, time_budget=args.train_budget, progress=args.progress, seed=args.seed)
    stack = network.stack_latents

    def draw(obs_i, n):
        return stack(guide.posterior(**obs_i).sample(n)).double()

    def log_q(obs_i, z):
        return guide.posterior(**obs_i).log_prob({s: z[..., i].float() for i, s in enumerate(network.latent_sites)})

    guide.posterior(**obs_list[0]).sample(2)  # allocator and lazy initialisation, not timed
    per_obs = _answer_scores(network, obs_list, draw, log_q, args)
    batch = _Clock()
    with batch, torch.no_grad():  # the throughput task: every observation in one vectorised pass
        guide.posterior(**obs_all).sample(args.num_samples)
    kl_all = torch.cat([network.posterior_kl(guide.posterior(**{k: v[i : i + 100] for k, v in obs_all.items()}),
                                             {k: v[i : i + 100] for k, v in obs_all.items()}, args.kl_samples)
                        for i in range(0, args.num_obs, 100)])
    return {
        "train_cpu_s": clock.cpu, "train_wall_s": clock.wall, "steps_done": len(guide.history),
        "final_loss_mean_last_100": sum(guide.history[-100:]) / len(guide.history[-100:]),
        # the conditioners' widths as built (the mask factorisation may widen the (64, 64) default)
        "hidden_sizes": list(guide.flow.conditioners[0].hidden_sizes), "num_layers": guide.flow.num_layers,
        "normalizer": guide.flow.normalizer_name, "flow": type(guide.flow).__name__, "inverse_edges": guide.inverse.num_edges, "inverse_depth": guide.inverse.depth,
        "per_obs": per_obs, "batch_cpu_s": batch.cpu, "batch_wall_s": batch.wall, "kl_mean_all": float(kl_all.mean()),
    }


def run_npe(network, obs_list: list, args) -> dict:
    """sbi's NPE on ``--npe-simulations`` simulations (the lgbn benchmark's recipe), then each observation answered."""
    from benchmarks.lgbn import train_npe

    clock = _Clock()
    with clock:
        estimator, _, epochs = train_npe(network, args.npe_simulations, args.seed)

    def x_of(obs_i):
        return torch.stack([torch.as_tensor(obs_i[s]) for s in network.observed_sites]).float()[None]

    def draw(obs_i, n):
        return estimator.sample((n,), condition=x_of(obs_i))[:, 0].double()

    def log_q(obs_i, z):
        return estimator.log_prob(z[:, None].float(), condition=x_of(obs_i))[:, 0]

    with torch.no_grad():
        per_obs = _answer_scores(network, obs_list, draw, log_q, args)
    return {"train_cpu_s": clock.cpu, "train_wall_s": clock.wall, "epochs": epochs, "simulations": args.npe_simulations,
            "params": sum(p.numel() for p in estimator.parameters()), "per_obs": per_obs}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _time_to(trace: list, target: float):
    """CPU seconds at the first trace point whose KL is at most ``target`` (``None``: not reached)."""
    return next((p["cpu_s"] for p in trace if p["kl"] <= target), None)


def _kl_at(trace: list, budget: float):
    """KL at the last trace point within ``budget`` CPU seconds (``None``: no estimate yet, e.g. NUTS in warm-up)."""
    within = [p for p in trace if p["cpu_s"] <= budget]
    return within[-1]["kl"] if within else None


def _nuts_extrapolated_time(run_: dict, target: float) -> float:
    """CPU seconds NUTS would need for a moment-matched KL of ``target``, assuming KL ~ 1 / samples past the last prefix."""
    last = run_["final"]
    per_sample = (last["cpu_s"] - run_["warmup_cpu_s"]) / last["samples"]
    return run_["warmup_cpu_s"] + per_sample * last["samples"] * last["kl"] / target


def compare(result: dict) -> dict:
    """Accuracy at equal time and time at equal accuracy, against the amortised guide's mean KL and cost."""
    a = result["amortised"]
    K = len(a["per_obs"])
    target = _mean([o["kl"] for o in a["per_obs"]])
    answer = _mean([o["cpu_s"] for o in a["per_obs"]])
    budgets = {str(k): a["train_cpu_s"] / k + answer for k in (K, result["config"]["num_obs"])}
    out = {"target_kl": target, "amortised_answer_cpu_s": answer, "budgets_cpu_s": budgets, "methods": {}}
    for name in ("svi_AutoMultivariateNormal", "svi_AutoNormal", "nuts"):
        runs = result.get(name)
        if not runs:
            continue
        times = [_time_to(r["trace"], target) for r in runs]
        row = {"time_to_target_cpu_s": times, "time_to_target_mean": _mean(times), "reached": sum(t is not None for t in times),
               "kl_at_budget": {k: [_kl_at(r["trace"], b) for r in runs] for k, b in budgets.items()}}
        if name == "nuts":
            row["time_to_target_extrapolated"] = [_nuts_extrapolated_time(r, target) if t is None else t for r, t in zip(runs, times)]
        equal = row.get("time_to_target_extrapolated", times)
        t_eq = _mean(equal) if all(t is not None for t in equal) else None
        # observations beyond which training once and answering beats running this method per observation
        row["break_even_K"] = a["train_cpu_s"] / (t_eq - answer) if t_eq and t_eq > answer else None
        out["methods"][name] = row
    return out


def _machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "pyro": pyro.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def svi_config(args: argparse.Namespace | None = None) -> dict:
    """The SVI recipe from the command line (shared by both families); ``None``: the tuned defaults."""
    args = _parser().parse_args([]) if args is None else args
    return {"steps": args.svi_steps, "lr": args.svi_lr, "lr_decay": args.svi_lr_decay, "particles": args.svi_particles,
            "init_scale": args.svi_init_scale, "eval_every": args.eval_every, "window": args.window,
            "rel_tol": args.rel_tol, "kl_tol": args.kl_tol}


#: ``--network deep_chain``: the sampling benchmark's deep network (64 latents, a chain of 30 of them, 32
#: observed nodes, depth 34), for the amortised guide beyond the bnlearn sizes
DEEP_CHAIN = dict(num_latent=64, chain=30, num_obs=32, seed=0)


def load_network(name: str) -> LinearGaussianNetwork:
    """A bnlearn network by name (``"ecoli70"``, ``"magic-niab"``) or ``"deep_chain"`` (:data:`DEEP_CHAIN`)."""
    if name == "deep_chain":
        from benchmarks.sampling import chain_network

        return chain_network(**DEEP_CHAIN)
    return LinearGaussianNetwork.from_name(name)


#: the methods of the table, as ``--only`` names them
METHODS = ("amortised", "svi", "nuts", "npe")


def _method_of(key: str) -> str | None:
    """The method (``--only`` choice) a result key holds, or ``None`` for config, machine and the rest."""
    if key.startswith("svi_"):
        return "svi"
    return key if key in METHODS else None


def _earlier_result(args) -> dict:
    """``--only``: the existing table's JSON, whose other methods are kept (same network, seed and observations)."""
    path = RESULTS / f"{_out_name(args)}.json"
    if not path.exists():
        raise SystemExit(f"--only re-runs some methods of an existing table, but {path} does not exist; run without --only first")
    earlier = json.loads(path.read_text())
    mismatch = [k for k in ("network", "seed", "num_obs", "baseline_obs") if earlier["config"].get(k) != getattr(args, k)]
    if mismatch:
        raise SystemExit(f"--only: {path} was run with other {', '.join(mismatch)}; re-run every method instead")
    return earlier


def _out_name(args) -> str:
    return args.out or ("amortization" if args.network == "ecoli70" else f"amortization_{args.network}")


def run(args) -> dict:
    """Every method on the same observations; returns the JSON-able result (see :func:`compare`)."""
    torch.set_num_threads(1)  # every method on one thread, so CPU seconds compare
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    result = {"config": vars(args), "machine": _machine()}
    network = load_network(args.network)
    result["network"] = {"name": args.network, "nodes": len(network.order), "latent": len(network.latent_sites),
                         "observed": len(network.observed_sites)}
    obs_all = network.sample_observations(args.num_obs, torch.Generator().manual_seed(args.seed + 1))
    obs_list = [{k: v[i] for k, v in obs_all.items()} for i in range(args.baseline_obs)]
    earlier = _earlier_result(args) if args.only is not None else {}
    keep = {k: v for k, v in earlier.items() if _method_of(k) not in (None, *args.only)}
    result.update(keep)
    done = {_method_of(k) for k in keep}
    if keep:
        result["kept_from_earlier_run"] = {"methods": sorted(done), "date_utc": earlier["machine"].get("date_utc"),
                                           "commit": earlier["machine"].get("commit"), "config": earlier["config"]}
    if "amortised" not in done:
        result["amortised"] = run_amortised(network, obs_all, obs_list, args)
    for family in args.svi_families if "svi" not in done else ():
        result[f"svi_{family}"] = run_svi(network, obs_list, family, svi_config(args), args.seed)
    nuts_obs = obs_list[: args.nuts_obs or args.baseline_obs]
    if "nuts" not in done:
        result["nuts"] = run_nuts(network, nuts_obs, args.nuts_warmup, args.nuts_samples, args.nuts_prefixes, args.seed)
    if args.npe_simulations and "npe" not in done:
        try:
            import sbi  # noqa: F401
        except ImportError:
            result["npe"] = {"note": 'sbi not installed: pip install -e ".[bench]"'}
        else:
            result["npe"] = run_npe(network, obs_list, args)
    result["comparison"] = compare(result)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return result


def _break_even(k) -> str:
    """The break-even K: below one observation the amortised guide is cheaper from the first (not "0.0")."""
    return "< 1 (from the first observation)" if k is not None and k < 1 else _f(k, ".1f")


def _f(x, fmt=".3g"):
    return "—" if x is None else format(x, fmt)


def _per_method_rows(r: dict) -> list:
    """The first table's rows: settings, convergence check, mean scores and CPU costs per observation."""
    c, a, cmp_ = r["config"], r["amortised"], r["comparison"]
    K, N = len(a["per_obs"]), c["num_obs"]

    def scores(objs):
        return " | ".join(_f(_mean([o[k] for o in objs]), ".4f") for k in ("kl", "mean_err", "sd_err"))

    rows = [f"| amortised default `StructuredGuide` ({a['flow']}, {a['num_layers']} {a['normalizer']} layers, hidden {tuple(a['hidden_sizes'])}, `skl`) | "
            f"{a['steps_done']} steps, lr 1e-2 cosine, batch 256, budget {c['steps']} steps / {c['train_budget']:.0f} s wall | "
            f"final skl loss {a['final_loss_mean_last_100']:.4f} (mean of last 100 steps) | {scores(a['per_obs'])} | "
            f"{_f(cmp_['amortised_answer_cpu_s'])} | {_f(a['train_cpu_s'])} | {_f(cmp_['budgets_cpu_s'][str(K)])} / {_f(cmp_['budgets_cpu_s'][str(N)])} |"]
    svi_settings = (f"{c['svi_steps']} steps, ClippedAdam lr {c['svi_lr']:g} decayed x{c['svi_lr_decay']:g} (lrd per step), "
                    f"{c['svi_particles']} particles (vectorised), init_scale {c['svi_init_scale']:g}, JitTrace_ELBO")
    for fam in c["svi_families"]:
        runs = r[f"svi_{fam}"]
        stops = [x["elbo_rule_stop"] for x in runs if x["elbo_rule_stop"]]
        check = (f"reverse-KL gap to the family optimum max {max(x['reverse_kl_gap_to_optimum'] for x in runs):.2g} nats "
                 f"(<= {c['kl_tol']:g}: {sum(x['converged'] for x in runs)}/{len(runs)} converged); family optimum's KL "
                 f"{_mean([x['family_optimum_kl'] for x in runs]):.4f}; ELBO rel. change over the last {c['window']} steps "
                 f"max {max(x['elbo_rel_change_last_window'] for x in runs):.1e}; the rule `rel. change < {c['rel_tol']:g}` "
                 f"stops at step {_f(_mean([s['step'] for s in stops]), '.0f')} ({len(stops)}/{len(runs)} obs) with KL "
                 f"{_f(_mean([s.get('kl') for s in stops]), '.3f')}")
        cost = _mean([x["cpu_s"] for x in runs])
        rows.append(f"| SVI `{fam}` | {svi_settings} | {check} | {scores([x['final'] for x in runs])} | {_f(cost)} | — | {_f(cost)} / {_f(cost)} |")
    nuts = r["nuts"]
    cost = _mean([x["cpu_s"] for x in nuts])
    prefix = ", ".join(f"{p['samples']}: {_mean([x['trace'][i]['kl'] for x in nuts]):.3f}" for i, p in enumerate(nuts[0]["trace"]))
    rows.append(f"| NUTS (JIT, dense mass) | {c['nuts_warmup']} warm-up + {c['nuts_samples']} samples, 1 chain, {len(nuts)} obs | "
                f"ESS min {_mean([x['ess_min'] for x in nuts]):.0f}, median {_mean([x['ess_median'] for x in nuts]):.0f}; "
                f"KL by samples kept: {prefix} | {scores([x['final'] for x in nuts])} | {_f(cost)} | — | {_f(cost)} / {_f(cost)} |")
    npe = r.get("npe")
    if npe and "per_obs" in npe:
        ans = _mean([o["cpu_s"] for o in npe["per_obs"]])
        rows.append(f"| sbi NPE (default MAF) | {npe['simulations']} simulations, early stopping ({npe['epochs']} epochs) | "
                    f"sbi's validation-loss early stopping | {scores(npe['per_obs'])} | {_f(ans)} | {_f(npe['train_cpu_s'])} | "
                    f"{_f(npe['train_cpu_s'] / K + ans)} / {_f(npe['train_cpu_s'] / N + ans)} |")
    elif npe:
        rows.append(f"| sbi NPE | {npe['note']} | | | | | | | |")
    return rows


#: the issue's protocol (#14): observations for SVI, for NUTS, NUTS warm-up and draws, NPE simulations, guide seconds
FULL_PROTOCOL = {"baseline_obs": 5, "nuts_obs": 3, "nuts_warmup": 500, "nuts_samples": 2000, "npe_simulations": 20000,
                 "train_budget": 300.0}


def _protocol(c: dict, r: dict) -> str:
    """"Full protocol" when every setting is at least :data:`FULL_PROTOCOL`'s, else "Reduced protocol"."""
    ran = {**c, "nuts_obs": len(r["nuts"])}
    return "Full protocol" if all(ran.get(k, 0) >= v for k, v in FULL_PROTOCOL.items()) else "Reduced protocol"


def _kept_note(r: dict) -> str:
    """`` Kept from ...``: which methods an ``--only`` run took from the earlier run, and when that ran."""
    kept = r.get("kept_from_earlier_run")
    if not kept:
        return ""
    return (f" Only {', '.join(m for m in METHODS if m not in kept['methods'])} re-run here; "
            f"{', '.join(kept['methods'])} kept from the run of {kept['date_utc']} (commit {kept['commit']}, same observations).")


def to_markdown(r: dict) -> str:
    c, a, cmp_, m = r["config"], r["amortised"], r["comparison"], r["machine"]
    K, N = len(a["per_obs"]), c["num_obs"]
    names = {"svi_AutoMultivariateNormal": "SVI `AutoMultivariateNormal`", "svi_AutoNormal": "SVI `AutoNormal`", "nuts": "NUTS"}
    lines = [
        f"# Amortised default guide vs tuned per-observation SVI, NUTS and NPE on {r['network']['name']}", "",
        f"{r['network']['name']}: linear-Gaussian network, {r['network']['nodes']} nodes, {r['network']['latent']} latent, "
        f"{r['network']['observed']} observed leaves; every posterior is a known Gaussian. **{_protocol(c, r)}**: every method on "
        f"the same {K} new observations (NUTS on {len(r['nuts'])}); the amortised guide also answers all {N} observations "
        f"({c['num_samples']} samples each) in one pass. Times are process CPU seconds on one torch thread (scoring not timed; "
        f"wall seconds are in the JSON), on a shared, loaded 2-core machine. KL = exact `KL(p(z|x) || q(z|x))` in nats; "
        f"mean error = worst latent's |mean_q - mean_p| / sd_p; sd error = worst |sd_q / sd_p - 1|.", "",
        f"Run {m['date_utc']}, commit {m['commit']}, load average {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
        f"at the start and {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])} at the end; {m['platform']}, "
        f"torch {m['torch']}, pyro {m['pyro']}, seed {c['seed']}." + _kept_note(r), "",
        "| method | settings | convergence check | exact KL | mean error (sd) | sd error | CPU s per obs (answer / run) | "
        f"one-off training CPU s | CPU s per obs incl. training, K = {K} / {N} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *_per_method_rows(r), "",
        f"The amortised guide's KL over all {N} observations: {a['kl_mean_all']:.4f}; all {N} x {c['num_samples']} samples "
        f"in {a['batch_cpu_s']:.2f} CPU s ({a['batch_cpu_s'] / N:.2e} s per observation).", "",
        f"## Time at equal accuracy (target: the amortised guide's mean KL, {cmp_['target_kl']:.4f} nats)", "",
        "| method | CPU s per observation to reach it | observations that reach it | break-even K (amortised cheaper beyond) |",
        "|---|---:|---:|---:|",
    ]
    for key, row in cmp_["methods"].items():
        t = _f(row["time_to_target_mean"])
        if key == "nuts" and row["reached"] < len(row["time_to_target_cpu_s"]):
            t = f"{_f(_mean(row['time_to_target_extrapolated']))} (extrapolated, KL ~ 1/samples)"
        lines.append(f"| {names[key]} | {t} | {row['reached']}/{len(row['time_to_target_cpu_s'])} | {_break_even(row['break_even_K'])} |")
    b = cmp_["budgets_cpu_s"]
    lines += ["", "## Accuracy at equal time", "",
              f"Budget per observation = the amortised guide's training / K + its answer time: K = {K}: {b[str(K)]:.3g} s; "
              f"K = {N}: {b[str(N)]:.3g} s. Each peer's mean exact KL after that much CPU time per observation "
              "(— : no estimate yet, e.g. NUTS still in warm-up):", "",
              f"| method | KL at K = {K} budget | KL at K = {N} budget |", "|---|---:|---:|",
              f"| amortised default guide | {cmp_['target_kl']:.4f} | {cmp_['target_kl']:.4f} |"]
    for key, row in cmp_["methods"].items():
        kls = row["kl_at_budget"]
        cell = lambda k: "—" if any(x is None for x in kls[k]) else f"{_mean(kls[k]):.4f}"  # noqa: E731
        lines.append(f"| {names[key]} | {cell(str(K))} | {cell(str(N))} |")
    d = r["network"]["latent"]
    lines += ["", "Notes:",
              "- NUTS's KL is that of the Gaussian moment-matched to its samples: with n effective draws in d dimensions its "
              f"Monte Carlo floor is about (d/2 + d(d+1)/4) / n nats ({(d / 2 + d * (d + 1) / 4) / 1000:.2g} for d = {d}, "
              "n = 1000), so its moment errors are the fairer comparison.",
              "- The amortised and NPE KLs are unbiased estimates E_p[log p - log q] with "
              f"{c['kl_samples']} exact posterior samples per observation; their moment errors use {c['moment_samples']} draws."]
    if r["network"]["name"] == "ecoli70":
        lines.append("- The previous version of this table scored AutoMultivariateNormal with its unit lower-triangular `scale_tril` "
                     "parameter alone (the covariance factor is `scale[:, None] * scale_tril`), and ran 2,000 one-particle steps.")
    if c.get("note"):
        lines.append(f"- {c['note']}")
    return "\n".join(lines) + "\n"


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks amortization", description=__doc__.splitlines()[0])
    p.add_argument("--network", default="ecoli70", help="a bnlearn network name, or deep_chain (64 latents, depth 34)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of the default guide (cosine schedule)")
    p.add_argument("--train-budget", type=float, default=300.0, help="wall-clock seconds for the guide's training")
    p.add_argument("--num-obs", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=1000, help="posterior samples per observation (the timed task)")
    p.add_argument("--kl-samples", type=int, default=2000)
    p.add_argument("--moment-samples", type=int, default=10000)
    p.add_argument("--baseline-obs", type=int, default=5)
    p.add_argument("--svi-families", nargs="*", default=list(SVI_FAMILIES), choices=list(SVI_FAMILIES))
    p.add_argument("--svi-steps", type=int, default=3000)
    p.add_argument("--svi-lr", type=float, default=0.05)
    p.add_argument("--svi-lr-decay", type=float, default=0.01, help="the learning rate's total decay factor over the run")
    p.add_argument("--svi-particles", type=int, default=64)
    p.add_argument("--svi-init-scale", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--window", type=int, default=250, help="ELBO window of the convergence check (a multiple of --eval-every)")
    p.add_argument("--rel-tol", type=float, default=1e-3, help="the ELBO rule: relative change of windowed means below this")
    p.add_argument("--kl-tol", type=float, default=0.01, help="converged: reverse-KL gap to the family optimum below this")
    p.add_argument("--nuts-obs", type=int, default=3, help="observations for NUTS (0: --baseline-obs)")
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=2000)
    p.add_argument("--nuts-prefixes", type=int, nargs="*", default=[100, 250, 500, 1000, 2000])
    p.add_argument("--npe-simulations", type=int, default=20000, help="0: no NPE row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a note added to the table")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny budgets; prints but does not write results")
    p.add_argument("--only", nargs="*", default=None, choices=METHODS,
                   help="re-run only these methods and keep the others from the existing table's JSON (same network and seed)")
    p.add_argument("--out", default=None, help="results file stem (default: amortization for ecoli70, amortization_NETWORK else)")
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    if args.window % args.eval_every:
        raise SystemExit(f"--window ({args.window}) must be a multiple of --eval-every ({args.eval_every})")
    if args.quick:
        args.steps, args.train_budget, args.num_obs, args.num_samples, args.kl_samples, args.moment_samples = 30, 30.0, 20, 50, 50, 200
        args.baseline_obs, args.nuts_obs, args.nuts_samples, args.nuts_warmup, args.nuts_prefixes = 2, 1, 40, 30, [20]
        args.svi_steps, args.eval_every, args.window, args.npe_simulations = 40, 10, 20, 500 if args.npe_simulations else 0
    result = run(args)
    table = to_markdown(result)
    print(table)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = _out_name(args)
        (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{out}.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
