"""A flow over one plate: the globals' flow pools the members (a DeepSet), one member flow is shared by every member.

The flow is the amortised factorisation ``q(theta | x_1..N) prod_i q(z_i | theta, x_i)`` of a
plate template (:class:`~pyro_struct.plates.PlateInverse`):

- the globals ``theta`` ``(*batch, g)`` follow a conditional flow (a
  :class:`~pyro_struct.flows.StrAF` by default; ``family=`` any
  :class:`~pyro_struct.flows.base.ConditionalFlow`: GRF, CNF) whose context is
  the global observations and, per global ``j``, a permutation-invariant summary of the member
  coordinates the template lists as ``j``'s pooled parents: the DeepSet mean
  ``(1/N) sum_i phi_j(x_i)`` plus the linear path ``(1/N) sum_i x_i`` and ``log N`` (so that a
  linear-Gaussian posterior, whose mean is linear in ``sum_i x_i`` at fixed ``N``, stays exactly
  representable by the affine normaliser's linear skip);
- every member's latents ``z_i`` ``(*batch, N, k)`` follow one flow of the same family (weights shared by all
  members) conditioned on the globals it lists, the global observations and its own member's
  observations ``x_i``, evaluated for all members as one batch.

The parameter count does not depend on ``N``; sampling is the globals' pass, then one batched
pass over the members. Masks keep the template's structure: a global sees only its pooled
coordinates, a member's latents only its own member.

The construction holds for every family because the two stages are separate flows: the globals'
flow sees the members only through its context (the pooled observations), and the member flow
maps each member's row on its own, so a GRF's contraction and a CNF's ODE are per member (a
GRF's Lipschitz bound does not grow with ``N``, and the CNF's solver steps do not depend on it
beyond the batch's stiffest member).

Example:
    >>> import torch
    >>> # mu pools x_i; z_i <- (mu, x_i)
    >>> flow = PlatedStrAF(torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool),
    ...                    torch.tensor([[False, True, True]]), member_obs_dim=1)
    >>> yg, ym, log_q = flow.rsample_and_log_prob(None, torch.zeros(7, 1), n=4)
    >>> yg.shape, ym.shape, log_q.shape
    (torch.Size([4, 1]), torch.Size([4, 7, 1]), torch.Size([4]))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import MaskedStructure
from .base import ConditionalFlow
from .straf import StrAF

__all__ = ["PlatedStrAF", "broadcast_cat"]


def broadcast_cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting every other dimension (``None`` skipped)."""
    ts = [t for t in tensors if t is not None]
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in ts))
    return torch.cat([t.expand(lead + t.shape[-1:]) for t in ts], -1)


