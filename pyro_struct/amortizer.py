"""How a guide turns observations into a conditioned flow and samples/scores latents: the per-coordinate, the plate, the nested plate and the chain path.

A :class:`~pyro_struct.StructuredGuide` talks to its compiled flow only through one of these
objects, so the per-coordinate flow (one flow coordinate per scalar latent, a fixed data-set size),
the shared-weight plate flow (any number of plate members), the nested plate flow (any number
of groups and members) and the shared-weight chain flow (any number of time steps) plug into the same guide, objectives and posteriors. All expose the same
members; a *context* is whatever :meth:`condition` returns and is passed back unchanged (a tensor,
a :class:`PlateContext`, a :class:`NestedPlateContext` or a :class:`ChainContext`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from .flows.base import base_noise
from .layout import LatentLayout, NestedPlateLayout, ObservedLayout, PlateLayout

__all__ = ["FlatAmortizer", "PlateAmortizer", "PlateContext", "NestedPlateAmortizer", "NestedPlateContext", "ChainAmortizer",
           "ChainContext"]


class FlatAmortizer:
    """The per-coordinate path: the flow over the flat latent vector of the traced shapes.

    Args:
        flow: a :class:`~pyro_struct.flows.base.ConditionalFlow` over ``d`` latents.
        latent_layout, observed_layout: the layouts it was compiled with.
    """

    def __init__(self, flow, latent_layout: LatentLayout, observed_layout: ObservedLayout):
        self.flow, self.latent_layout, self.observed_layout = flow, latent_layout, observed_layout

    def latent_dim(self, context) -> int:
        """Coordinates of the flat unconstrained latent vector (the traced ``d``)."""
        return self.latent_layout.dim

    def condition(self, observations: Mapping[str, Any], where: str, check_finite: bool):
        """The standardised context ``(*batch, c)`` (or ``None``) and ``batch``."""
        flat, batch_shape = self.observed_layout.pack(observations, where, check_finite)
        return self.observed_layout.context(flat), batch_shape

    def sample_flat(self, context, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised ``u`` ``(n, *batch, d)`` (trace order) and ``log q(u)`` ``(n, *batch)``."""
        batch_shape, d, layout = torch.Size(batch_shape), self.latent_layout.dim, self.latent_layout
        if not torch.is_grad_enabled():
            # the flow maps its samples to trace order itself (StrAF folds that into its sampler)
            u, log_q = self.flow.draw(n, batch_shape, context, common_noise, layout.output_map())
            return u, log_q - layout.log_scale()
        eps = base_noise(layout.loc, n, batch_shape, (d,), common_noise)
        x = None if context is None else context.expand((n,) + batch_shape + context.shape[-1:])
        y, logdet = self.flow(eps, x)
        log_q = self.flow.base_log_prob(eps) - logdet - layout.log_scale()
        return layout.from_flow(y), log_q

    def flat_log_prob(self, flat: torch.Tensor, context) -> torch.Tensor:
        """``log q(u | x)`` ``(*batch,)`` of the flat unconstrained vector ``(*batch, d)``."""
        return self.flow.log_prob(self.latent_layout.to_flow(flat), context) - self.latent_layout.log_scale()

    def rsample(self, context, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Constrained samples site -> ``(n, *batch, *shape)`` and ``log q`` ``(n, *batch)``."""
        flat, log_q = self.sample_flat(context, n, batch_shape, common_noise)
        values, ladj = self.latent_layout.unpack(flat)
        return values, log_q - ladj

    def log_q(self, latents: Mapping[str, torch.Tensor], context, batch_shape: torch.Size) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents, Jacobians included."""
        flat, ladj = self.latent_layout.pack(latents, batch_shape)
        return self.flat_log_prob(flat, context) - ladj

    def latent_batch_shapes(self, values: Mapping[str, Any], context, where: str = "log_prob") -> list[torch.Size]:
        """The leading batch shape of every latent site's value (errors name the site)."""
        shapes = []
        for b in self.latent_layout.blocks:
            if b.name not in values:
                raise ValueError(f"{where}: missing value for latent site {b.name!r}; pass every latent site")
            shapes.append(b.check_shape(torch.as_tensor(values[b.name]), where, "the value"))
        return shapes

    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise latents and context by simulations site -> ``(n, *shape)``."""
        n = next(iter(simulations.values())).shape[0]
        u, _ = self.latent_layout.pack({s: simulations[s] for s in self.latent_layout.sites}, torch.Size((n,)))
        self.latent_layout.set_statistics(u)
        flat, _ = self.observed_layout.pack({s: simulations[s] for s in self.observed_layout.sites}, "standardisation", False)
        self.observed_layout.set_statistics(flat)

    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations site -> ``(n, *shape)``; latents unstandardised."""
        self.latent_layout.loc.zero_()
        self.latent_layout.scale.fill_(1.0)
        flat, _ = self.observed_layout.pack(observations, "standardisation", False)
        self.observed_layout.set_statistics(flat)


class PlateContext(NamedTuple):
    """A plate flow's context: global observations ``(*batch, cg)`` (or ``None``), member
    observations ``(*batch, N, ko)`` (standardised), ``N`` and the globals' pooled context
    (computed once per conditioning: the sampling and the density of one step share it)."""

    global_context: torch.Tensor | None
    member_obs: torch.Tensor
    num_members: int
    pooled: torch.Tensor | None = None
    #: ``N / B`` when the members are a subsample of ``B`` of a plate's ``N`` (see :meth:`PlateAmortizer.subsampled`)
    member_scale: float = 1.0


class PlateAmortizer:
    """The plate path: the shared-weight plate flow, answering data sets with any number of members.

    Args:
        flow: a :class:`~pyro_struct.flows.plated.PlatedStrAF`.
        layout: its :class:`~pyro_struct.layout.PlateLayout`.
    """

    def __init__(self, flow, layout: PlateLayout):
        self.flow, self.layout = flow, layout

    def latent_dim(self, context: PlateContext) -> int:
        """Coordinates of the flat unconstrained latent vector for ``context``'s ``N``."""
        return self.layout.num_globals + context.num_members * self.layout.member_dim

    def condition(self, observations: Mapping[str, Any], where: str, check_finite: bool):
        """A :class:`PlateContext` and ``batch``; ``N`` is read from the observations' plate dimension."""
        g_ctx, m_obs, batch, n = self.layout.observe(observations, where, check_finite)
        pooled = None if self.flow.global_flow is None else self.flow.global_context(g_ctx, m_obs)
        return PlateContext(g_ctx, m_obs, n, pooled), batch

    def subsampled(self, context: PlateContext, plate_size: int) -> PlateContext:
        """The context of a subsample: ``context``'s ``B`` members drawn from a plate of ``plate_size``.

        The globals' pooled summary takes the subsample's means as estimates of the data set's and
        ``log N`` of the full size; the members' terms of ``log q`` are weighted by ``N / B``, as
        Pyro scales the model's sites in a subsampled plate, so the ELBO of a guide call stays an
        unbiased estimate of the full data set's for this pooled input (the pooled summary itself is
        an estimate: the globals' conditional sees a subsample's means, not the data set's).
        Scores of such a context are for the guide call (its sites' Jacobians are scaled by Pyro).
        """
        pooled = None if self.flow.global_flow is None else self.flow.global_context(
            context.global_context, context.member_obs, plate_size)
        return context._replace(pooled=pooled, member_scale=plate_size / max(context.num_members, 1))

    def _sample(self, context: PlateContext, n: int, batch_shape: torch.Size, common_noise: bool):
        batch_shape, L = torch.Size(batch_shape), self.layout
        eps_g = base_noise(L.global_loc, n, batch_shape, (L.num_globals,), common_noise)
        eps_m = base_noise(L.global_loc, n, batch_shape, (context.num_members, L.member_dim), common_noise)
        w = context.member_scale
        y_g, y_m, logdet = self.flow(eps_g, eps_m, context.global_context, context.member_obs, context.pooled, w)
        # (log_scale is linear in the number of members: weighting the members is scaling their count)
        log_q_u = self.flow.base_log_prob(eps_g, eps_m, w) - logdet - L.log_scale(context.num_members * w)
        values, flat, ladj = L.unpack(y_g, y_m)
        return values, flat, log_q_u, ladj

    def sample_flat(self, context: PlateContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised ``u`` ``(n, *batch, D_N)`` (trace order, this ``N``) and ``log q(u)`` ``(n, *batch)``."""
        _, flat, log_q_u, _ = self._sample(context, n, batch_shape, common_noise)
        return flat, log_q_u

    def flat_log_prob(self, flat: torch.Tensor, context: PlateContext) -> torch.Tensor:
        """``log q(u | x)`` ``(*batch,)`` of the flat unconstrained vector ``(*batch, D_N)``."""
        sites = {s.name: s for s in self.layout.latent}
        unconstrained = self.layout.unflatten(flat, context.num_members)
        values = {k: sites[k].block.transform(u) for k, u in unconstrained.items()}
        return self.log_q(values, context, flat.shape[:-1], _add_jacobian=True)

    def rsample(self, context: PlateContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Constrained samples site -> ``(n, *batch, *shape)`` (plate dimension ``N``) and ``log q`` ``(n, *batch)``."""
        values, _, log_q_u, ladj = self._sample(context, n, batch_shape, common_noise)
        return values, log_q_u - ladj

    def log_q(self, latents: Mapping[str, torch.Tensor], context: PlateContext, batch_shape: torch.Size,
              _add_jacobian: bool = False) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents with ``N`` members, Jacobians included."""
        y_g, y_m, ladj = self.layout.pack(latents, batch_shape, context.num_members)
        w = context.member_scale
        log_q_u = (self.flow.log_prob(y_g, y_m, context.global_context, context.member_obs, context.pooled, w)
                   - self.layout.log_scale(context.num_members * w))
        return log_q_u if _add_jacobian else log_q_u - ladj

    def latent_batch_shapes(self, values: Mapping[str, Any], context: PlateContext, where: str = "log_prob") -> list[torch.Size]:
        """The common batch shape of the latent values (their plate size must be the context's ``N``)."""
        return [self.layout.latent_batch_shape(values, context.num_members, where)]

    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise per global coordinate and per member coordinate (shared by the members)."""
        self.layout.set_statistics(simulations)

    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations site -> ``(*batch, *shape)``; latents unstandardised."""
        self.layout.set_observed_statistics(observations)


class NestedPlateContext(NamedTuple):
    """A nested plate flow's context: global observations ``(*batch, cg)`` (or ``None``), group
    observations ``(*batch, G, ch)``, member observations ``(*batch, G, M, ko)`` (standardised),
    ``(G, M)`` and the globals' pooled context (computed once per conditioning)."""

    global_context: torch.Tensor | None
    group_obs: torch.Tensor
    member_obs: torch.Tensor
    sizes: tuple
    pooled: torch.Tensor | None = None


class NestedPlateAmortizer:
    """The nested plate path: the shared-weight flow over groups and their members, answering any ``G`` and ``M``.

    Args:
        flow: a :class:`~pyro_struct.flows.nested.NestedPlatedStrAF`.
        layout: its :class:`~pyro_struct.layout.NestedPlateLayout`.
    """

    def __init__(self, flow, layout: NestedPlateLayout):
        self.flow, self.layout = flow, layout

    def latent_dim(self, context: NestedPlateContext) -> int:
        """Coordinates of the flat unconstrained latent vector at ``context``'s sizes."""
        return self.layout.latent_dim(context.sizes)

    def condition(self, observations: Mapping[str, Any], where: str, check_finite: bool):
        """A :class:`NestedPlateContext` and ``batch``; ``(G, M)`` are read from the observations."""
        g_ctx, h_obs, m_obs, batch, sizes = self.layout.observe(observations, where, check_finite)
        return NestedPlateContext(g_ctx, h_obs, m_obs, sizes, self.flow.global_context(g_ctx, h_obs, m_obs)), batch

    def subsampled(self, context: NestedPlateContext, plate_size: int) -> NestedPlateContext:
        """Subsampling is not supported by the nested plate flow: a ``ValueError`` naming the plates."""
        raise ValueError(
            f"the nested plate guide (plates {self.layout.plates[0]!r}/{self.layout.plates[1]!r}) does not subsample: "
            "run the model without subsample_size on these plates (the guide's cost is linear in G x M)"
        )

    def _sample(self, context: NestedPlateContext, n: int, batch_shape: torch.Size, common_noise: bool):
        batch_shape, L = torch.Size(batch_shape), self.layout
        (t, h, k), (G, M) = L.dims, context.sizes
        ref = L.global_loc
        eps = (base_noise(ref, n, batch_shape, (t,), common_noise), base_noise(ref, n, batch_shape, (G, h), common_noise),
               base_noise(ref, n, batch_shape, (G, M, k), common_noise))
        *ys, logdet = self.flow(*eps, context.global_context, context.group_obs, context.member_obs, context.pooled)
        log_q_u = self.flow.base_log_prob(*eps) - logdet - L.log_scale(context.sizes)
        values, flat, ladj = L.unpack(*ys)
        return values, flat, log_q_u, ladj

    def sample_flat(self, context: NestedPlateContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised ``u`` ``(n, *batch, D)`` (trace order, these sizes) and ``log q(u)`` ``(n, *batch)``."""
        _, flat, log_q_u, _ = self._sample(context, n, batch_shape, common_noise)
        return flat, log_q_u

    def flat_log_prob(self, flat: torch.Tensor, context: NestedPlateContext) -> torch.Tensor:
        """``log q(u | x)`` ``(*batch,)`` of the flat unconstrained vector ``(*batch, D)``."""
        sites = {s.name: s for s in self.layout.latent}
        values = {k: sites[k].block.transform(u) for k, u in self.layout.unflatten(flat, context.sizes).items()}
        return self.log_q(values, context, flat.shape[:-1], _add_jacobian=True)

    def rsample(self, context: NestedPlateContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Constrained samples site -> ``(n, *batch, *shape)`` at the context's sizes and ``log q`` ``(n, *batch)``."""
        values, _, log_q_u, ladj = self._sample(context, n, batch_shape, common_noise)
        return values, log_q_u - ladj

    def log_q(self, latents: Mapping[str, torch.Tensor], context: NestedPlateContext, batch_shape: torch.Size,
              _add_jacobian: bool = False) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents at the context's sizes, Jacobians included."""
        y_t, y_h, y_m, ladj = self.layout.pack(latents, batch_shape, context.sizes)
        log_q_u = (self.flow.log_prob(y_t, y_h, y_m, context.global_context, context.group_obs, context.member_obs,
                                      context.pooled) - self.layout.log_scale(context.sizes))
        return log_q_u if _add_jacobian else log_q_u - ladj

    def latent_batch_shapes(self, values: Mapping[str, Any], context: NestedPlateContext, where: str = "log_prob") -> list[torch.Size]:
        """The common batch shape of the latent values (their sizes must be the context's)."""
        return [self.layout.latent_batch_shape(values, context.sizes, where)]

    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise per coordinate of each level (shared by the groups / members)."""
        self.layout.set_statistics(simulations)

    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations site -> ``(*batch, *shape)``; latents unstandardised."""
        self.layout.set_observed_statistics(observations)


class ChainContext(NamedTuple):
    """A chain flow's context: global observations ``(*batch, cg)`` (or ``None``), chain observations
    ``(*batch, T, ko)`` (standardised), ``T``, and the summaries computed once per conditioning
    (``h_t`` ``(*batch, T, S)`` and the globals' pooled context)."""

    global_context: torch.Tensor | None
    obs: torch.Tensor
    length: int
    summary: torch.Tensor
    pooled: torch.Tensor | None = None


class ChainAmortizer:
    """The chain path: the shared-weight chain flow, answering chains of any length.

    Args:
        flow: a :class:`~pyro_struct.flows.chain.ChainFlow`.
        layout: its :class:`~pyro_struct.chain_layout.ChainLayout`.
    """

    def __init__(self, flow, layout):
        self.flow, self.layout = flow, layout

    def latent_dim(self, context: ChainContext) -> int:
        """Coordinates of the flat unconstrained latent vector for ``context``'s ``T``."""
        return self.layout.num_globals + context.length * self.layout.step_dim

    def condition(self, observations: Mapping[str, Any], where: str, check_finite: bool):
        """A :class:`ChainContext` and ``batch``; ``T`` is read from the observed sites' names."""
        g_ctx, obs, batch, T = self.layout.observe(observations, where, check_finite)
        summary = self.flow.summaries(obs)
        return ChainContext(g_ctx, obs, T, summary, self.flow.global_context(g_ctx, obs, summary)), batch

    def _sample(self, context: ChainContext, n: int, batch_shape: torch.Size, common_noise: bool):
        batch_shape, L = torch.Size(batch_shape), self.layout
        eps_g = base_noise(L.global_loc, n, batch_shape, (L.num_globals,), common_noise)
        eps_s = base_noise(L.global_loc, n, batch_shape, (context.length, L.step_dim), common_noise)
        c = context
        y_g, y_s, logdet = self.flow(eps_g, eps_s, c.global_context, c.obs, c.summary, c.pooled)
        log_q_u = self.flow.base_log_prob(eps_g, eps_s) - logdet - L.log_scale(c.length)
        values, flat, ladj = L.unpack(y_g, y_s)
        return values, flat, log_q_u, ladj

    def sample_flat(self, context: ChainContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised ``u`` ``(n, *batch, D_T)`` (the layout's site order) and ``log q(u)`` ``(n, *batch)``."""
        _, flat, log_q_u, _ = self._sample(context, n, batch_shape, common_noise)
        return flat, log_q_u

    def flat_log_prob(self, flat: torch.Tensor, context: ChainContext) -> torch.Tensor:
        """``log q(u | x)`` ``(*batch,)`` of the flat unconstrained vector ``(*batch, D_T)``."""
        unconstrained = self.layout.unflatten(flat, context.length)
        values = {k: self.layout.block(k).transform(u) for k, u in unconstrained.items()}
        return self.log_q(values, context, flat.shape[:-1], _add_jacobian=True)

    def rsample(self, context: ChainContext, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Constrained samples site -> ``(n, *batch, *shape)`` (``T`` steps) and ``log q`` ``(n, *batch)``."""
        values, _, log_q_u, ladj = self._sample(context, n, batch_shape, common_noise)
        return values, log_q_u - ladj

    def log_q(self, latents: Mapping[str, torch.Tensor], context: ChainContext, batch_shape: torch.Size,
              _add_jacobian: bool = False) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents of ``T`` steps, Jacobians included."""
        c = context
        y_g, y_s, ladj = self.layout.pack(latents, batch_shape, c.length)
        log_q_u = self.flow.log_prob(y_g, y_s, c.global_context, c.obs, c.summary, c.pooled) - self.layout.log_scale(c.length)
        return log_q_u if _add_jacobian else log_q_u - ladj

    def latent_batch_shapes(self, values: Mapping[str, Any], context: ChainContext, where: str = "log_prob") -> list[torch.Size]:
        """The common batch shape of the latent values (sites of the context's ``T`` steps)."""
        return [self.layout.latent_batch_shape(values, context.length, where)]

    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise per global coordinate and per step coordinate (shared by the steps)."""
        self.layout.set_statistics(simulations)

    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations site -> ``(*batch, *shape)``; latents unstandardised."""
        self.layout.set_observed_statistics(observations)
