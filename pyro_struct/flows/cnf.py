"""Structured continuous normalizing flow (StrCNF): a masked, time-gated neural ODE integrated with torchdiffeq.

After Weilbach et al. (2020), "Structured conditional continuous normalizing flows", and the
StrCNF of Chen et al. (2023): the velocity field ``dz/dt = f(z, x, t)`` is a StrNN whose masks
follow the inverse structure ``H`` plus the diagonal, and time enters through per-unit gates
so that it cannot open any connection the masks close.

Example:
    >>> A = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.bool)   # d=2 latents, 1 context column
    >>> flow = StructuredCNF(A, context_dim=1, hidden_sizes=(16, 16))
    >>> z, log_q = flow.rsample_and_log_prob(torch.randn(5, 1), n=3)
    >>> z.shape, log_q.shape
    (torch.Size([3, 5, 2]), torch.Size([3, 5]))
    >>> flow.last_stats["forward"]["evaluations"] == flow.num_passes > 0
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import StrNN, get_activation
from .base import ConditionalFlow

__all__ = ["StructuredCNF"]

# Orders of torchdiffeq's adaptive Runge-Kutta solvers, for the initial step-size heuristic.
_ADAPTIVE_ORDERS = {"dopri8": 8, "dopri5": 5, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}

_FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")

_TIME_GATINGS = ("gate_and_bias", "gate", "none")


class _Dynamics:
    """The augmented ODE right-hand side ``(z, l) -> (f(z, x, t), div_z f)`` of one solve.

    Holds the context and the Hutchinson probe of that solve, and counts its evaluations into
    ``flow._nfe[mode]`` (``mode`` switches to ``"backward"`` once the solve has returned, so the
    adjoint's backward solve is counted separately).
    """

    def __init__(self, flow: "StructuredCNF", x: torch.Tensor | None, probe: torch.Tensor | None, mode: str):
        self.flow = flow
        self.x = x
        self.probe = probe
        self.mode = mode

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z, _ = state
        self.flow._nfe[self.mode] += 1
        f, div = self.flow._velocity_and_divergence(z, self.x, t, self.probe)
        return f, div


class StructuredCNF(ConditionalFlow):
    """A continuous normalizing flow whose velocity field respects an inverse structure.

    ``dz/dt = f(z, x, t)`` for ``t`` in ``[0, T]``: ``z(0) = eps`` is standard normal noise and
    ``z(T)`` the sample. ``f`` is a StrNN over the inputs ``[z, x]`` with adjacency ``A_f = A``
    plus the latent diagonal (``A_f[i, i] = True``): output ``f_i`` sees exactly ``z_i`` and
    ``H``'s parents of ``i``. Since ``H`` is strictly lower-triangular among latents, ``z_i(T)``
    then depends only on ``eps_j`` and ``x_k`` that reach ``i`` by a path in ``H``.

    Every layer is ``p = (W ⊙ M) h + b`` followed, per unit, by a time gate
    ``p * sigmoid(a * t + c) + g * t`` (``time_gating="gate_and_bias"``, the ConcatSquash
    layer of FFJORD), ``p * sigmoid(a * t + c)`` (``"gate"``, Weilbach et al.'s eq. 3), or
    nothing (``"none"``, an autonomous ODE). A per-unit gate scales a unit's output and so
    leaves the mask pattern intact, whereas concatenating ``t`` as an input would not.

    The log-determinant is integrated alongside: ``d/dt log|det dz/deps| = div_z f = tr(df/dz)``.
    ``divergence="exact"`` (default) computes ``tr(df/dz)`` analytically as a sum over the
    masks' few diagonal paths ``z_i -> ... -> f_i`` (no loop over dimensions, no autograd, no
    double backward; cheaper than the forward pass for the usual widths). ``"hutchinson"`` gives
    the unbiased estimate ``v^T (df/dz) v`` with one probe ``v`` per solve (Rademacher or
    Gaussian), from a forward-mode Jacobian-vector product at the cost of one more forward pass.

    **Why the diagonal is in the mask.** Without it (``include_diagonal=False``) ``df/dz`` is
    strictly lower-triangular, so ``div f`` is identically zero: the flow is volume-preserving,
    ``log|det dz/deps| = 0`` for every input, and ``z_i`` can only be ``eps_i`` shifted by a
    function of its parents — it cannot rescale or reshape any marginal. The option exists to
    document (and test) this.

    Args:
        adjacency: ``(d, d + context_dim)`` bool tensor (strictly lower-triangular among latents).
        context_dim: number of context columns.
        hidden_sizes: widths of the hidden layers of ``f`` (widened if too narrow for ``A_f``).
        activation: a smooth activation of :data:`pyro_struct.nn.ACTIVATIONS` (``"tanh"`` default,
            ``"softplus"``, ``"silu"``, ``"gelu"``, ``"lipswish"``): an adaptive solver's error control
            assumes a smooth velocity field (ReLU kinks cost steps).
        time_gating: ``"gate_and_bias"`` (default), ``"gate"`` or ``"none"``.
        T: end time; both directions integrate over the same interval ``[0, T]``.
        method: a torchdiffeq method (``"dopri5"`` default; ``"rk4"`` etc. with
            ``options={"step_size": ...}``).
        rtol, atol: solver tolerances.
        options: extra torchdiffeq solver options (e.g. ``step_size``, ``max_num_steps``).
        adjoint: use ``odeint_adjoint`` (memory O(1) in the number of steps; gradients are then
            those of the adjoint ODE, equal to backprop's up to the tolerances).
        adjoint_options: options for the adjoint's backward solve (default: ``options``).
        divergence: ``"exact"`` or ``"hutchinson"``.
        hutchinson_noise: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        include_diagonal: add the latent diagonal to ``f``'s mask (see above); keep ``True``.
        skip: add a masked, time-independent linear map ``[z, x] -> f`` (zero-initialised).
        mask_method: mask factorisation, ``"greedy"`` or ``"made"`` (``method`` is the ODE solver).

    The CNF is one ODE, so it has no ``num_layers`` option; :attr:`num_passes` is the number of
    velocity evaluations (NFE) of the last sampling solve, ``None`` before any.

    Attributes:
        last_stats: ``{"forward": {"evaluations", "nfe"}, "inverse": {"evaluations", "nfe"}}``:
            the function evaluations of the latest solve in each direction (absent before one).
        nfe: cumulative counts, keys ``"forward"``, ``"inverse"`` and ``"backward"`` (the
            evaluations of adjoint backward solves, made during ``.backward()``);
            :meth:`reset_nfe` zeroes them and clears :attr:`last_stats`.

    Shapes: ``eps``, ``z`` ``(*batch, d)``; ``x`` ``(*batch, context_dim)`` or ``None`` (a context
    with fewer batch dimensions broadcasts).

    Adaptive solvers get their first step size from a gradient-free Hairer-Wanner estimate
    (two evaluations, counted in NFE): torchdiffeq's own estimate is differentiable, which
    would leak a tolerance-sized dependence of ``z_i`` on every input into the autograd
    Jacobian and break its structural zeros. Later step sizes are already detached.
    """

    def __init__(
        self,
        adjacency: torch.Tensor,
        context_dim: int = 0,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        time_gating: str = "gate_and_bias",
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: dict | None = None,
        adjoint: bool = False,
        adjoint_options: dict | None = None,
        divergence: str = "exact",
        hutchinson_noise: str = "rademacher",
        include_diagonal: bool = True,
        skip: bool = False,
        mask_method: str = "greedy",
    ):
        super().__init__(adjacency, context_dim)
        get_activation(activation, width=1, require="smooth")  # fail before the masks are built
        if time_gating not in _TIME_GATINGS:
            raise ValueError(f"time_gating must be one of {_TIME_GATINGS}; got {time_gating!r}")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T (the end time) must be a positive finite number; got {T!r}")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson'; got {divergence!r}")
        if hutchinson_noise not in ("rademacher", "gaussian"):
            raise ValueError(f"hutchinson_noise must be 'rademacher' or 'gaussian'; got {hutchinson_noise!r}")
        if method not in _ADAPTIVE_ORDERS and method not in _FIXED_GRID_METHODS:
            raise ValueError(
                f"method must be a torchdiffeq solver: adaptive {sorted(_ADAPTIVE_ORDERS)} or fixed-grid "
                f"{list(_FIXED_GRID_METHODS)} (with options={{'step_size': ...}}); got {method!r}"
            )
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive; got rtol={rtol}, atol={atol}")
        import torchdiffeq  # noqa: F401  (fail here, with the name of the missing package, not mid-solve)

        d = self.dim
        A_f = self.adjacency.clone()
        if include_diagonal:
            A_f[:, :d] |= torch.eye(d, dtype=torch.bool)
        self.register_buffer("velocity_adjacency", A_f, persistent=False)
        self.activation = activation.lower()
        self.time_gating = time_gating
        self.T = float(T)
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.options = dict(options or {})
        self.adjoint = bool(adjoint)
        self.adjoint_options = None if adjoint_options is None else dict(adjoint_options)
        self.divergence = divergence
        self.hutchinson_noise = hutchinson_noise
        self.include_diagonal = bool(include_diagonal)

        # the StrNN's masked pass, with the time gates as its post-linear hook
        self.net = StrNN(A_f, hidden_sizes, num_params=1, skip=skip, activation=self.activation,
                         mask_method=mask_method, require="smooth")
        widths = [layer.out_features for layer in self.net.layers]
        if time_gating != "none":
            self.gate_weight = nn.ParameterList(nn.Parameter(torch.empty(w).uniform_(-1.0, 1.0)) for w in widths)
            self.gate_bias = nn.ParameterList(nn.Parameter(torch.empty(w).uniform_(-1.0, 1.0)) for w in widths)
        if time_gating == "gate_and_bias":
            self.time_bias = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths)

        self.register_buffer("_diag_paths", self._diagonal_paths(), persistent=False)
        self._nfe = {"forward": 0, "inverse": 0, "backward": 0}

    # ------------------------------------------------------------------ counts
    def reset_nfe(self) -> None:
        """Zero the cumulative and the latest function-evaluation counts."""
        for k in self._nfe:
            self._nfe[k] = 0
        self.last_stats.clear()

    @property
    def num_passes(self) -> int | None:
        """Velocity evaluations (NFE) of the last sampling (``forward``) solve; ``None`` before any."""
        stats = self.last_stats.get("forward")
        return None if stats is None else stats["evaluations"]

    @property
    def nfe(self) -> dict[str, int]:
        """Cumulative function evaluations: ``"forward"``, ``"inverse"`` and ``"backward"`` (adjoint solves)."""
        return dict(self._nfe)

    # ---------------------------------------------------------------- dynamics
    def _gate(self, t: torch.Tensor):
        """The post-linear hook of the masked pass at time ``t``: layer ``k``'s per-unit time gate,
        returning the gated values and their slope (the gate) so the pass keeps the derivative."""
        if self.time_gating == "none":
            return None

        def gate_layer(k: int, p: torch.Tensor):
            gate = torch.sigmoid(self.gate_weight[k] * t + self.gate_bias[k])
            out = p * gate
            if self.time_gating == "gate_and_bias":
                out = out + self.time_bias[k] * t
            return out, gate

        return gate_layer

    def _velocity_and_divergence(
        self, z: torch.Tensor, x: torch.Tensor | None, t: torch.Tensor, probe: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(z, x, t)`` ``(*batch, d)`` and its divergence (exact, or ``probe``'s estimate) ``(*batch,)``.

        Hutchinson: the Jacobian-vector product ``(df/dz) probe`` is carried forward through the
        layers at the cost of one more forward pass. Exact: see :meth:`_exact_divergence`.
        """
        d = self.dim
        t = t.to(z.dtype)
        inputs = z if x is None else torch.cat([z, x], -1)
        result = self.net.run(inputs, post=self._gate(t), need_slopes=probe is None, tangent=probe)
        f = result.output
        jvp = result.tangent
        skip = self.net.skip
        if skip is not None:
            S = skip.masked_weight
            f = f + nn.functional.linear(inputs, S)
            if probe is not None:
                jvp = jvp + nn.functional.linear(probe, S[:, :d])
        if probe is not None:
            div = (jvp * probe).sum(-1)
        else:
            div = self._exact_divergence(result.slopes[:-1], result.slopes[-1])
            if skip is not None:
                div = div + torch.diagonal(skip.masked_weight[:, :d]).sum()
            div = div.expand(f.shape[:-1])
        return f, div

    def _exact_divergence(self, slopes: list[torch.Tensor], out_gate: torch.Tensor | None) -> torch.Tensor:
        """``tr(df/dz)`` as a sum over the masked network's diagonal paths ``z_i -> ... -> f_i``.

        ``df_i/dz_i = g_i * sum_paths W_L[i, k_H] s_H[k_H] ... W_2[k_2, k_1] s_1[k_1] W_1[k_1, i]``
        with ``s_l`` the hidden slopes and ``g`` the output gate. The masks admit few such paths
        (greedy masks route ``z_i`` to ``f_i`` only through units whose input pattern fits row
        ``i`` of ``A_f``: e.g. 188 paths for ecoli70 at width 64, against ``d * 64**2 = 90112``
        multiply-adds per sample for a dense forward-mode Jacobian diagonal). The paths are
        enumerated once from the masks (:meth:`_diagonal_paths`), so the cost per evaluation is a
        gather and a product over them. Returns ``(*batch,)`` (or ``()`` without hidden layers).
        """
        paths = self._diag_paths
        i = paths[0]
        W = [layer.masked_weight for layer in self.net.layers]
        if len(W) == 1:
            coef = W[0][i, i]
        else:
            coef = W[0][paths[1], i] * W[-1][i, paths[-1]]
            for l in range(1, len(W) - 1):
                coef = coef * W[l][paths[l + 1], paths[l]]
        if out_gate is not None:
            coef = coef * out_gate[i]
        for l, slope in enumerate(slopes):
            coef = coef * slope.index_select(-1, paths[l + 1])
        return coef.sum(-1)

    def _diagonal_paths(self) -> torch.Tensor:
        """Every path ``z_i -> k_1 -> ... -> k_H -> f_i`` through the masks: ``(H + 1, n_paths)`` long,
        row 0 the latent ``i``, row ``l`` the unit of hidden layer ``l``."""
        d = self.dim
        masks = [layer.mask for layer in self.net.layers]
        if len(masks) == 1:
            i = torch.nonzero(torch.diagonal(masks[0][:, :d])).flatten()
            return i.unsqueeze(0)
        # reach[l][k, i]: hidden unit k of layer l + 1 has a path to output i
        reach = [masks[-1].T.clone()]
        for M in reversed(masks[1:-1]):
            reach.insert(0, (M.T.float() @ reach[0].float()) > 0)
        # start at (i, k_1) with z_i -> k_1 and k_1 able to reach f_i, then extend one layer at a time
        k1, i = torch.nonzero(masks[0][:, :d] & reach[0]).T
        paths = [i, k1]
        for l in range(1, len(masks) - 1):
            ok = masks[l].T[paths[-1]] & reach[l].T[paths[0]]  # (n_paths, width_l)
            p, k = torch.nonzero(ok).T
            paths = [q[p] for q in paths] + [k]
        return torch.stack(paths)

    def velocity(self, z: torch.Tensor, x: torch.Tensor | None = None, t: float | torch.Tensor = 0.0) -> torch.Tensor:
        """The velocity field ``f(z, x, t)``.

        ``z`` ``(*batch, d)`` and ``x`` ``(*batch, context_dim)`` (broadcast) -> ``(*batch, d)``.
        """
        z, x = self._validate(z, x, "z")
        return self._velocity_and_divergence(z, x, torch.as_tensor(t, dtype=z.dtype, device=z.device), None)[0]

    def divergence_at(
        self,
        z: torch.Tensor,
        x: torch.Tensor | None = None,
        t: float | torch.Tensor = 0.0,
        probe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``div_z f(z, x, t)`` ``(*batch,)``: exact, or the Hutchinson estimate ``probe^T (df/dz) probe``
        when a probe ``(*batch, d)`` is given."""
        z, x = self._validate(z, x, "z")
        if probe is not None:
            probe = probe.expand(z.shape)
        return self._velocity_and_divergence(z, x, torch.as_tensor(t, dtype=z.dtype, device=z.device), probe)[1]

    # ------------------------------------------------------------------ solves
    def _probe(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.divergence == "exact":
            return None
        if self.hutchinson_noise == "gaussian":
            return torch.randn_like(like)
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1

    @staticmethod
    def _rms(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # torchdiffeq's default norm for tuple states: the largest per-tensor RMS
        return torch.stack([s.pow(2).mean().sqrt() for s in state]).max()

    @torch.no_grad()
    def _first_step(self, func: _Dynamics, t0: torch.Tensor, t1: torch.Tensor, y0: tuple[torch.Tensor, ...]) -> float:
        """Hairer-Wanner initial step size (Solving ODEs I, II.4), without gradients."""
        order = _ADAPTIVE_ORDERS[self.method] - 1  # torchdiffeq passes order - 1
        sign = 1.0 if t1 > t0 else -1.0
        f0 = func(t0, y0)
        scale = tuple(self.atol + self.rtol * y.abs() for y in y0)
        d0 = self._rms(tuple(y / s for y, s in zip(y0, scale)))
        d1 = self._rms(tuple(f / s for f, s in zip(f0, scale)))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else float(0.01 * d0 / d1)
        y1 = tuple(y + sign * h0 * f for y, f in zip(y0, f0))
        f1 = func(t0 + sign * h0, y1)
        d2 = float(self._rms(tuple((b - a) / s for a, b, s in zip(f0, f1, scale)))) / h0
        if max(float(d1), d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(float(d1), d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1, abs(float(t1 - t0)))

    def _solve(self, v: torch.Tensor, x: torch.Tensor | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``(v, 0)`` from ``0`` to ``T`` (``mode="forward"``) or ``T`` to ``0`` (``"inverse"``)."""
        from torchdiffeq import odeint, odeint_adjoint

        ref = self._reference()
        if ref.is_floating_point() and v.dtype != ref.dtype:
            raise ValueError(
                f"input dtype {v.dtype} does not match the flow's parameters ({ref.dtype}); convert one of them"
            )
        ends = [0.0, self.T] if mode == "forward" else [self.T, 0.0]
        t = torch.tensor(ends, dtype=v.dtype, device=v.device)
        y0 = (v, torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device))
        func = _Dynamics(self, x, self._probe(v), mode)
        start = self._nfe[mode]
        options = dict(self.options)
        if self.method in _ADAPTIVE_ORDERS and "first_step" not in options:
            options["first_step"] = self._first_step(func, t[0], t[1], y0)
        try:
            if self.adjoint:
                params = tuple(p for p in self.parameters() if p.requires_grad)
                if x is not None and x.requires_grad:
                    params = params + (x,)
                adjoint_options = dict(self.options) if self.adjoint_options is None else dict(self.adjoint_options)
                adjoint_options.pop("norm", None)
                zs, ls = odeint_adjoint(
                    func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=options,
                    adjoint_options=adjoint_options, adjoint_params=params,
                )
            else:
                zs, ls = odeint(func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=options)
        finally:
            # evaluations after this point come from an adjoint backward solve
            func.mode = "backward"
        nfe = self._nfe[mode] - start
        self.last_stats[mode] = {"evaluations": nfe, "nfe": nfe}
        return zs[-1], ls[-1]

    def _forward(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``eps`` ``(*batch, d)`` from ``t=0`` to ``T``.

        Returns:
            ``z`` ``(*batch, d)`` and ``log|det dz/deps| = ∫_0^T div f dt`` ``(*batch,)``.
        """
        return self._solve(eps, x, "forward")

    def _inverse(self, z: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``z`` ``(*batch, d)`` from ``t=T`` back to ``0``.

        Returns:
            ``eps`` ``(*batch, d)`` and ``log|det deps/dz| = -∫_0^T div f dt`` ``(*batch,)``.
        """
        return self._solve(z, x, "inverse")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden={self.net.hidden_sizes}, T={self.T}, method={self.method!r}, "
            f"rtol={self.rtol}, atol={self.atol}, divergence={self.divergence!r}, adjoint={self.adjoint}, "
            f"time_gating={self.time_gating!r}, include_diagonal={self.include_diagonal}"
        )
