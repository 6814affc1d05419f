"""Wall-clock training budgets for benchmarks, and the library's default learning rate."""

from __future__ import annotations

import inspect
import json
import time

__all__ = ["default_learning_rate", "fit_for", "apply_training_arguments"]


def default_learning_rate() -> float:
    """``pyro_struct.training.fit``'s default learning rate (recorded with every table)."""
    from pyro_struct.training import fit

    return float(inspect.signature(fit).parameters["lr"].default)


def fit_for(guide, budget: float, **fit_options) -> tuple[list[float], float]:
    """Train ``guide`` for ``budget`` wall-clock seconds (``fit(time_budget=...)``: the cosine
    schedule follows elapsed time, so every row gets a complete schedule).

    Returns:
        the loss history and the seconds actually spent (standardisation included).
    """
    t0 = time.perf_counter()
    guide.fit(num_steps=10**9, time_budget=budget, progress=False, **fit_options)
    return list(guide.history), time.perf_counter() - t0


def apply_training_arguments(args) -> None:
    """Settle the parsed ``--threads``, ``--lr`` (default: ``fit``'s) and ``--flow-options`` (JSON) in place."""
    import torch

    torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = default_learning_rate()
    args.flow_options = json.loads(args.flow_options)