class PlatedStrAF(MaskedStructure, nn.Module):
    """The plate flow over globals ``(*batch, g)`` and members ``(*batch, N, k)`` (StrAF stages by default).

    Args:
        global_adjacency: ``(g, g + cg)`` bool: global ``j`` depends on global latent ``l < j``
            / global observation ``c`` (rows and latent columns in sampling order).
        pooled: ``(g, ko)`` bool: the member observation coordinates global ``j`` pools.
        member_adjacency: ``(k, k + g + cg + ko)`` bool: a member latent on its own member's
            earlier latents, the global latents, the global observations, its own observations.
        member_obs_dim: ``ko``, observed coordinates per member.
        pool_dim: DeepSet embedding size per global.
        pool_hidden: hidden widths of the DeepSet's per-member network ``phi``.
        family: the class of both stages' flows: :class:`~pyro_struct.flows.StrAF` (default),
            :class:`~pyro_struct.flows.GraphicalResidualFlow` or :class:`~pyro_struct.flows.StructuredCNF`.
        **flow_options: passed to both stages' flows (``num_layers``, ``hidden_sizes``,
            ``normalizer``, ...).

    Shapes: global context ``(*batch, cg)`` or ``None``; member observations ``(*batch, N, ko)``;
    every method broadcasts leading dimensions (e.g. samples before the data-set batch).
    """

    def __init__(
        self,
        global_adjacency: torch.Tensor,
        pooled: torch.Tensor,
        member_adjacency: torch.Tensor,
        member_obs_dim: int,
        pool_dim: int = 8,
        pool_hidden: Sequence[int] = (32,),
        family: type[ConditionalFlow] = StrAF,
        **flow_options,
    ):
        super().__init__()
        Ag, P, Am = (torch.as_tensor(a).bool() for a in (global_adjacency, pooled, member_adjacency))
        g, ko = Ag.shape[0], int(member_obs_dim)
        self.num_globals, self.member_obs_dim = g, ko
        self.global_context_dim = Ag.shape[1] - g
        self.member_dim = Am.shape[0]
        if tuple(P.shape) != (g, ko):
            raise ValueError(f"pooled must have shape (g, ko) = ({g}, {ko}); got {tuple(P.shape)}")
        if self.member_dim and Am.shape[1] != self.member_dim + g + self.global_context_dim + ko:
            raise ValueError(f"member_adjacency must have shape (k, k + g + cg + ko); got {tuple(Am.shape)}")
        if g == 0 and self.member_dim == 0:
            raise ValueError("a plate flow needs at least one global or member latent")
        self.embedding_dim = int(pool_dim)
        self.register_buffer("pooled", P, persistent=False)
        if not (isinstance(family, type) and issubclass(family, ConditionalFlow)):
            raise ValueError(f"family must be a ConditionalFlow class (StrAF, GRF, StructuredCNF); got {family!r}")
        self.family = family
        self.global_flow = self._global_flow(Ag, P, flow_options) if g else None
        self.member_flow = family(Am, context_dim=Am.shape[1] - self.member_dim, **flow_options) if self.member_dim else None
        sizes = [ko + g] + [int(h) for h in pool_hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.phi = nn.Sequential(*layers, nn.Linear(sizes[-1], self.embedding_dim)) if g else None

    def _global_flow(self, Ag: torch.Tensor, P: torch.Tensor, options: dict) -> ConditionalFlow:
        """The globals' flow over ``[globals | global obs | per global: (e embeddings, ko means) | log N]``."""
        g, ko, e = P.shape[0], P.shape[1], self.embedding_dim
        blocks = torch.zeros(g, g, e + ko, dtype=torch.bool)
        pools = P.any(1)
        for j in range(g):
            blocks[j, j, :e] = pools[j]
            blocks[j, j, e:] = P[j]
        A = torch.cat([Ag, blocks.reshape(g, -1), pools.unsqueeze(1)], 1)
        return self.family(A, context_dim=A.shape[1] - g, **options)

    # ------------------------------------------------------------------ pieces
    def summary(self, member_obs: torch.Tensor, num_members: int | None = None) -> torch.Tensor:
        """Per-global pooled features ``(*batch, g * (e + ko) + 1)`` of member observations ``(*batch, N, ko)``.

        ``num_members``: the data set's size when ``member_obs`` is a subsample of it (the means
        over the subsample estimate the data set's; ``log N`` is the data set's)."""
        n = member_obs.shape[-2] if num_members is None else int(num_members)
        g = self.num_globals
        masked = member_obs.unsqueeze(-2) * self.pooled.to(member_obs.dtype)  # (*, N, g, ko)
        eye = torch.eye(g, dtype=member_obs.dtype, device=member_obs.device).expand(masked.shape[:-1] + (g,))
        emb = self.phi(torch.cat([masked, eye], -1)).mean(-3)  # (*, g, e)
        linear = member_obs.mean(-2).unsqueeze(-2).expand(emb.shape[:-1] + (self.member_obs_dim,))
        log_n = member_obs.new_full(member_obs.shape[:-2] + (1,), math.log(max(n, 1)))
        return torch.cat([torch.cat([emb, linear], -1).flatten(-2), log_n], -1)

    def global_context(self, global_ctx: torch.Tensor | None, member_obs: torch.Tensor, num_members: int | None = None) -> torch.Tensor:
        """The globals' flow context ``(*batch, cg + g * (e + ko) + 1)`` (``num_members``: as :meth:`summary`)."""
        return broadcast_cat([global_ctx, self.summary(member_obs, num_members)])

    def member_context(self, y_globals, global_ctx, member_obs) -> torch.Tensor:
        """Each member's flow context ``(*batch, N, g + cg + ko)``."""
        n = member_obs.shape[-2]
        gl = None if y_globals is None else y_globals.unsqueeze(-2).expand(y_globals.shape[:-1] + (n, y_globals.shape[-1]))
        gc = None if global_ctx is None else global_ctx.unsqueeze(-2).expand(global_ctx.shape[:-1] + (n, global_ctx.shape[-1]))
        return broadcast_cat([gl, gc, member_obs])

    # ------------------------------------------------------------------ flow
    def _pooled(self, global_ctx, member_obs, pooled):
        return self.global_context(global_ctx, member_obs) if pooled is None else pooled

    def forward(self, eps_globals, eps_members, global_ctx, member_obs, pooled=None, member_scale: float = 1.0):
        """Base noise -> latents.

        Args:
            eps_globals: ``(*batch, g)``; eps_members: ``(*batch, N, k)``.
            global_ctx: ``(*batch, cg)`` or ``None``; member_obs: ``(*batch, N, ko)``.
            pooled: :meth:`global_context` of these observations when already computed (the
                pooling over members costs as much as a member pass; one training step needs it twice).
            member_scale: weight of the members' log-determinant terms (``N / B`` for a subsample of
                ``B`` of ``N`` members, as Pyro scales a subsampled plate's sites).

        Returns:
            ``y_globals`` ``(*batch, g)``, ``y_members`` ``(*batch, N, k)`` and ``log|det dy/deps|`` ``(*batch,)``.
        """
        y_g, logdet = eps_globals, 0.0
        if self.global_flow is not None:
            y_g, logdet = self.global_flow(eps_globals, self._pooled(global_ctx, member_obs, pooled))
        y_m = eps_members
        if self.member_flow is not None:
            y_m, ld_m = self.member_flow(eps_members, self.member_context(y_g if self.num_globals else None, global_ctx, member_obs))
            logdet = logdet + member_scale * ld_m.sum(-1)
        return y_g, y_m, logdet

    def inverse(self, y_globals, y_members, global_ctx, member_obs, pooled=None, member_scale: float = 1.0):
        """Latents -> base noise ``(eps_globals, eps_members)`` and ``log|det deps/dy|`` ``(*batch,)``
        (``pooled``, ``member_scale``: as :meth:`forward`)."""
        e_g, logdet = y_globals, 0.0
        if self.global_flow is not None:
            e_g, logdet = self.global_flow.inverse(y_globals, self._pooled(global_ctx, member_obs, pooled))
        e_m = y_members
        if self.member_flow is not None:
            e_m, ld_m = self.member_flow.inverse(y_members, self.member_context(y_globals if self.num_globals else None, global_ctx, member_obs))
            logdet = logdet + member_scale * ld_m.sum(-1)
        return e_g, e_m, logdet

    @staticmethod
    def _base(eps: torch.Tensor, event_dims: int) -> torch.Tensor:
        lp = -0.5 * eps * eps - 0.5 * math.log(2 * math.pi)
        return lp.flatten(-event_dims).sum(-1)

    def base_log_prob(self, eps_globals: torch.Tensor, eps_members: torch.Tensor, member_scale: float = 1.0) -> torch.Tensor:
        """Standard normal log density of both noises, summed (members weighted by ``member_scale``): ``(*batch,)``."""
        lead = torch.broadcast_shapes(eps_globals.shape[:-1], eps_members.shape[:-2])
        return self._base(eps_globals, 1).expand(lead) + member_scale * self._base(eps_members, 2).expand(lead)

    def log_prob(self, y_globals, y_members, global_ctx, member_obs, pooled=None, member_scale: float = 1.0) -> torch.Tensor:
        """``log q(globals, members | x)`` ``(*batch,)``: the globals' term plus the sum over members
        (weighted by ``member_scale``, as :meth:`forward`)."""
        e_g, e_m, logdet = self.inverse(y_globals, y_members, global_ctx, member_obs, pooled, member_scale)
        return self.base_log_prob(e_g, e_m, member_scale) + logdet

    def rsample_and_log_prob(self, global_ctx, member_obs, n: int = 1):
        """``n`` reparameterised samples per data set: ``(n, *batch, g)``, ``(n, *batch, N, k)`` and ``(n, *batch)``."""
        batch = member_obs.shape[:-2]
        ref = member_obs
        eps_g = torch.randn((n,) + batch + (self.num_globals,), dtype=ref.dtype, device=ref.device)
        eps_m = torch.randn((n,) + batch + (member_obs.shape[-2], self.member_dim), dtype=ref.dtype, device=ref.device)
        y_g, y_m, logdet = self.forward(eps_g, eps_m, global_ctx, member_obs)
        return y_g, y_m, self.base_log_prob(eps_g, eps_m) - logdet

    @property
    def num_passes(self) -> int:
        """Sequential conditioner passes per sampling call: the globals', then one batched member pass."""
        return sum(f.num_passes for f in (self.global_flow, self.member_flow) if f is not None)

    def extra_repr(self) -> str:
        return (f"family={self.family.__name__}, globals={self.num_globals}, member_latents={self.member_dim}, member_obs={self.member_obs_dim}, "
                f"global_context={self.global_context_dim}, embedding_dim={self.embedding_dim}")
