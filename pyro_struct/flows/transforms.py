"""Elementwise monotonic normalisers of the structured autoregressive flow: affine, rational-quadratic spline, UMNN.

Each maps a latent to noise and back elementwise given per-variable parameters from a
conditioner: ``to_noise(z, params) -> (u, log|du/dz|)`` and ``to_latent(u, params) -> (z, log|dz/du|)``,
with ``z``, ``u`` ``(*, d)`` and ``params`` ``(*, d, num_params)``. Zero parameters give the identity.

References: Durkan et al. (2019), Neural Spline Flows; Wehenkel & Louppe (2019), Unconstrained
Monotonic Neural Networks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AffineNormalizer", "SplineNormalizer", "UMNNNormalizer", "clenshaw_curtis"]


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class AffineNormalizer(nn.Module):
    """``u = (z - shift) / scale`` with ``scale = min_scale + softplus(raw + c)``.

    ``c`` makes a zero raw parameter give ``scale = 1`` (identity at initialisation);
    softplus keeps the scale positive without the overflow of ``exp`` and ``min_scale``
    bounds ``log scale`` from below.

    Params per variable (last dim): ``(shift, raw_scale)``.
    """

    num_params = 2
    #: the parameters a conditioner's linear skip feeds: the shift only (a linear-Gaussian
    #: conditional has a linear mean and a constant scale)
    skip_params = (0,)

    def __init__(self, min_scale: float = 1e-3):
        super().__init__()
        if not 0 < min_scale < 1:
            raise ValueError(f"min_scale must be in (0, 1); got {min_scale}")
        self.min_scale = float(min_scale)
        self._offset = _inverse_softplus(1.0 - self.min_scale)

    def _shift_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = params.unbind(-1)
        return shift, self.min_scale + F.softplus(raw + self._offset)

    def to_noise(self, z: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` and elementwise ``log|du/dz|``; ``z`` ``(*, d)``, ``params`` ``(*, d, 2)``."""
        shift, scale = self._shift_scale(params)
        return (z - shift) / scale, -torch.log(scale)

    def to_latent(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and elementwise ``log|dz/du|``; ``u`` ``(*, d)``, ``params`` ``(*, d, 2)``."""
        shift, scale = self._shift_scale(params)
        return shift + scale * u, torch.log(scale)

    def to_latent_into(self, u: torch.Tensor, params: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`to_latent` on feature-major parameters, writing ``z`` into ``out``; returns ``log|dz/du|``.

        The level-by-level sampler's form, with a few in-place operations on ``(r, N)`` rows.

        Args:
            u: ``(r, N)`` noise.
            params: ``(r, 2, N)``: shifts, raw scales.
            out: ``(r, N)``, receives ``z``.
        """
        scale = F.softplus(params[:, 1] + self._offset).add_(self.min_scale)
        torch.addcmul(params[:, 0], scale, u, out=out)
        return scale.log_()

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}"


