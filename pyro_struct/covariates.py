"""Covariates: tensor model arguments (the ``X`` of a regression) traced as observed, non-random nodes of the BayesNet.

A covariate is a model argument that the user names (``StructuredGuide(model, covariates=["X"])``).
For tracing, :func:`covariate_model` wraps the model so that each covariate first passes through an
observed sample site of the same name whose distribution has a zero log density
(:class:`CovariateValue`): the tracer then treats its elements as observed nodes and finds their
element-level edges like any other dependency, and the inverse takes them as conditioning inputs.
Simulation runs the model itself with the covariates as arguments and attaches their values to
the simulations (:func:`covariate_values`), so the flow's context includes them.

A covariate whose leading dimension has the size of one of the model's vectorised plates is taken
as one row per member of that plate (``X`` of shape ``(N, p)`` in ``pyro.plate("data", N)``): its
rows then feed the member's conditioner of a plate guide, like the member's observations. When
the plate runs with fewer members (a plate template, a subsample) the site takes those members'
rows, so a design of any size is traced through the few-member template.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from .errors import ModelStructureError

__all__ = ["CovariateValue", "check_covariates", "covariate_values", "with_arguments", "covariate_model", "mark_covariates"]

# Relative jitter of a covariate's value in tracing runs: an element that is exactly zero in the
# traced design must not hide its edges (``X[i, j] * w[j]`` has no gradient in ``w[j]`` at
# ``X[i, j] = 0``), while signs stay as given (a model may take ``log X``).
_JITTER = 0.05


class CovariateValue(TorchDistribution):
    """The distribution of a covariate's tracing site: its draws are the given ``value`` (elementwise
    jittered in its magnitude when ``jitter``), its log density is zero. Batch shape ``value.shape``."""

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, value: torch.Tensor, jitter: bool = True):
        self.value, self.jitter = value, jitter
        super().__init__(value.shape, torch.Size(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return CovariateValue(self.value.expand(batch_shape), self.jitter)

    def sample(self, sample_shape=torch.Size()):
        v = self.value.detach().expand(torch.Size(sample_shape) + self.value.shape)
        if not (self.jitter and v.is_floating_point()):
            return v.clone()
        eps = torch.randn(v.shape, dtype=v.dtype, device=v.device)
        # zeros move by a small absolute amount, everything else keeps its sign
        return torch.where(v == 0, _JITTER * eps, v * torch.exp(_JITTER * eps))

    def log_prob(self, value):
        return torch.zeros(torch.broadcast_shapes(value.shape, self.batch_shape), dtype=torch.get_default_dtype())


def _signature(model: Callable) -> inspect.Signature | None:
    try:
        # a PyroModule's __call__ takes (*args, **kwargs); its forward names the arguments
        return inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
    except (TypeError, ValueError):
        return None


def _bound(model: Callable, args: Sequence, kwargs: Mapping, where: str) -> inspect.BoundArguments:
    sig = _signature(model)
    if sig is None:
        raise ModelStructureError(f"{where}: covariates need a model whose signature inspect.signature can read")
    try:
        return sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ModelStructureError(f"{where}: the model's arguments do not bind to its signature: {e}") from e


def check_covariates(model: Callable, names: Sequence[str] | str | None) -> tuple[str, ...]:
    """The covariate names, checked against ``model``'s signature (an error names a covariate it does not take)."""
    if names is None:
        return ()
    names = (names,) if isinstance(names, str) else tuple(names)
    sig = _signature(model)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"covariates must be model argument names (str); got {name!r}")
        if sig is not None and name not in sig.parameters:
            raise ValueError(
                f"covariates names {name!r}, which the model {getattr(model, '__name__', model)!r} does not take; "
                f"its arguments are {list(sig.parameters)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"covariates names an argument twice: {list(names)}")
    return names


def covariate_values(model: Callable, args: Sequence, kwargs: Mapping, names: Sequence[str], where: str = "compile") -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the covariates ``names`` in a call ``model(*args, **kwargs)`` (positional
    arguments matched by parameter name). Errors name the argument: missing, or not a tensor."""
    if not names:
        return {}
    bound = _bound(model, args, kwargs, where)
    out = {}
    for name in names:
        if name not in bound.arguments or bound.arguments[name] is None:
            raise ValueError(f"{where}: covariate {name!r} has no value; pass it to the model (model_args/model_kwargs, or the call's arguments)")
        value = bound.arguments[name]
        if not torch.is_tensor(value):
            raise TypeError(f"{where}: covariate {name!r} must be a tensor; got {type(value).__name__}")
        out[name] = value
    return out


def with_arguments(model: Callable, args: Sequence, kwargs: Mapping, updates: Mapping[str, Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``model`` with the arguments ``updates`` replaced or added by name (a
    positional argument is replaced in place rather than passed twice)."""
    sig = _signature(model)
    if sig is None or not updates:
        return tuple(args), {**kwargs, **updates}
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return tuple(args), {**kwargs, **updates}
    rest = {}
    for name, value in updates.items():
        if name in sig.parameters and sig.parameters[name].kind is not inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = value
        else:
            rest[name] = value
    return tuple(bound.args), {**bound.kwargs, **rest}


def _plates_of(model: Callable, args: Sequence, kwargs: Mapping) -> dict[str, tuple]:
    """``{site: ((plate, dim, size), ...)}`` of one plain run of the model (vectorised plates)."""
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    return {
        name: tuple((f.name, int(f.dim), int(f.size)) for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None)
        for name, site in tr.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    }


def _member_plate(value: torch.Tensor, plates: set) -> tuple | None:
    """The plate ``(name, dim, size)`` whose members are the rows of ``value`` (leading dimension of
    the plate's size, and room for the plate's dim), or ``None``."""
    fits = [p for p in plates if value.dim() >= 1 and value.shape[0] == p[2] and value.dim() + p[1] >= 0]
    return fits[0] if len(fits) == 1 else None


def covariate_model(model: Callable, names: Sequence[str], args: Sequence, kwargs: Mapping) -> Callable:
    """The model to trace: each covariate passes first through an observed site of its name
    (:class:`CovariateValue`, inside its plate when its rows are plate members), then the model
    runs with the site's value in place of the argument. Raises when a covariate's name is also a
    sample site of the model."""
    values = covariate_values(model, args, kwargs, names)
    site_plates = _plates_of(model, args, kwargs)
    clash = [n for n in names if n in site_plates]
    if clash:
        raise ModelStructureError(f"covariate {clash[0]!r} has the name of a sample site of the model; rename the argument or the site")
    all_plates = {p for ps in site_plates.values() for p in ps}
    placement = {name: _member_plate(v, all_plates) for name, v in values.items()}

    def traced(*a, **kw):
        current = covariate_values(model, a, kw, names, "trace")
        updates = {}
        for name, value in current.items():
            plate = placement[name]
            if plate is None:
                site = pyro.sample(name, CovariateValue(value).to_event(value.dim()), obs=value)
            else:
                with pyro.plate(plate[0], plate[2], dim=plate[1]) as members:
                    # a plate run with fewer members (a template, a subsample) takes their rows
                    if members.numel() != value.shape[0]:
                        value = value.index_select(0, members.to(value.device))
                    site = pyro.sample(name, CovariateValue(value).to_event(value.dim() + plate[1]), obs=value)
            updates[name] = site
        a, kw = with_arguments(model, a, kw, updates)
        return model(*a, **kw)

    traced.__name__ = getattr(model, "__name__", "model")
    if getattr(model, "observed_sites", None) is not None:  # a model's declared observed sites, and the covariates
        traced.observed_sites = list(model.observed_sites) + [n for n in names if n not in model.observed_sites]
    return traced


def mark_covariates(bn, names: Sequence[str]) -> None:
    """Mark the covariate sites of a traced BayesNet (``SiteInfo.covariate`` and the nodes' ``covariate`` attribute)."""
    for name in names:
        info = bn.sites[name]
        info.covariate = True
        for label in info.nodes:
            bn.graph.nodes[label]["covariate"] = True
