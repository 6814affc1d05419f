"""What a zoo entry holds (:class:`ZooModel`) and how its latents are named coordinate by coordinate."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import pyro
import torch

__all__ = ["ZooModel", "coordinate_names", "flatten_latents"]


@dataclass
class ZooModel:
    """One ordinary Pyro model of the zoo at one fixed observation.

    Attributes:
        name: registry key (also the key in ``references.json``).
        description: one line: what the model is and where it comes from.
        model: the Pyro model, called as ``model(*args, **kwargs)``; its observed sites carry ``obs=``.
        args, kwargs: the model's non-random arguments (designs, known noise scales, sizes).
        observations: observed site name -> the fixed observed value (the site's shape).
        latents: the latent sample sites, in the model's order.
        nuts_model, to_latents: optional: an equivalent reparametrised model that NUTS samples
            better (a non-centred funnel, say), with the same arguments and observed sites, and
            ``to_latents(samples) -> {latent: (n, *shape)}`` mapping its draws to this model's latents.
        nuts_data: optional: the fixed observations as ``nuts_model``'s observed sites (when it names
            them differently, e.g. one vectorised site for a loop's ``y_0 ... y_{T-1}``).
        nuts_options: extra ``pyro.infer.NUTS`` options (``target_accept_prob``, ``max_tree_depth``).
    """

    name: str
    description: str
    model: Callable
    observations: Mapping[str, torch.Tensor]
    latents: tuple[str, ...]
    args: tuple = ()
    kwargs: Mapping = field(default_factory=dict)
    nuts_model: Callable | None = None
    to_latents: Callable | None = None
    nuts_data: Callable | None = None
    nuts_options: Mapping = field(default_factory=dict)

    def guide(self, **options):
        """``ps.StructuredGuide`` of this model (observed sites and arguments filled in); ``options`` pass through."""
        import pyro_struct as ps

        return ps.StructuredGuide(self.model, observed=list(self.observations), model_args=self.args,
                                  model_kwargs=dict(self.kwargs), **options)

    def conditioned(self, reparametrised: bool = False) -> Callable:
        """The model (or its ``nuts_model``) conditioned on the fixed observations, for MCMC."""
        if reparametrised and self.nuts_model is not None:
            data = self.nuts_data(self.observations) if self.nuts_data is not None else dict(self.observations)
            return pyro.poutine.condition(self.nuts_model, data=data)
        return pyro.poutine.condition(self.model, data=dict(self.observations))

    def latent_shapes(self) -> dict[str, tuple]:
        """Latent site -> its value's shape at the fixed observation (one prior run of the model)."""
        with torch.no_grad():
            tr = pyro.poutine.trace(self.conditioned()).get_trace(*self.args, **self.kwargs)
        missing = [s for s in self.latents if s not in tr.nodes]
        if missing:
            raise ValueError(f"zoo model {self.name!r} declares latents {missing} that it does not sample")
        return {s: tuple(tr.nodes[s]["value"].shape) for s in self.latents}


def coordinate_names(shapes: Mapping[str, tuple]) -> list[str]:
    """Scalar coordinate names, ``"mu"``, ``"theta[3]"``, ``"L[1,0]"``, of latents of these shapes."""
    names = []
    for site, shape in shapes.items():
        if not shape:
            names.append(site)
            continue
        for idx in itertools.product(*(range(n) for n in shape)):
            names.append(f"{site}[{','.join(map(str, idx))}]")
    return names


def flatten_latents(samples: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """``{coordinate: (n,)}`` from ``{site: (n, *shape)}`` draws (constrained values), in :func:`coordinate_names` order."""
    out = {}
    for site, shape in shapes.items():
        value = samples[site]
        if tuple(value.shape[1:]) != tuple(shape):
            raise ValueError(f"draws of {site!r} have shape {tuple(value.shape)}; expected (n, *{tuple(shape)})")
        flat = value.reshape(value.shape[0], -1)
        for j, name in enumerate(coordinate_names({site: shape})):
            out[name] = flat[:, j]
    return out
