"""Find the sites a model observes only when given data (the ``def model(data=None): ... obs=data`` idiom)."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import pyro
import pyro.poutine as poutine
import pyro.util
import torch
from pyro.poutine.util import site_is_subsample

__all__ = ["find_observed_candidates"]

# Distinct (shape, dtype) draws tried per model argument: each try is one model run.
_MAX_TRIES = 8


def find_observed_candidates(model: Callable, *args, **kwargs) -> dict[str, str]:
    """Sample sites that carry ``obs=`` once a data argument left at ``None`` is given a value.

    For each parameter of ``model`` whose default is ``None`` and that ``args``/``kwargs`` do
    not set (or set to ``None``), the model is called with that argument set to a prior draw
    of one of its sample sites (one try per distinct shape and dtype, the sites last in trace
    order first), or to the draws of all sites of one shape stacked (``data[t]`` in a loop),
    at most ``_MAX_TRIES`` tries; the sample sites that are observed in that call but
    not in the call as given are reported. Tries where the model raises are skipped. Costs
    one model run plus at most ``_MAX_TRIES`` per such parameter; the global RNG state is
    restored afterwards.

    Args:
        model: a Pyro model.
        *args, **kwargs: the arguments the model is traced with.

    Returns:
        ``{site name: argument name}``, e.g. ``{"x": "data"}`` for
        ``def model(data=None): ... pyro.sample("x", ..., obs=data)``; empty when no such
        parameter exists, the model's signature cannot be read, or nothing becomes observed.
    """
    try:
        sig = inspect.signature(model)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [
        p.name for p in sig.parameters.values()
        if p.kind in kinds and p.default is None and bound.arguments.get(p.name) is None
    ]
    if not names:
        return {}
    rng_state = pyro.util.get_rng_state()
    try:
        pyro.set_rng_seed(0)
        baseline = _sample_sites(model, bound.args, bound.kwargs)
        if baseline is None:
            return {}
        already = {name for name, (_, observed) in baseline.items() if observed}
        draws = _distinct_draws(baseline)
        found: dict[str, str] = {}
        for arg in names:
            for draw in draws:
                trial = sig.bind_partial(*args, **kwargs)
                trial.arguments[arg] = draw.clone()
                sites = _sample_sites(model, trial.args, trial.kwargs)
                newly = [] if sites is None else [n for n, (_, obs) in sites.items() if obs and n not in already]
                if newly:
                    found.update({n: arg for n in newly if n not in found})
                    break
        return found
    finally:
        pyro.util.set_rng_state(rng_state)


def _sample_sites(model: Callable, args: tuple, kwargs: dict) -> dict | None:
    """``{site: (value, is_observed)}`` of one ordinary model run, or ``None`` if it raised."""
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- a value of the wrong shape for this argument: try another
        return None
    return {
        name: (site["value"], bool(site["is_observed"]))
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and isinstance(site["value"], torch.Tensor)
    }


def _distinct_draws(baseline: dict) -> list[torch.Tensor]:
    """One latent draw per distinct (shape, dtype), the sites last in trace order first; then,
    for each (shape, dtype) shared by several sites, their draws stacked (the data of a Python
    loop indexed as ``data[t]``). At most ``_MAX_TRIES``."""
    groups: dict = {}
    for value, observed in reversed(list(baseline.values())):
        if not observed:
            groups.setdefault((tuple(value.shape), value.dtype), []).append(value.detach())
    singles = [values[0] for values in groups.values()]
    stacks = [torch.stack(values[::-1]) for values in groups.values() if len(values) > 1]
    return (singles + stacks)[:_MAX_TRIES]
