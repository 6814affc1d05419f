"""How site values map to the flow's vectors: the latent layout (unconstrained, ordered) and the observed context.

Both are plain ``nn.Module`` s holding index permutations and standardisation statistics as buffers
(no Pyro state), so they move with ``.to(device)`` and are saved with the guide's ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.distributions import biject_to

__all__ = ["SiteBlock", "LatentLayout", "ObservedLayout", "robust_moments"]


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _sum_to_batch(t: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Sum a per-element tensor ``(*batch, *rest)`` (or a broadcastable one) down to ``batch_shape``."""
    k = len(batch_shape)
    t = torch.as_tensor(t)
    while t.dim() < k:
        t = t.unsqueeze(0)
    return t.reshape(t.shape[:k] + (-1,)).sum(-1).expand(batch_shape)


def robust_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and sd of the finite rows of ``x`` ``(n, k)``; a constant or missing column gets sd 1."""
    finite = torch.isfinite(x).all(-1)
    x = x[finite] if finite.any() else torch.zeros_like(x)
    loc = x.mean(0)
    scale = x.std(0) if x.shape[0] > 1 else torch.ones_like(loc)
    # constant coordinates (or a single draw) would divide by zero
    scale = torch.where(torch.isfinite(scale) & (scale > 1e-6), scale, torch.ones_like(scale))
    return loc, scale


class SiteBlock:
    """One site's slice of the flat latent (unconstrained) or observed vector, in trace order."""

    def __init__(self, info):
        self.name = info.name
        self.shape = tuple(int(s) for s in info.shape)
        self.node_shape = tuple(int(s) for s in info.node_shape)
        self.offset = int(info.offset)
        self.size = _numel(self.node_shape)
        self.support = info.support
        self.event_dim = int(getattr(info, "event_dim", 0) or 0)
        self.transform = None if info.observed else biject_to(info.support)

    def check_shape(self, v: torch.Tensor, where: str, what: str) -> torch.Size:
        """The leading batch shape of ``v`` ``(*batch, *shape)``; a ``ValueError`` naming the site otherwise."""
        k = len(self.shape)
        if v.dim() < k or tuple(v.shape[v.dim() - k :]) != self.shape:
            raise ValueError(
                f"{where}: {what} for site {self.name!r} has shape {tuple(v.shape)} but the guide was compiled "
                f"for shape {self.shape} (optionally with leading batch dimensions)"
            )
        return v.shape[: v.dim() - k]


def _permutation(labels: Sequence[str], order: Sequence[str], what: str) -> torch.Tensor:
    index = {label: i for i, label in enumerate(labels)}
    unknown = [label for label in order if label not in index]
    if unknown or len(order) != len(labels):
        raise ValueError(f"the inverse structure's {what} nodes do not match the model's ({unknown[:3]}); this is a bug")
    return torch.tensor([index[label] for label in order], dtype=torch.long)


