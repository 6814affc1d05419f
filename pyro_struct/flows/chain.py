"""A flow over a time chain: one step flow shared by every step, conditioned on the next step, the globals and a recurrent summary of the observations.

The flow is the filtering factorisation of a chain template (:class:`~pyro_struct.chains.ChainInverse`):

``q(theta | x) q(z_{T-1} | theta, h_{T-1}) prod_{t < T-1} q(z_t | z_{t+1}, theta, h_t)``

- ``h_t`` ``(*batch, T, S)`` summarises the chain observations ``o_0..o_t`` (the inverse lists
  ``x_0..x_t`` as parents of ``z_t``; ``h_t`` replaces exactly that set): the current ``o_t``,
  exponential moving averages ``sum_{s<=t} (1 - l) l^(t-s) o_s`` with learnable decays ``l`` (a
  linear path: the steady-state Kalman filter mean of a linear-Gaussian chain is one of them, so
  the affine normaliser's linear skip can represent that posterior), and a GRU over ``o_0..o_t``
  (nonlinear filters, and the transient of the first steps);
- the step flow (a :class:`~pyro_struct.flows.StrAF` by default) maps ``z_t`` ``(k,)`` given the
  context ``[z_{t+1}, theta, global obs, h_t]`` with the template's masks; the last step, which has
  no successor, has its own boundary flow with context ``[theta, global obs, h_{T-1}]``;
- the globals ``theta`` ``(g,)`` follow a flow conditioned on the global observations and a
  pooled summary of the whole chain: ``mean_t phi(o_{t-1}, o_t)``, ``mean_t o_t``, ``h_{T-1}`` and ``log T``.

The parameter count does not depend on ``T``. Density evaluation is parallel over ``t`` (one
step-flow pass over all ``T - 1`` steps as a batch, the summaries by a scan); sampling is sequential
from ``T - 1`` down to 0 (one step-flow call per step). Any length ``T >= 1`` is accepted.

Example:
    >>> import torch
    >>> from pyro_struct.flows.chain import ChainFlow
    >>> k, g = 1, 0  # an HMM: z_t <- (z_{t+1}, h_t), no globals
    >>> flow = ChainFlow(step_adjacency=torch.tensor([[False, True]]), step_summary=torch.tensor([True]),
    ...                  boundary_adjacency=torch.tensor([[False]]), boundary_summary=torch.tensor([True]),
    ...                  global_adjacency=torch.zeros(0, 0, dtype=torch.bool), global_pooled=torch.zeros(0, dtype=torch.bool),
    ...                  obs_dim=1)
    >>> y_g, y_c, log_q = flow.rsample_and_log_prob(None, torch.zeros(3, 50, 1), n=2)
    >>> y_g.shape, y_c.shape, log_q.shape
    (torch.Size([2, 3, 0]), torch.Size([2, 3, 50, 1]), torch.Size([2, 3]))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import MaskedStructure
from .base import ConditionalFlow
from .plated import broadcast_cat
from .straf import StrAF

__all__ = ["ChainFlow", "ChainSummary", "decayed_scan"]


def decayed_scan(u: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``h_t = sum_{s <= t} decay^(t - s) u_s`` along dimension ``-3`` of ``u`` ``(*batch, T, c, m)``
    with per-channel ``decay`` ``(m,)``: a Hillis-Steele scan, ``ceil(log2 T)`` vectorised steps."""
    h, power, k, T = u, decay, 1, u.shape[-3]
    while k < T:
        h = torch.cat([h[..., :k, :, :], h[..., k:, :, :] + power * h[..., : T - k, :, :]], -3)
        power, k = power * power, 2 * k
    return h


