"""Structured autoregressive flow (StrAF): StrNN conditioners over ``[z, x]`` and elementwise normalisers.

Reference: Chen et al. (2023), Structured Neural Networks for Density Estimation and Causal
Inference (StrAF). The normalisers live in :mod:`pyro_struct.flows.transforms` (re-exported here).

Each layer maps a latent ``z`` to noise ``u`` elementwise, ``u_i = tau(z_i; theta_i)``, where
``theta_i = h_i(z, x)`` comes from a StrNN whose outputs see exactly the parents of ``z_i`` in
the adjacency. Density evaluation (``inverse``) is one conditioner pass per layer; sampling
(``forward``) fills the latents in level by level: pass ``k`` computes the latents whose longest
path from a root has ``k`` edges (their parents are exact by then), so ``depth + 1`` passes
suffice, not ``d``. Without gradients (posterior sampling) every conditioner unit is computed once,
at the first pass its inputs are final, and the units that see only the context once per
distinct context (:class:`~pyro_struct.nn.LevelSchedule`): the passes together cost about one
density pass whatever the depth (``benchmarks/results/sampling.md``). With gradients each pass
evaluates the units with a path to its latents (:meth:`StrAF._forward_rows`).

Example:
    >>> A = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.bool)  # z0 <- x0, z1 <- z0
    >>> flow = StrAF(A, context_dim=1, num_layers=2, hidden_sizes=(16, 16))
    >>> z, log_q = flow.rsample_and_log_prob(torch.zeros(1), n=5)
    >>> z.shape, log_q.shape, flow.num_passes, flow.last_stats["forward"]["evaluations"]
    (torch.Size([5, 2]), torch.Size([5]), 4, 4)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from .. import dag
from ..nn import StrNN
from .base import ConditionalFlow
from .transforms import AffineNormalizer, SplineNormalizer, UMNNNormalizer, clenshaw_curtis

__all__ = [
    "StrAF",
    "AffineNormalizer",
    "SplineNormalizer",
    "UMNNNormalizer",
    "clenshaw_curtis",
]


class StrAF(ConditionalFlow):
    """Structured autoregressive flow conditioned on a context.

    Args:
        adjacency: ``(d, d + context_dim)`` bool; latent ``i`` may depend on latent ``j < i``
            and context ``k`` iff ``adjacency[i, j]`` / ``adjacency[i, d + k]``.
        context_dim: context size (0 for plain density estimation, then ``x`` is ``None``).
        num_layers: stacked layers, all with the same adjacency (no permutations, which
            would break the structure).
        hidden_sizes: hidden widths of each StrNN conditioner.
        normalizer: ``"affine"``, ``"spline"`` (monotonic rational-quadratic spline) or
            ``"umnn"`` (unconstrained monotonic neural network, integral of a positive MLP); or a
            list of them, one per layer (``["affine", "spline"]``: ``num_layers`` is its length),
            applied in that order to the base noise when sampling.
        skip: add the StrNN's masked linear skip from ``[z, x]`` to the normaliser
            parameters: to the shift only for the affine normaliser (an affine StrAF then
            represents linear-Gaussian conditionals exactly, with their constant scale), to
            every parameter for the spline and UMNN normalisers.
        activation: conditioner activation (name, class or module).
        num_bins: spline bins.
        bound: spline interval ``[-bound, bound]`` (identity outside).
        mask_method: mask factorisation (``"greedy"`` or ``"made"``).
        widen: widen hidden layers too narrow for exact masks instead of raising.
        min_scale: lower bound of the affine scale.
        embedding_dim: UMNN: size of each variable's embedding fed to the integrand.
        integrand_sizes: UMNN: hidden widths of the integrand network (one per layer).
        num_steps: UMNN: Clenshaw-Curtis quadrature steps (even).

    Attributes:
        depth: edges on the longest latent path; sampling runs ``depth + 1`` conditioner passes
            per layer, so ``num_passes = num_layers * (depth + 1)``.
        last_stats: ``{"forward": {"evaluations", "passes_per_layer"}, "inverse": {"evaluations"}}``
            of the last call in each direction (evaluations: conditioner passes, all layers).

    Shapes: ``eps``, ``z`` ``(*batch, d)``; ``x`` ``(*batch, context_dim)`` (broadcast).
    Conditioners start with a zero output layer, so the flow starts as the identity.
    Sampling with gradients recomputes each pass in the backward pass (checkpointing) when
    ``num_passes x conditioner parameters`` exceeds :attr:`recompute_bytes`, trading time for
    the memory that deep structures would need.

    Example:
        >>> A = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
        >>> flow = StrAF(A, normalizer="spline", num_layers=2)
        >>> flow.log_prob(flow.sample(n=3)).shape
        torch.Size([3])
    """

    #: memory (bytes) that the gathered weights of all sampling passes may keep for the backward
    #: pass before the passes are recomputed instead
    recompute_bytes: int = 2**30
    #: points per chunk of sampling without gradients (the buffers of one pass then stay in cache)
    chunk_points: int = 16384

    def __init__(
        self,
        adjacency: torch.Tensor,
        context_dim: int = 0,
        num_layers: int = 1,
        hidden_sizes: Sequence[int] = (64, 64),
        normalizer: str = "affine",
        skip: bool = True,
        activation="relu",
        num_bins: int = 8,
        bound: float = 5.0,
        mask_method: str = "greedy",
        widen: bool = True,
        min_scale: float = 1e-3,
        embedding_dim: int = 8,
        integrand_sizes: Sequence[int] = (32, 32),
        num_steps: int = 40,
    ):
        super().__init__(adjacency, context_dim)
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        names = [normalizer] * int(num_layers) if isinstance(normalizer, str) else list(normalizer)
        if not isinstance(normalizer, str) and int(num_layers) not in (1, len(names)) or not names:
            raise ValueError(
                f"normalizer {normalizer!r} names one normaliser per layer: {len(names)}, not num_layers={num_layers}")
        makers = {
            "affine": lambda: AffineNormalizer(min_scale=min_scale),
            "spline": lambda: SplineNormalizer(num_bins=num_bins, bound=bound),
            "umnn": lambda: UMNNNormalizer(embedding_dim, integrand_sizes, num_steps),
        }
        unknown = [n for n in names if n not in makers]
        if unknown:
            raise ValueError(
                f"unknown normalizer {unknown[0]!r}; use 'affine', 'spline' or 'umnn' (or a list of them, one per layer)")
        # one normaliser per layer (a UMNN's integrand network has parameters of its own)
        self.normalizers = nn.ModuleList(makers[n]() for n in names)
        self.normalizer_name = normalizer if isinstance(normalizer, str) else "+".join(names)
        self.num_layers = len(names)
        self._levels = dag.levels(self.adjacency)
        self.depth = len(self._levels) - 1
        conditioners = []
        for norm in self.normalizers:
            net = StrNN(
                self.adjacency,
                hidden_sizes,
                num_params=norm.num_params,
                skip=(getattr(norm, "skip_params", None) or True) if skip else False,
                activation=activation,
                mask_method=mask_method,
                widen=widen,
            )
            net.layers[-1].reset_masked_parameters(zero_init=True)
            conditioners.append(net)
        self.conditioners = nn.ModuleList(conditioners)

    def _inputs(self, z: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        # the base class broadcast z and x to one batch shape
        return z if x is None else torch.cat([z, x], -1)

    @property
    def num_passes(self) -> int:
        """Sequential conditioner passes per sampling call: ``num_layers * (depth + 1)``."""
        return self.num_layers * (self.depth + 1)

    def _forward(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Base noise ``(*batch, d)`` -> ``z`` and ``log|det dz/deps|`` ``(*batch,)``; ``depth + 1`` passes per layer."""
        if not torch.is_grad_enabled() and eps.device.type != "meta" and eps.dim() > 1:
            return self._forward_levels(eps, x)
        if self.depth == 0:
            return self._forward_context_only(eps, x)
        return self._forward_rows(eps, x)

    def _forward_context_only(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth 0 (no latent depends on another): each layer's parameters come from the context alone, one
        sample-major pass per layer (no row plans: a chain flow calls its step flow once per time step)."""
        u, logdet = eps, eps.new_zeros(eps.shape[:-1])
        inputs = self._inputs(torch.zeros_like(eps), x)  # (the latent columns feed no output)
        for net, normalizer in zip(self.conditioners, self.normalizers):
            u, log_grad = normalizer.to_latent(u, net(inputs))
            logdet = logdet + log_grad.sum(-1)
        self.last_stats["forward"] = {"evaluations": self.num_layers, "passes_per_layer": 1}
        return u, logdet

    def _level_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order, level, input_ready)``: the latents in level order ``(d,)``, each latent's level
        ``(d,)`` and the pass from which each input of ``[z, x]`` is final ``(d + c,)`` (a level-``l``
        latent from ``l + 1``, the context from 0)."""
        level = torch.empty(self.dim, dtype=torch.long)
        for k, rows in enumerate(self._levels):
            level[rows] = k
        ready = torch.cat([level + 1, torch.zeros(self.context_dim, dtype=torch.long)])
        return torch.cat(self._levels), level, ready

    def _forward_levels(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling without gradients from given noise: the level schedule (:meth:`_run_levels`)
        with the noise transposed into it and the latents transposed back."""
        batch, d = eps.shape[:-1], self.dim
        # a context expanded along a batch dimension (many samples of one observation) has stride 0 there
        x_small = None
        if x is not None:
            x_small = x
            for i, (size, stride) in enumerate(zip(x.shape[:-1], x.stride()[:-1])):
                if size > 1 and stride == 0:
                    x_small = x_small.narrow(i, 0, 1)
        order, _, _ = self._level_inputs()
        order = order.to(eps.device)
        inverse_order = torch.argsort(order)
        z, logdet = torch.empty_like(eps), eps.new_empty(batch)

        def load(i, j, u, spare):
            # feature-major (d, N) in level order: a transposing copy, then whole rows gathered (a
            # gather straight from the transposed view is several times slower)
            torch.index_select(spare.copy_(eps[i:j].reshape(-1, d).T), 0, order, out=u)

        def emit(i, j, z_t, ld, spare):
            # back to the latents' order (rows of the feature-major chunk), then sample-major
            z[i:j].view(-1, d).copy_(torch.index_select(z_t, 0, inverse_order, out=spare).T)
            logdet[i:j] = ld.view(logdet[i:j].shape)

        self._run_levels(batch, x_small, eps, load, emit)
        return z, logdet

    @torch.no_grad()
    def draw(self, n, batch_shape=(), x=None, common_noise=False, output=None):
        """:meth:`ConditionalFlow.draw` through the level schedule, fused with the noise and the output.

        The noise is drawn feature-major chunk by chunk straight into the sampler's level order
        (with ``common_noise``, or without a batch, one ``(d, n)`` draw: the same stream either
        way), and ``output`` is applied to each chunk in cache; the samples are written once,
        feature-major ``(d, n, *batch)``, and returned as the view ``(n, *batch, d)``, whose
        coordinate slices (a guide's sites) are contiguous. Same distribution as the base class's
        draw, not the same numbers under a seed. See :meth:`_forward_levels` for given noise.
        """
        ref = self._default_reference() if x is None else x
        if ref.device.type == "meta" or int(n) < 1:
            return super().draw(n, batch_shape, x, common_noise, output)
        x = self._check_context(x)
        batch_shape = tuple(batch_shape)
        batch, d, rest = (int(n),) + batch_shape, self.dim, math.prod(batch_shape)
        x_small = None if x is None else x.expand(batch_shape + (self.context_dim,)).unsqueeze(0)
        order, _, _ = self._level_inputs()
        source = torch.argsort(order.to(ref.device))  # output row -> level-order row
        if output is not None:
            source = source.index_select(0, output.source)
            loc, scale = output.loc.unsqueeze(1), output.scale.unsqueeze(1)
        shared = torch.randn(d, int(n), dtype=ref.dtype, device=ref.device) if common_noise or rest == 1 else None
        out = torch.empty((d,) + batch, dtype=ref.dtype, device=ref.device)
        flat_out, log_q = out.view(d, -1), torch.empty(batch, dtype=ref.dtype, device=ref.device)
        flat_q, const = log_q.view(-1), 0.5 * d * math.log(2 * math.pi)
        half = torch.full((1, d), -0.5, dtype=ref.dtype, device=ref.device)

        def load(i, j, u, spare):
            if shared is None:
                u.normal_()
            else:
                u.view(d, j - i, rest).copy_(shared[:, i:j, None].expand(d, j - i, rest))
            # the squared norm of each column as a product (a reduction over rows is ~20x slower)
            torch.mm(half, torch.mul(u, u, out=spare), out=flat_q[i * rest : j * rest].view(1, -1)).sub_(const)

        def emit(i, j, z_t, ld, spare):
            rows = torch.index_select(z_t, 0, source, out=spare)
            if output is not None:  # in cache (a broadcast addcmul is twice as slow)
                rows.mul_(scale).add_(loc)
            flat_out[:, i * rest : j * rest].copy_(rows)
            flat_q[i * rest : j * rest].sub_(ld)

        self._run_levels(batch, x_small, out, load, emit)
        return out.movedim(0, -1), log_q

    def _run_levels(self, batch: tuple, x_small, ref: torch.Tensor, load, emit) -> None:
        """The no-gradient sampler: every conditioner unit computed once, at the first pass its
        inputs are final, and the context-only units once per distinct context (see
        :class:`~pyro_struct.nn.LevelSchedule`); in chunks of about :attr:`chunk_points` points.

        Args:
            batch: ``(n, *rest)``; chunks are cut along ``n``.
            x_small: contexts ``(*small, c)`` broadcastable to ``batch`` (``None`` without context).
            ref: a tensor of the dtype and device to work in.
            load: ``load(i, j, u, spare)`` fills ``u`` ``(d, N)`` with the noise of samples ``i:j``
                in level order (``spare``: a free buffer of that shape).
            emit: ``emit(i, j, z, logdet, spare)`` takes their latents ``(d, N)`` in level order
                and ``log|det dz/deps|`` ``(N,)`` (``spare`` is free again).
        """
        d = self.dim
        order, level, ready = self._level_inputs()
        plans = []
        for net in self.conditioners:
            schedule = net.level_schedule(ready, level)
            plans.append((net, schedule, net.level_weights(schedule)))
        bounds = [0] + torch.cumsum(torch.tensor([len(r) for r in self._levels]), 0).tolist()
        step = max(1, self.chunk_points // max(math.prod(batch[1:]), 1))
        # buffers reused by every chunk of a size (fresh large tensors per chunk would cost page
        # faults); the evaluators too while every chunk sees the same contexts
        workspaces: dict = {}
        for i in range(0, batch[0], step):
            j = min(i + step, batch[0])
            one_context = x_small is None or x_small.shape[0] == 1
            xs = x_small if one_context else x_small[i:j]
            chunk = (j - i,) + tuple(batch[1:])
            n = math.prod(chunk)
            work = workspaces.get(n)
            if work is None or not one_context:
                rows = work["rows"] if work is not None else [ref.new_empty(d, n) for _ in range(3)]
                old = work["evaluators"] if work is not None else [None] * len(plans)
                evaluators = [net.level_evaluator(schedule, weights, xs, chunk, None if e is None else e.buffers)
                              for (net, schedule, weights), e in zip(plans, old)]
                work = workspaces[n] = {"rows": rows, "evaluators": evaluators}
            spare, u, z = work["rows"]
            load(i, j, u, spare)
            z_t, logdet = self._levels_chunk(u, z, plans, work["evaluators"], bounds)
            emit(i, j, z_t, logdet, spare)
        self.last_stats["forward"] = {"evaluations": self.num_passes, "passes_per_layer": self.depth + 1}

    def _levels_chunk(self, u: torch.Tensor, z: torch.Tensor, plans, evaluators, bounds: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: level-order noise ``u`` ``(d, N)`` -> latents ``(d, N)`` in level order (``u`` or
        ``z``, the layers alternate between the two buffers) and log-dets ``(N,)``."""
        logdet = u.new_zeros(u.shape[1])
        for (net, _, _), evaluator, normalizer in zip(plans, evaluators, self.normalizers):
            for t in range(self.depth + 1):
                lo, hi = bounds[t], bounds[t + 1]
                params = net.level_pass(evaluator, t, z).view(hi - lo, net.num_params, -1)
                if isinstance(normalizer, AffineNormalizer):
                    log_grad = normalizer.to_latent_into(u[lo:hi], params, z[lo:hi])
                else:
                    z_rows, log_grad = normalizer.to_latent(u[lo:hi], params.permute(0, 2, 1))
                    z[lo:hi] = z_rows
                logdet += log_grad[0] if hi - lo == 1 else log_grad.sum(0)
            u, z = z, u
        return u, logdet

    def _forward_rows(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference sampler (and the one with gradients): pass ``k`` evaluates the units with a
        path to the level-``k`` latents."""
        batch = eps.shape[:-1]
        d, c = self.dim, self.context_dim
        # feature-major (features, samples): each pass gathers a few features of every sample,
        # a contiguous copy in this layout
        u_t = eps.expand(batch + (d,)).reshape(-1, d).T.contiguous()
        n = u_t.shape[1]
        buf = u_t.new_zeros(d + c, n)
        if x is not None:
            buf[d:] = x.expand(batch + (c,)).reshape(-1, c).T
        in_place = not torch.is_grad_enabled()
        logdet = eps.new_zeros(n)
        total = 0
        for net, normalizer in zip(self.conditioners, self.normalizers):
            passes = 0
            # with gradients, every pass keeps the weight blocks it gathered until the backward
            # pass; on deep structures (a chain of T latents: T passes) that outgrows memory
            # (24 GB at T = 1000), so there the passes are recomputed in the backward pass
            weights = sum(p.numel() for p in net.parameters())
            recompute = not in_place and len(self._levels) * weights * eps.element_size() > self.recompute_bytes
            # pass k computes only the level-k latents, whose parents earlier passes made exact;
            # the conditioner evaluates only the units with a path to them
            for rows in self._levels:
                rows = rows.to(buf.device)
                if recompute:
                    params = torch.utils.checkpoint.checkpoint(net, buf, rows, use_reentrant=False).transpose(1, 2)
                else:
                    params = net(buf, rows=rows).transpose(1, 2)  # (r, N, P)
                z_rows, log_grad = normalizer.to_latent(u_t.index_select(0, rows), params)
                buf = buf.index_copy_(0, rows, z_rows) if in_place else buf.index_copy(0, rows, z_rows)
                logdet = logdet + log_grad.sum(0)
                passes += 1
            total += passes
            if in_place:
                u_t = buf[:d].clone()
                buf[:d] = 0
            else:
                u_t = buf[:d]
                buf = torch.cat([torch.zeros_like(u_t), buf[d:]])
        self.last_stats["forward"] = {"evaluations": total, "passes_per_layer": total // self.num_layers}
        return u_t.T.reshape(batch + (d,)), logdet.reshape(batch)

    def _inverse(self, z: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``(*batch, d)`` -> noise and ``log|det deps/dz|`` ``(*batch,)``; one pass per layer."""
        u = z
        logdet = z.new_zeros(())
        for net, normalizer in zip(reversed(self.conditioners), reversed(self.normalizers)):
            inp = self._inputs(u, x)
            params = net(inp)
            u, log_grad = normalizer.to_noise(inp[..., : self.dim], params)
            logdet = logdet + log_grad.sum(-1)
        self.last_stats["inverse"] = {"evaluations": self.num_layers}
        return u, logdet.expand(u.shape[:-1])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalizer={self.normalizer_name!r}, num_layers={self.num_layers}, "
            f"depth={self.depth}"
        )