class LatentLayout(nn.Module):
    """Latent sites <-> the flow's vector: unconstrained (``biject_to``), flattened, ordered, standardised.

    Trace order is site by site, row-major (``bn.latent_nodes``); flow order is the inverse
    structure's sampling ``order``. The flow models ``y = (u[perm] - loc) / scale``, a diagonal
    affine map of the unconstrained vector ``u`` that keeps the compiled sparsity.

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet`.
        order: latent node labels in the flow's (sampling) order.
    """

    def __init__(self, bn, order: Sequence[str]):
        super().__init__()
        self.blocks = [SiteBlock(bn.sites[s]) for s in bn.latent_sites]
        perm = _permutation(bn.latent_nodes, order, "latent")
        self.dim = len(perm)
        dtype = torch.get_default_dtype()
        # flow coordinate k <- trace-order coordinate perm[k]; inv_perm undoes it
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.register_buffer("loc", torch.zeros(self.dim, dtype=dtype))
        self.register_buffer("scale", torch.ones(self.dim, dtype=dtype))

    @property
    def sites(self) -> list[str]:
        return [b.name for b in self.blocks]

    def pack(self, values: Mapping[str, torch.Tensor], batch_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained values site -> ``(*batch, *shape)`` -> ``u`` ``(*batch, d)`` (trace order) and
        ``log|d value / d u|`` ``(*batch,)``. Values outside a site's support give ``-inf`` there."""
        batch_shape = torch.Size(batch_shape)
        ref = self.loc
        parts, ladj = [], torch.zeros(batch_shape, dtype=ref.dtype, device=ref.device)
        for b in self.blocks:
            v = torch.as_tensor(values[b.name], dtype=ref.dtype, device=ref.device).expand(batch_shape + b.shape)
            u = b.transform.inv(v)
            site_ladj = _sum_to_batch(b.transform.log_abs_det_jacobian(u, v), batch_shape)
            # a value outside the support has zero density: log q = -inf, not an extrapolation
            outside = _sum_to_batch((~b.support.check(v)).to(ref.dtype), batch_shape) > 0
            site_ladj = torch.where(outside, torch.full_like(site_ladj, math.inf), site_ladj)
            ladj = ladj + site_ladj
            parts.append(torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0).reshape(batch_shape + (b.size,)))
        return torch.cat(parts, -1), ladj

    def unpack(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``u`` ``(*batch, d)`` (trace order) -> constrained values site -> ``(*batch, *shape)`` and
        ``log|d value / d u|`` ``(*batch,)``."""
        batch_shape = flat.shape[:-1]
        values, ladj = {}, torch.zeros(batch_shape, dtype=flat.dtype, device=flat.device)
        for b in self.blocks:
            u = flat[..., b.offset : b.offset + b.size].reshape(batch_shape + b.node_shape)
            v = b.transform(u)
            ladj = ladj + _sum_to_batch(b.transform.log_abs_det_jacobian(u, v), batch_shape)
            values[b.name] = v
        return values, ladj

    def to_flow(self, u: torch.Tensor) -> torch.Tensor:
        """Trace-order ``u`` ``(*batch, d)`` -> the flow's standardised ``y`` ``(*batch, d)``."""
        return (u.index_select(-1, self.perm) - self.loc) / self.scale

    def from_flow(self, y: torch.Tensor) -> torch.Tensor:
        """The flow's ``y`` ``(*batch, d)`` -> trace-order ``u`` ``(*batch, d)``."""
        return (self.loc + self.scale * y).index_select(-1, self.inv_perm)

    def log_scale(self) -> torch.Tensor:
        """``sum log scale``: the standardisation's log-Jacobian ``log|du/dy|``."""
        return self.scale.log().sum()

    @torch.no_grad()
    def set_statistics(self, u: torch.Tensor) -> None:
        """Standardise by the moments of trace-order samples ``u`` ``(n, d)``."""
        loc, scale = robust_moments(u.index_select(-1, self.perm))
        self.loc.copy_(loc)
        self.scale.copy_(scale)


class ObservedLayout(nn.Module):
    """Observed sites -> the flow's context: flattened, in the inverse structure's observed order, standardised.

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet`.
        observed: observed node labels in the inverse structure's order.
    """

    def __init__(self, bn, observed: Sequence[str]):
        super().__init__()
        self.blocks = [SiteBlock(bn.sites[s]) for s in bn.observed_sites]
        perm = _permutation(bn.observed_nodes, observed, "observed")
        self.dim = len(perm)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", perm)
        self.register_buffer("loc", torch.zeros(self.dim, dtype=dtype))
        self.register_buffer("scale", torch.ones(self.dim, dtype=dtype))

    @property
    def sites(self) -> list[str]:
        return [b.name for b in self.blocks]

    def _tensors(self, values: Mapping[str, Any], where: str, check_finite: bool):
        known = set(self.sites)
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(
                f"{where}: {unknown[0]!r} is not an observed site of the model; observed sites are "
                f"{sorted(known)} (keyed by site name, not by model argument)"
            )
        tensors, batches = {}, []
        for b in self.blocks:
            if b.name not in values or values[b.name] is None:
                raise ValueError(
                    f"{where}: missing observation for site {b.name!r} (expected shape {b.shape} or "
                    f"(*batch, {', '.join(map(str, b.shape))})); pass {b.name}=..."
                )
            v = torch.as_tensor(values[b.name], dtype=self.loc.dtype, device=self.loc.device)
            batches.append(b.check_shape(v, where, "observation"))
            if check_finite and not torch.isfinite(v).all():
                bad = int((~torch.isfinite(v)).sum())
                raise ValueError(
                    f"{where}: the observation for site {b.name!r} has {bad} non-finite value(s) (NaN or inf); "
                    "an amortised posterior needs finite observations"
                )
            tensors[b.name] = v
        return tensors, batches

    def pack(self, values: Mapping[str, Any], where: str = "posterior", check_finite: bool = True) -> tuple[torch.Tensor, torch.Size]:
        """Observed values site -> ``(*batch, *shape)`` -> the flat vector ``(*batch, c)`` (trace order) and ``batch``.

        Leading dimensions beyond a site's shape are a batch of independent data sets (batch
        shapes must broadcast). Errors name the site and the expected shape.
        """
        tensors, batches = self._tensors(values, where, check_finite)
        try:
            batch_shape = torch.broadcast_shapes(*batches) if batches else torch.Size()
        except RuntimeError:
            raise ValueError(f"{where}: the observations' batch shapes {[tuple(s) for s in batches]} do not broadcast") from None
        parts = [tensors[b.name].expand(batch_shape + b.shape).reshape(batch_shape + (b.size,)) for b in self.blocks]
        if not parts:
            return torch.zeros(batch_shape + (0,), dtype=self.loc.dtype, device=self.loc.device), batch_shape
        return torch.cat(parts, -1), batch_shape

    def context(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The standardised context ``(*batch, c)`` of a flat observed vector ``(*batch, c)``; ``None`` when ``c = 0``."""
        if self.dim == 0:
            return None
        return (flat.index_select(-1, self.perm) - self.loc) / self.scale

    @torch.no_grad()
    def set_statistics(self, flat: torch.Tensor) -> None:
        """Standardise by the moments of flat observed samples ``(n, c)`` (trace order)."""
        if self.dim:
            loc, scale = robust_moments(flat.index_select(-1, self.perm))
            self.loc.copy_(loc)
            self.scale.copy_(scale)
