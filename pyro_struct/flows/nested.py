"""A flow over nested plates: globals pool the groups' summaries, each group's latents pool its own members, weights shared throughout.

The flow is the amortised factorisation of a nested plate template
(:class:`~pyro_struct.plates.NestedPlateInverse`, groups ``g = 1..G`` with members ``m = 1..M``):

    q(theta | x) prod_g q(eta_g | theta, x_g) prod_m q(z_gm | theta, eta_g, x_gm)

- the globals ``theta`` ``(*batch, t)`` follow a flow (a :class:`~pyro_struct.flows.StrAF` by default; any
  family, as :class:`~pyro_struct.flows.plated.PlatedStrAF`) conditioned on the
  global observations and, per global ``j``, a two-level DeepSet over the coordinates the template
  lists as ``j``'s pooled parents: inside each group, the mean over its members of an embedding and
  of the member observations (the linear path); then over the groups, the mean of an embedding of
  those group summaries (with the group's own observations) and their linear means, plus
  ``log G`` and ``log M``. The linear path at both levels keeps a linear-Gaussian posterior exactly
  representable (its mean is linear in the group means at fixed sizes);
- each group's latents ``eta_g`` and its members' latents ``z_gm`` follow one
  :class:`~pyro_struct.flows.plated.PlatedStrAF` applied to every group as a batch: its "globals"
  are the group's latents (conditioned on ``theta``, the global and the group's observations, and a
  DeepSet over the group's own members), its members share one member StrAF.

Parameters do not depend on ``G`` or ``M``; groups must have equal numbers of members (the member
dimension of a Pyro plate inside a vectorised group plate is rectangular).

Example:
    >>> import torch
    >>> T = torch.ones
    >>> # mu pools x; theta_g <- (mu, x_g.); z_gm <- (theta_g, x_gm)
    >>> flow = NestedPlatedStrAF(torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 0, dtype=torch.bool),
    ...     T(1, 1, dtype=torch.bool), torch.tensor([[False, True]]), T(1, 1, dtype=torch.bool),
    ...     torch.tensor([[False, True, False, True]]), group_obs_dim=0, member_obs_dim=1)
    >>> y_t, y_h, y_m, log_q = flow.rsample_and_log_prob(None, torch.zeros(5, 0), torch.zeros(5, 7, 1), n=3)
    >>> y_t.shape, y_h.shape, y_m.shape, log_q.shape
    (torch.Size([3, 1]), torch.Size([3, 5, 1]), torch.Size([3, 5, 7, 1]), torch.Size([3]))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import MaskedStructure
from .plated import PlatedStrAF, broadcast_cat, deepset_phi, pool_members

__all__ = ["NestedPlatedStrAF"]


class NestedPlatedStrAF(MaskedStructure, nn.Module):
    """The nested plate flow over globals ``(*batch, t)``, group latents ``(*batch, G, h)`` and
    member latents ``(*batch, G, M, k)``.

    Args:
        global_adjacency: ``(t, t + cg)`` bool: global on earlier globals / global observations.
        global_pooled_groups: ``(t, ch)`` bool: the group observation coordinates a global pools.
        global_pooled_members: ``(t, ko)`` bool: the member observation coordinates a global pools.
        group_adjacency: ``(h, h + t + cg + ch)`` bool: a group latent on its group's earlier
            latents, the globals, the global observations, its group's observations.
        group_pooled: ``(h, ko)`` bool: the member observation coordinates a group latent pools
            (over its own group's members).
        member_adjacency: ``(k, k + h + t + cg + ch + ko)`` bool: a member latent on its member's
            earlier latents, its group's latents, the globals, the global and group observations,
            its own observations.
        group_obs_dim, member_obs_dim: ``ch`` and ``ko``.
        pool_dim, pool_hidden: DeepSet embedding size and hidden widths (every level).
        **flow_options: passed to every stage's flow (through :class:`~pyro_struct.flows.plated.PlatedStrAF`):
            ``family=`` the flow class of every stage (:class:`~pyro_struct.flows.StrAF` by default,
            ``GraphicalResidualFlow``, ``StructuredCNF``), ``num_layers``, ``hidden_sizes``, ...

    Shapes: global context ``(*batch, cg)`` or ``None``; group observations ``(*batch, G, ch)``;
    member observations ``(*batch, G, M, ko)``; leading dimensions broadcast.
    """

    def __init__(self, global_adjacency, global_pooled_groups, global_pooled_members, group_adjacency, group_pooled,
                 member_adjacency, group_obs_dim: int, member_obs_dim: int, pool_dim: int = 8,
                 pool_hidden: Sequence[int] = (32,), **flow_options):
        super().__init__()
        At, Pth, Ptm, Ah, Phm, Am = (torch.as_tensor(a).bool() for a in (
            global_adjacency, global_pooled_groups, global_pooled_members, group_adjacency, group_pooled, member_adjacency))
        t, ch, ko, h, k = At.shape[0], int(group_obs_dim), int(member_obs_dim), Ah.shape[0], Am.shape[0]
        cg = At.shape[1] - t
        for name, A, want in (("global_pooled_groups", Pth, (t, ch)), ("global_pooled_members", Ptm, (t, ko)),
                              ("group_pooled", Phm, (h, ko))):
            if tuple(A.shape) != want:
                raise ValueError(f"{name} must have shape {want}; got {tuple(A.shape)}")
        if h and Ah.shape[1] != h + t + cg + ch:
            raise ValueError(f"group_adjacency must have shape (h, h + t + cg + ch) = ({h}, {h + t + cg + ch}); got {tuple(Ah.shape)}")
        if k and Am.shape[1] != k + h + t + cg + ch + ko:
            raise ValueError(f"member_adjacency must have shape (k, k + h + t + cg + ch + ko); got {tuple(Am.shape)}")
        if t + h + k == 0:
            raise ValueError("a nested plate flow needs at least one global, group or member latent")
        self.num_globals, self.group_dim, self.member_dim = t, h, k
        self.global_context_dim, self.group_obs_dim, self.member_obs_dim = cg, ch, ko
        self.embedding_dim = e = int(pool_dim)
        self.register_buffer("pooled_members", Ptm, persistent=False)
        pool = {"pool_dim": e, "pool_hidden": pool_hidden}
        # level 1 of the globals' DeepSet: per global, the mean over a group's members
        self.phi_members = deepset_phi(ko + t, pool_hidden, e) if t else None
        # level 2: the globals' flow pools per-group features [per global: (e + ko) | group obs (ch) | log M]
        self.group_feature_dim = t * (e + ko) + ch + 1
        self.outer = PlatedStrAF(At, self._outer_pooled(Ptm, Pth), torch.zeros(0, 0, dtype=torch.bool),
                                 member_obs_dim=self.group_feature_dim, **pool, **flow_options) if t else None
        # every group: its latents pool its members, one member flow for all (a PlatedStrAF batched over groups)
        self.inner = PlatedStrAF(Ah, Phm, Am, member_obs_dim=ko, **pool, **flow_options) if h + k else None

    def _outer_pooled(self, Ptm: torch.Tensor, Pth: torch.Tensor) -> torch.Tensor:
        """``(t, group_feature_dim)``: global ``j`` pools its own level-1 block (embedding where it
        pools members, their linear means where it pools that coordinate), its group observations and ``log M``."""
        t, ko, e = Ptm.shape[0], Ptm.shape[1], self.embedding_dim
        P = torch.zeros(t, t, e + ko, dtype=torch.bool)
        pools = Ptm.any(1)
        for j in range(t):
            P[j, j, :e] = pools[j]
            P[j, j, e:] = Ptm[j]
        return torch.cat([P.reshape(t, -1), Pth, pools.unsqueeze(1)], 1)

    # ------------------------------------------------------------------ pieces
    def group_features(self, group_obs: torch.Tensor, member_obs: torch.Tensor) -> torch.Tensor:
        """Per-group inputs of the globals' pooling ``(*batch, G, group_feature_dim)``: the level-1
        DeepSet means over the group's members, the group's observations and ``log M``."""
        lead = torch.broadcast_shapes(group_obs.shape[:-1], member_obs.shape[:-2])
        level1 = pool_members(self.phi_members, self.pooled_members, member_obs).flatten(-2)
        log_m = member_obs.new_full(lead + (1,), math.log(max(member_obs.shape[-2], 1)))
        return broadcast_cat([level1, group_obs, log_m])

    def global_context(self, global_ctx, group_obs, member_obs) -> torch.Tensor | None:
        """The globals' flow context ``(*batch, c)`` (``None`` without globals): computed once per conditioning."""
        if self.outer is None:
            return None
        return self.outer.global_context(global_ctx, self.group_features(group_obs, member_obs))

    def group_context(self, y_globals, global_ctx, group_obs) -> torch.Tensor | None:
        """Each group's context ``(*batch, G, t + cg + ch)`` (the inner flow's global context)."""
        G = group_obs.shape[-2]

        def per_group(v):
            return None if v is None else v.unsqueeze(-2).expand(v.shape[:-1] + (G, v.shape[-1]))

        parts = [per_group(y_globals), per_group(global_ctx), group_obs]
        if sum(p.shape[-1] for p in parts if p is not None) == 0:
            return None
        return broadcast_cat(parts)

    # ------------------------------------------------------------------ flow
    def _apply(self, direction: str, y_or_eps, global_ctx, group_obs, member_obs, pooled):
        """``forward`` / ``inverse`` of both levels: the globals first (their values condition the groups)."""
        top, groups, members = y_or_eps
        logdet = 0.0
        if self.outer is not None:
            ctx = self.global_context(global_ctx, group_obs, member_obs) if pooled is None else pooled
            flow = self.outer.global_flow
            out_top, logdet = flow(top, ctx) if direction == "forward" else flow.inverse(top, ctx)
        else:
            out_top = top
        y_top = out_top if direction == "forward" else top
        out_groups, out_members = groups, members
        if self.inner is not None:
            ctx = self.group_context(y_top if self.num_globals else None, global_ctx, group_obs)
            step = self.inner.forward if direction == "forward" else self.inner.inverse
            out_groups, out_members, ld = step(groups, members, ctx, member_obs)
            logdet = logdet + ld.sum(-1)
        return out_top, out_groups, out_members, logdet

    def forward(self, eps_globals, eps_groups, eps_members, global_ctx, group_obs, member_obs, pooled=None):
        """Base noise ``(*batch, t)``, ``(*batch, G, h)``, ``(*batch, G, M, k)`` -> latents (same
        shapes) and ``log|det dy/deps|`` ``(*batch,)``; ``pooled``: :meth:`global_context` when computed."""
        return self._apply("forward", (eps_globals, eps_groups, eps_members), global_ctx, group_obs, member_obs, pooled)

    def inverse(self, y_globals, y_groups, y_members, global_ctx, group_obs, member_obs, pooled=None):
        """Latents -> base noise and ``log|det deps/dy|`` ``(*batch,)`` (as :meth:`forward`)."""
        return self._apply("inverse", (y_globals, y_groups, y_members), global_ctx, group_obs, member_obs, pooled)

    @staticmethod
    def base_log_prob(eps_globals, eps_groups, eps_members) -> torch.Tensor:
        """Standard normal log density of the three noises, summed: ``(*batch,)``."""
        def base(eps, event_dims):
            return (-0.5 * eps * eps - 0.5 * math.log(2 * math.pi)).flatten(-event_dims).sum(-1)

        lead = torch.broadcast_shapes(eps_globals.shape[:-1], eps_groups.shape[:-2], eps_members.shape[:-3])
        return base(eps_globals, 1).expand(lead) + base(eps_groups, 2).expand(lead) + base(eps_members, 3).expand(lead)

    def log_prob(self, y_globals, y_groups, y_members, global_ctx, group_obs, member_obs, pooled=None) -> torch.Tensor:
        """``log q(globals, groups, members | x)`` ``(*batch,)``."""
        e_t, e_h, e_m, logdet = self.inverse(y_globals, y_groups, y_members, global_ctx, group_obs, member_obs, pooled)
        return self.base_log_prob(e_t, e_h, e_m) + logdet

    def rsample_and_log_prob(self, global_ctx, group_obs, member_obs, n: int = 1):
        """``n`` reparameterised samples per data set: ``(n, *batch, t)``, ``(n, *batch, G, h)``,
        ``(n, *batch, G, M, k)`` and ``log q`` ``(n, *batch)``."""
        batch, (G, M) = member_obs.shape[:-3], member_obs.shape[-3:-1]
        opts = {"dtype": member_obs.dtype, "device": member_obs.device}
        eps = (torch.randn((n,) + batch + (self.num_globals,), **opts), torch.randn((n,) + batch + (G, self.group_dim), **opts),
               torch.randn((n,) + batch + (G, M, self.member_dim), **opts))
        y_t, y_h, y_m, logdet = self.forward(*eps, global_ctx, group_obs, member_obs)
        return y_t, y_h, y_m, self.base_log_prob(*eps) - logdet

    @property
    def num_passes(self) -> int:
        """Sequential conditioner passes per sampling call: the globals', then the groups' and members' batched passes."""
        return sum(f.num_passes for f in (self.outer, self.inner) if f is not None)

    def extra_repr(self) -> str:
        return (f"globals={self.num_globals}, group_latents={self.group_dim}, member_latents={self.member_dim}, "
                f"global_context={self.global_context_dim}, group_obs={self.group_obs_dim}, "
                f"member_obs={self.member_obs_dim}, embedding_dim={self.embedding_dim}")