class SplineNormalizer(nn.Module):
    """Monotonic rational-quadratic spline on ``[-bound, bound]`` with identity (linear) tails.

    ``num_bins`` bins; the widths and heights are softmaxes (each at least
    ``min_bin_size`` of the interval), the interior knot derivatives
    ``min_derivative + softplus(raw + c)`` (``1`` at zero raw parameters); the end-point
    derivatives are 1 so the spline joins the tails smoothly. Zero parameters give the identity.

    Params per variable (last dim): ``num_bins`` widths, ``num_bins`` heights,
    ``num_bins - 1`` derivatives (``3 * num_bins - 1``).
    """

    def __init__(self, num_bins: int = 8, bound: float = 5.0, min_bin_size: float = 1e-3, min_derivative: float = 1e-3):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1; got {num_bins}")
        if bound <= 0:
            raise ValueError(f"bound must be positive; got {bound}")
        if not 0 < min_bin_size * num_bins < 1:
            raise ValueError(f"min_bin_size * num_bins must be in (0, 1); got {min_bin_size * num_bins}")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must be in (0, 1); got {min_derivative}")
        self.num_bins = int(num_bins)
        self.bound = float(bound)
        self.min_bin_size = float(min_bin_size)
        self.min_derivative = float(min_derivative)
        self._offset = _inverse_softplus(1.0 - self.min_derivative)

    @property
    def num_params(self) -> int:
        return 3 * self.num_bins - 1

    def _knots(self, raw: torch.Tensor) -> torch.Tensor:
        """Knot positions ``(*, K + 1)`` from raw bin sizes ``(*, K)``, from ``-B`` to ``B`` exactly."""
        K = self.num_bins
        sizes = self.min_bin_size + (1 - self.min_bin_size * K) * torch.softmax(raw, -1)
        knots = F.pad(torch.cumsum(sizes, -1), (1, 0)) * (2 * self.bound) - self.bound
        # pin the ends so that round-off in the cumsum cannot move the tails
        knots = torch.cat([torch.full_like(knots[..., :1], -self.bound), knots[..., 1:-1],
                           torch.full_like(knots[..., :1], self.bound)], -1)
        return knots

    def _spline(self, params: torch.Tensor, y: torch.Tensor, inverse: bool):
        K = self.num_bins
        xk = self._knots(params[..., :K])
        yk = self._knots(params[..., K : 2 * K])
        inner = self.min_derivative + F.softplus(params[..., 2 * K :] + self._offset)
        ones = torch.ones_like(inner[..., :1])
        deriv = torch.cat([ones, inner, ones], -1)  # (*, K + 1)

        inside = (y >= -self.bound) & (y <= self.bound)
        yc = y.clamp(-self.bound, self.bound)
        knots_in = yk if inverse else xk
        idx = (yc.unsqueeze(-1) >= knots_in[..., 1:-1]).sum(-1, keepdim=True)  # bin index (*, 1)

        def at(t, offset=0):
            return t.gather(-1, idx + offset).squeeze(-1)

        x0, w = at(xk), at(xk, 1) - at(xk)
        y0, h = at(yk), at(yk, 1) - at(yk)
        d0, d1 = at(deriv), at(deriv, 1)
        s = h / w
        if inverse:
            dy = yc - y0
            a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
            b = h * d0 - dy * (d1 + d0 - 2 * s)
            c = -s * dy
            disc = (b * b - 4 * a * c).clamp(min=0)
            # the root in [0, 1], in the form that avoids cancellation
            xi = (2 * c) / (-b - torch.sqrt(disc))
            out = x0 + xi * w
        else:
            xi = (yc - x0) / w
            out = y0 + h * (s * xi**2 + d0 * xi * (1 - xi)) / (s + (d1 + d0 - 2 * s) * xi * (1 - xi))
        one_minus = 1 - xi
        den = s + (d1 + d0 - 2 * s) * xi * one_minus
        log_grad = (
            2 * torch.log(s)
            + torch.log(d1 * xi**2 + 2 * s * xi * one_minus + d0 * one_minus**2)
            - 2 * torch.log(den)
        )  # log dy/dx of the forward spline
        if inverse:
            log_grad = -log_grad
        out = torch.where(inside, out, y)
        log_grad = torch.where(inside, log_grad, torch.zeros_like(log_grad))
        return out, log_grad

    def to_noise(self, z: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` and elementwise ``log|du/dz|``; ``z`` ``(*, d)``, ``params`` ``(*, d, 3K - 1)``."""
        return self._spline(params, z, inverse=False)

    def to_latent(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and elementwise ``log|dz/du|``; ``u`` ``(*, d)``, ``params`` ``(*, d, 3K - 1)``."""
        return self._spline(params, u, inverse=True)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, bound={self.bound}"


def clenshaw_curtis(num_steps: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clenshaw-Curtis nodes and weights on ``[-1, 1]`` (``num_steps`` even).

    Returns:
        ``(nodes, weights)``, each ``(num_steps + 1,)``; ``sum(weights * f(nodes))``
        approximates the integral of ``f`` over ``[-1, 1]``.
    """
    N = int(num_steps)
    if N < 2 or N % 2:
        raise ValueError(f"num_steps must be an even integer >= 2; got {num_steps}")
    theta = torch.arange(N + 1, dtype=torch.float64) * math.pi / N
    nodes = torch.cos(theta)
    weights = torch.empty(N + 1, dtype=torch.float64)
    weights[0] = weights[N] = 1.0 / (N * N - 1)
    inner = torch.ones(N - 1, dtype=torch.float64)
    for k in range(1, N // 2):
        inner -= 2 * torch.cos(2 * k * theta[1:N]) / (4 * k * k - 1)
    inner -= torch.cos(N * theta[1:N]) / (N * N - 1)
    weights[1:N] = 2 * inner / N
    dtype = dtype or torch.get_default_dtype()
    return nodes.to(dtype), weights.to(dtype)


class UMNNNormalizer(nn.Module):
    """Unconstrained monotonic neural network: ``u = beta + integral_0^z g(t, e) dt`` (Wehenkel & Louppe).

    ``g > 0`` is a small MLP shared by all variables of a layer, fed the point ``t`` and the
    variable's embedding ``e`` from the conditioner; the integral is a Clenshaw-Curtis
    quadrature with ``num_steps + 1`` nodes and ``log|du/dz| = log g(z, e)``. The integrand
    is smooth (tanh hidden units, softplus output, instead of the thesis' ELU + 1) because the
    quadrature, and so the agreement of ``log g`` with the derivative of the computed map,
    converges fast only for smooth integrands. Sampling inverts by Newton's method safeguarded
    by bisection (without gradients), then takes one differentiable Newton step so that
    gradients follow the implicit function theorem.
    At initialisation ``g = 1`` and ``beta = 0``: the identity.

    Params per variable (last dim): ``(beta, e_1, ..., e_embedding_dim)``.
    """

    def __init__(self, embedding_dim: int = 8, hidden_sizes: Sequence[int] = (32, 32), num_steps: int = 40,
                 min_derivative: float = 1e-3, tolerance: float = 1e-10, max_iterations: int = 100):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1; got {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        self.min_derivative = float(min_derivative)
        self.tolerance = float(tolerance)
        self.max_iterations = int(max_iterations)
        nodes, weights = clenshaw_curtis(num_steps, torch.float64)
        # quadrature on [0, z]: t = z (x + 1) / 2, dt = z / 2 dx
        self.register_buffer("fractions", (nodes + 1) / 2, persistent=False)
        self.register_buffer("weights", weights / 2, persistent=False)
        sizes = [1 + self.embedding_dim] + [int(h) for h in hidden_sizes]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        last = nn.Linear(sizes[-1], 1)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(_inverse_softplus(1.0 - self.min_derivative))
        self.integrand_net = nn.Sequential(*layers, last)

    @property
    def num_params(self) -> int:
        return 1 + self.embedding_dim

    def integrand(self, t: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``g(t, e) > 0`` for points ``t`` ``(*)`` and embeddings ``(*, embedding_dim)``."""
        out = self.integrand_net(torch.cat([t.unsqueeze(-1), embedding], -1)).squeeze(-1)
        return self.min_derivative + F.softplus(out)

    def _map(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        beta, embedding = params[..., 0], params[..., 1:]
        frac = self.fractions.to(z.dtype)
        t = z.unsqueeze(-1) * frac  # (*, d, N + 1)
        e = embedding.unsqueeze(-2).expand(t.shape + embedding.shape[-1:])
        integral = (self.integrand(t, e) * self.weights.to(z.dtype)).sum(-1) * z
        return beta + integral

    def to_noise(self, z: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` and elementwise ``log|du/dz|``; ``z`` ``(*, d)``, ``params`` ``(*, d, 1 + embedding_dim)``."""
        return self._map(z, params), torch.log(self.integrand(z, params[..., 1:]))

    def to_latent(
        self, u: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and elementwise ``log|dz/du|`` by a safeguarded Newton solve and one differentiable Newton step.

        Args:
            u: ``(*, d)`` noise.
            params: ``(*, d, 1 + embedding_dim)``.
        """
        with torch.no_grad():
            p = params.detach()
            target = u.detach().expand(p.shape[:-1])
            tol = max(self.tolerance, 64 * torch.finfo(target.dtype).eps) * (1 + target.abs())
            # start where the root is when the integrand is 1
            root = target - p[..., 0]
            lo = torch.full_like(target, -math.inf)
            hi = torch.full_like(target, math.inf)
            for _ in range(self.max_iterations):
                residual = self._map(root, p) - target
                if (residual.abs() <= tol).all():
                    break
                # the map is increasing: the sign of the residual brackets the root
                hi = torch.where(residual > 0, root, hi)
                lo = torch.where(residual < 0, root, lo)
                newton = root - residual / self.integrand(root, p[..., 1:])
                inside = (newton > lo) & (newton < hi)
                bounded = torch.isfinite(lo) & torch.isfinite(hi)
                # Newton inside the bracket, bisection once the bracket is closed, else Newton's point
                # (which is finite since the integrand is at least min_derivative) opens it further
                root = torch.where(inside | ~bounded, newton, 0.5 * (lo + hi))
        g = self.integrand(root, params[..., 1:])
        z = root - (self._map(root, params) - u) / g
        return z, -torch.log(g)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_steps={len(self.weights) - 1}"
