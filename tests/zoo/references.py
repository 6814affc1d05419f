"""NUTS reference moments of every zoo model at its fixed observation, written to ``tests/zoo/references.json``.

Run once (``python -m tests.zoo.references [--models a b] [--chains 2 --warmup 500 --samples 1500]``);
the file is committed. For each model: the mean and sd of every scalar latent coordinate in the
model's constrained space over all chains' draws, the split R-hat and effective sample size of each
coordinate, the divergent transitions, the settings and the seconds NUTS took. Models with a
``nuts_model`` (centred eight schools, the funnel, baseball, and the two ``pyro.markov`` loops as
one vectorised site) are sampled in their non-centred form, which has the same posterior and no
funnel for NUTS to diverge in, and mapped back.
Re-running for some ``--models`` updates their entries and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from .models import MODELS
from .registry import ZooModel, flatten_latents

__all__ = ["REFERENCES", "load_references", "nuts_draws", "reference_entry", "main"]

REFERENCES = Path(__file__).resolve().parent / "references.json"


def load_references(path: str | os.PathLike = REFERENCES) -> dict:
    """The committed reference file: ``{"settings": ..., "models": {name: entry}}``."""
    return json.loads(Path(path).read_text())


def _chain(m: ZooModel, warmup: int, samples: int, seed: int, jit: bool) -> tuple[dict, int]:
    """One NUTS chain: ``({latent: (samples, *shape)}, divergences)`` in the model's own latents."""
    pyro.set_rng_seed(seed)
    reparametrised = m.nuts_model is not None
    options = {"target_accept_prob": 0.9, **m.nuts_options}
    kernel = NUTS(m.conditioned(reparametrised), jit_compile=jit, ignore_jit_warnings=True, **options)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(*m.args, **m.kwargs)
    draws = mcmc.get_samples()
    draws = m.to_latents(draws) if reparametrised else {s: draws[s] for s in m.latents}
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {s: draws[s].detach() for s in m.latents}, divergences


def nuts_draws(m: ZooModel, chains: int, warmup: int, samples: int, seed: int = 0, jit: bool = True):
    """``({coordinate: (chains, samples)}, divergences, seconds)`` of ``chains`` sequential NUTS chains."""
    shapes = m.latent_shapes()
    t0 = time.perf_counter()
    per_chain, divergences = [], 0
    for c in range(chains):
        draws, div = _chain(m, warmup, samples, seed + c, jit)
        per_chain.append(flatten_latents(draws, shapes))
        divergences += div
    seconds = time.perf_counter() - t0
    coords = {k: torch.stack([ch[k] for ch in per_chain]) for k in per_chain[0]}
    return coords, divergences, seconds


def reference_entry(m: ZooModel, chains: int, warmup: int, samples: int, seed: int = 0, jit: bool = True) -> dict:
    """The JSON entry of one model: per-coordinate mean, sd, R-hat, ESS; observations; settings; seconds."""
    coords, divergences, seconds = nuts_draws(m, chains, warmup, samples, seed, jit)
    stats = {}
    for name, x in coords.items():
        x = x.double()
        flat = x.reshape(-1)
        sd = float(flat.std())
        # a coordinate that is constant (the LKJ factor's zeros and its [0, 0] entry) has no R-hat or ESS
        constant = sd <= 1e-9 * max(1.0, float(flat.abs().max()))
        stats[name] = {
            "mean": float(flat.mean()),
            "sd": sd,
            "r_hat": None if constant else float(split_gelman_rubin(x)),
            "ess": None if constant else float(effective_sample_size(x)),
        }
    return {
        "description": m.description,
        "latents": list(m.latents),
        "coordinates": stats,
        "observations": {k: torch.as_tensor(v).tolist() for k, v in m.observations.items()},
        "sampled_as": "non-centred reparametrisation" if m.nuts_model is not None else "the model as written",
        "divergences": divergences,
        "seconds": seconds,
        "seconds_per_chain": seconds / chains,
        "settings": {"chains": chains, "warmup": warmup, "samples": samples, "seed": seed, "jit": jit,
                     "target_accept_prob": m.nuts_options.get("target_accept_prob", 0.9)},
    }


def _worst(entry: dict) -> str:
    rh = [c["r_hat"] for c in entry["coordinates"].values() if c["r_hat"] is not None]
    ess = [c["ess"] for c in entry["coordinates"].values() if c["ess"] is not None]
    return f"max r_hat {max(rh):.3f}, min ESS {min(ess):.0f}, divergences {entry['divergences']}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="zoo models to (re)compute (default: all)")
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1500, help="draws per chain after warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jit", action="store_true", help="run NUTS without pyro's JIT")
    p.add_argument("--out", default=str(REFERENCES))
    args = p.parse_args(argv)
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown zoo models {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    table = load_references(out) if out.exists() else {"models": {}}
    for name in names:
        entry = reference_entry(MODELS[name], args.chains, args.warmup, args.samples, args.seed, not args.no_jit)
        table["models"][name] = entry
        table["about"] = ("NUTS reference moments (pyro.infer.NUTS, sequential chains, one torch thread) of every "
                          "scalar latent coordinate in constrained space at each zoo model's fixed observation; "
                          f"written by python -m tests.zoo.references; torch {torch.__version__}, pyro {pyro.__version__}")
        out.write_text(json.dumps(table, indent=1) + "\n")  # after every model: a partial run is kept
        print(f"{name}: {entry['seconds']:.1f} s, {_worst(entry)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