class ChainSummary(nn.Module):
    """Forward summaries ``h_t`` of chain observations ``o_0..o_t``: ``[o_t, moving averages, GRU state]``.

    Args:
        obs_dim: ``ko``, observed coordinates per step.
        decays: initial decays of the moving averages (learnt, kept in ``(0, 1)``).
        rnn_hidden: GRU width (0: no GRU).

    Shapes: ``(*batch, T, ko) -> (*batch, T, dim)`` with ``dim = ko * (1 + len(decays)) + rnn_hidden``.
    """

    def __init__(self, obs_dim: int, decays: Sequence[float] = (0.5, 0.8, 0.95), rnn_hidden: int = 16):
        super().__init__()
        self.obs_dim = int(obs_dim)
        d = torch.as_tensor(list(decays), dtype=torch.get_default_dtype())
        if d.numel() and not ((d > 0) & (d < 1)).all():
            raise ValueError(f"decays must lie in (0, 1); got {list(decays)}")
        self.decay_logits = nn.Parameter(torch.logit(d))
        self.gru = nn.GRU(self.obs_dim, int(rnn_hidden), batch_first=True) if rnn_hidden and self.obs_dim else None
        self.dim = 0 if not self.obs_dim else self.obs_dim * (1 + d.numel()) + (int(rnn_hidden) if self.gru is not None else 0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.obs_dim:
            return obs
        lam = torch.sigmoid(self.decay_logits)
        avg = decayed_scan(obs.unsqueeze(-1) * (1 - lam), lam).flatten(-2)  # (*, T, ko * m)
        parts = [obs, avg]
        if self.gru is not None:
            T = obs.shape[-2]
            out, _ = self.gru(obs.reshape(-1, T, self.obs_dim))
            parts.append(out.reshape(obs.shape[:-1] + (out.shape[-1],)))
        return torch.cat(parts, -1)


def _check(name: str, A: torch.Tensor, shape: tuple) -> None:
    if tuple(A.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(A.shape)}")


class ChainFlow(MaskedStructure, nn.Module):
    """The chain flow over globals ``(*batch, g)`` and steps ``(*batch, T, k)`` (see the module docstring).

    Args:
        step_adjacency: ``(k, 2k + g + cg)`` bool: step-order coordinate ``i`` of ``z_t`` on ``z_t``'s
            earlier coordinates, on ``z_{t+1}``, on the globals, on the global observations.
        step_summary: ``(k,)`` bool: coordinate ``i`` sees the summary ``h_t``.
        boundary_adjacency: ``(k, k + g + cg)``; boundary_summary: ``(k,)``: the same for the last step.
        global_adjacency: ``(g, g + cg)``; global_pooled: ``(g,)``: a global sees the pooled summary.
        obs_dim: ``ko``; decays, rnn_hidden: of the :class:`ChainSummary`.
        pool_dim, pool_hidden: the pooled embedding ``phi(o_{t-1}, o_t)``'s size and hidden widths.
        family: the class of the three flows (default :class:`~pyro_struct.flows.StrAF`).
        length: the traced chain length ``T`` (only for :attr:`num_passes`; any ``T`` is accepted).
        **flow_options: passed to the three flows (``num_layers``, ``hidden_sizes``, ``normalizer``, ...).
    """

    def __init__(self, step_adjacency, step_summary, boundary_adjacency, boundary_summary, global_adjacency, global_pooled,
                 obs_dim: int, decays: Sequence[float] = (0.5, 0.8, 0.95), rnn_hidden: int = 16, pool_dim: int = 8,
                 pool_hidden: Sequence[int] = (32,), family: type[ConditionalFlow] = StrAF, length: int | None = None,
                 **flow_options):
        super().__init__()
        self.length = length
        As, ss, Ab, sb, Ag, pg = (torch.as_tensor(a).bool() for a in
                                  (step_adjacency, step_summary, boundary_adjacency, boundary_summary, global_adjacency, global_pooled))
        k, g = As.shape[0], Ag.shape[0]
        cg = Ag.shape[1] - g
        self.step_dim, self.num_globals, self.global_context_dim, self.obs_dim = k, g, cg, int(obs_dim)
        if k == 0:
            raise ValueError("a chain flow needs at least one latent coordinate per step")
        for name, A, shape in (("step_adjacency", As, (k, 2 * k + g + cg)), ("step_summary", ss, (k,)),
                               ("boundary_adjacency", Ab, (k, k + g + cg)), ("boundary_summary", sb, (k,)),
                               ("global_pooled", pg, (g,))):
            _check(name, A, shape)
        if not (isinstance(family, type) and issubclass(family, ConditionalFlow)):
            raise ValueError(f"family must be a ConditionalFlow class (StrAF, GRF, StructuredCNF); got {family!r}")
        self.family = family
        self.summary_net = ChainSummary(self.obs_dim, decays, rnn_hidden)
        S = self.summary_net.dim
        self.step_flow = family(torch.cat([As, ss.unsqueeze(1).expand(k, S)], 1), context_dim=k + g + cg + S, **flow_options)
        self.boundary_flow = family(torch.cat([Ab, sb.unsqueeze(1).expand(k, S)], 1), context_dim=g + cg + S, **flow_options)
        self.pool_dim = int(pool_dim) if self.obs_dim else 0
        P = self.pool_dim + self.obs_dim + S + 1
        self.global_flow = (family(torch.cat([Ag, pg.unsqueeze(1).expand(g, P)], 1), context_dim=cg + P, **flow_options)
                            if g else None)
        sizes = [2 * self.obs_dim] + [int(h) for h in pool_hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.phi = nn.Sequential(*layers, nn.Linear(sizes[-1], self.pool_dim)) if g and self.obs_dim else None

    # ------------------------------------------------------------------ contexts
    def summaries(self, obs: torch.Tensor) -> torch.Tensor:
        """``h_t`` ``(*batch, T, S)`` of chain observations ``(*batch, T, ko)``."""
        return self.summary_net(obs)

    def global_context(self, global_ctx: torch.Tensor | None, obs: torch.Tensor, summary: torch.Tensor) -> torch.Tensor | None:
        """The globals' flow context ``(*batch, cg + P)``: global observations and the pooled chain summary."""
        if self.global_flow is None:
            return None
        T = obs.shape[-2]
        parts = [global_ctx]
        if self.obs_dim:
            prev = torch.cat([torch.zeros_like(obs[..., :1, :]), obs[..., :-1, :]], -2)
            parts += [self.phi(torch.cat([prev, obs], -1)).mean(-2), obs.mean(-2), summary[..., -1, :]]
        parts.append(obs.new_full(obs.shape[:-2] + (1,), math.log(max(T, 1))))
        return broadcast_cat(parts)

    def _step_context(self, nb: torch.Tensor | None, y_g, global_ctx, summary_t) -> torch.Tensor:
        """``[z_{t+1}, globals, global obs, h_t]`` (``nb`` ``None``: the boundary step)."""
        parts = [nb, y_g if self.num_globals else None, global_ctx, summary_t if summary_t.shape[-1] else None]
        ts = [t for t in parts if t is not None]
        if not ts:
            return None
        return broadcast_cat(ts)

    # ------------------------------------------------------------------ flow
    def forward(self, eps_globals, eps_steps, global_ctx, obs, summary=None, pooled=None):
        """Base noise -> latents, sampling ``z_{T-1}`` first and every ``z_t`` from ``z_{t+1}``.

        Args:
            eps_globals: ``(*batch, g)``; eps_steps: ``(*batch, T, k)``.
            global_ctx: ``(*batch, cg)`` or ``None``; obs: ``(*batch, T, ko)``.
            summary, pooled: :meth:`summaries` / :meth:`global_context` when already computed.

        Returns:
            ``y_globals`` ``(*batch, g)``, ``y_steps`` ``(*batch, T, k)``, ``log|det dy/deps|`` ``(*batch,)``.
        """
        summary = self.summaries(obs) if summary is None else summary
        y_g, logdet = eps_globals, 0.0
        if self.global_flow is not None:
            pooled = self.global_context(global_ctx, obs, summary) if pooled is None else pooled
            y_g, logdet = self.global_flow(eps_globals, pooled)
        T = eps_steps.shape[-2]
        # (one unbind, not T selects: a select's backward writes a zero tensor of the whole summary)
        h, e = summary.unbind(-2), eps_steps.unbind(-2)
        z, ld = self.boundary_flow(e[T - 1], self._step_context(None, y_g, global_ctx, h[T - 1]))
        out, logdet = [z], logdet + ld
        for t in range(T - 2, -1, -1):
            z, ld = self.step_flow(e[t], self._step_context(z, y_g, global_ctx, h[t]))
            out.append(z)
            logdet = logdet + ld
        return y_g, torch.stack(out[::-1], -2), logdet

    def inverse(self, y_globals, y_steps, global_ctx, obs, summary=None, pooled=None):
        """Latents -> base noise ``(eps_globals, eps_steps)`` and ``log|det deps/dy|`` ``(*batch,)``, all steps at once."""
        summary = self.summaries(obs) if summary is None else summary
        e_g, logdet = y_globals, 0.0
        if self.global_flow is not None:
            pooled = self.global_context(global_ctx, obs, summary) if pooled is None else pooled
            e_g, logdet = self.global_flow.inverse(y_globals, pooled)
        T = y_steps.shape[-2]
        lead = torch.broadcast_shapes(y_steps.shape[:-2], summary.shape[:-2])
        e_last, ld = self.boundary_flow.inverse(y_steps[..., T - 1, :], self._step_context(None, y_globals, global_ctx, summary[..., T - 1, :]))
        logdet = logdet + ld
        if T == 1:
            return e_g, e_last.unsqueeze(-2), logdet
        y_t = y_steps.expand(lead + y_steps.shape[-2:])
        g_t = None if not self.num_globals else y_globals.unsqueeze(-2).expand(lead + (T - 1, self.num_globals))
        c_t = None if global_ctx is None else global_ctx.unsqueeze(-2).expand(global_ctx.shape[:-1] + (T - 1, global_ctx.shape[-1]))
        ctx = broadcast_cat([t for t in (y_t[..., 1:, :], g_t, c_t, summary[..., :-1, :] if summary.shape[-1] else None)
                             if t is not None])
        e_rest, ld_rest = self.step_flow.inverse(y_t[..., :-1, :], ctx)
        return e_g, torch.cat([e_rest, e_last.unsqueeze(-2)], -2), logdet + ld_rest.sum(-1)

    @staticmethod
    def base_log_prob(eps_globals: torch.Tensor, eps_steps: torch.Tensor) -> torch.Tensor:
        """Standard normal log density of both noises, summed: ``(*batch,)``."""
        c = 0.5 * math.log(2 * math.pi)
        lead = torch.broadcast_shapes(eps_globals.shape[:-1], eps_steps.shape[:-2])
        g = (-0.5 * eps_globals * eps_globals - c).sum(-1)
        s = (-0.5 * eps_steps * eps_steps - c).sum((-2, -1))
        return g.expand(lead) + s.expand(lead)

    def log_prob(self, y_globals, y_steps, global_ctx, obs, summary=None, pooled=None) -> torch.Tensor:
        """``log q(globals, steps | x)`` ``(*batch,)``."""
        e_g, e_s, logdet = self.inverse(y_globals, y_steps, global_ctx, obs, summary, pooled)
        return self.base_log_prob(e_g, e_s) + logdet

    def rsample_and_log_prob(self, global_ctx, obs, n: int = 1):
        """``n`` reparameterised samples per data set: ``(n, *batch, g)``, ``(n, *batch, T, k)`` and ``(n, *batch)``."""
        batch = obs.shape[:-2]
        eps_g = torch.randn((n,) + batch + (self.num_globals,), dtype=obs.dtype, device=obs.device)
        eps_s = torch.randn((n,) + batch + (obs.shape[-2], self.step_dim), dtype=obs.dtype, device=obs.device)
        y_g, y_s, logdet = self.forward(eps_g, eps_s, global_ctx, obs)
        return y_g, y_s, self.base_log_prob(eps_g, eps_s) - logdet

    @property
    def num_passes(self) -> int | None:
        """Sequential conditioner passes of one sampling call at the traced length: the globals' flow's, then
        ``T`` step-flow calls (``None`` without a traced length or for a family whose passes the solver sets)."""
        steps = [f.num_passes for f in (self.global_flow, self.boundary_flow) if f is not None]
        if self.length is None or any(p is None for p in steps) or self.step_flow.num_passes is None:
            return None
        return sum(steps) + (self.length - 1) * self.step_flow.num_passes

    def extra_repr(self) -> str:
        return (f"family={self.family.__name__}, globals={self.num_globals}, step_latents={self.step_dim}, "
                f"step_obs={self.obs_dim}, summary_dim={self.summary_net.dim}")
