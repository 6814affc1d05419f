"""Entry point: ``python -m benchmarks NAME [options]`` runs one benchmark and saves its table."""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

BENCHMARKS = {
    "lgbn": "linear-Gaussian networks: exact KL of amortised guides vs baselines",
    "circuit": "arithmetic circuit: flows x structures x objectives at equal wall-clock",
    "circuit_seeds": "arithmetic circuit over seeds: learning curves by structure and by objective (Weilbach Figs. 2, 3)",
    "cnf_probe": "structured CNF on the circuit: cost of one field evaluation, NFE over training by option",
    "scaling": "compile time and time per step against model size",
    "compile_scaling": "trace and inversion time for HMMs and plated models",
    "masks": "greedy vs baseline mask paths and factorisation time",
    "flows": "faithful vs dense adjacency for each flow family",
    "amortization": "amortised default guide vs tuned per-observation SVI, NUTS and NPE: accuracy at equal time, time at equal accuracy",
    "sampling": "1,000 x 1,000 posterior samples of the default guide vs one density pass, up to depth 63",
    "distributed": "data-parallel training: simulations/s and time to a target KL for 1..K processes",
    "gpu_check": "GPU checks of every flow (sample, score, fit, save/load across devices); exits 0 without CUDA",
    "diagnostics": "trust: SBC coverage, Pareto-k, log-evidence error and refine, against sbi's SBC",
    "simulation": "simulations per second of ordinary models: batched (plate / vmap) vs per-sample",
    "plates": "plate guides: compile time, parameters, step time and exact KL for N = 10 ... 100,000",
    "nested_plates": "nested plate guides (groups with members): compile time, parameters, step time and exact KL up to G x M = 10^6",
    "subsample": "SVI with a subsampled data plate and the plate guide: ms per step for N = 1e3 ... 1e6 at B = 64",
    "designs": "a regression guide amortised over designs (covariates) vs per-data-set NUTS: KL, seconds per data set",
    "summary": "the lgbn and circuit tables side by side, checked against the goals",
    "causal": "interventions and counterfactuals: StrAF on the true DAG vs CAREFL vs regression",
    "density": "test NLL at small n: true / learned / dense DAG flows vs zuko MAF and NSF; SHD",
    "chains": "chain guides (chains='auto'): compile time, parameters, step time and exact KL for HMM / AR(1) T = 10 ... 1,000",
    "robust_fit": "the default fit on eight schools, the funnel and state spaces: skl options and flows vs NUTS moments",
    "zoo": "the default fit on 12 ordinary Pyro models (tests/zoo) against NUTS: worst mean error and sd ratio",
    "vae": "structured VAEs (SIReN-VAE Table 1): test NLL and reconstruction error per encoder, small and full data",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks NAME [options]   (or: pyro-struct bench NAME [options])\n\nbenchmarks:")
        for k, v in BENCHMARKS.items():
            print(f"  {k:<16} {v}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    if hasattr(module, "main"):
        rc = module.main(rest)
        return rc if isinstance(rc, int) else 0
    # script-style benchmark: run it as __main__ with its own argv
    sys.argv = [str(Path(module.__file__))] + rest
    runpy.run_path(module.__file__, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
