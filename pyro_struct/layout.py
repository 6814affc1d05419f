"""How site values map to the flow's vectors: the latent layout (unconstrained, ordered) and the observed context.

Both are plain ``nn.Module`` s holding index permutations and standardisation statistics as buffers
(no Pyro state), so they move with ``.to(device)`` and are saved with the guide's ``state_dict``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.distributions import biject_to

from .flows.base import OutputMap

__all__ = ["SiteBlock", "LatentLayout", "ObservedLayout", "PlateLayout", "NestedPlateLayout", "robust_moments",
           "compress_tails", "CONTEXT_TAIL", "LevelMoments"]


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _sum_to_batch(t: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Sum a per-element tensor ``(*batch, *rest)`` (or a broadcastable one) down to ``batch_shape``."""
    k = len(batch_shape)
    t = torch.as_tensor(t)
    while t.dim() < k:
        t = t.unsqueeze(0)
    return t.reshape(t.shape[:k] + (-1,)).sum(-1).expand(batch_shape)


#: the standard normal's 97.5% quantile
_NORMAL_975 = 1.959963984540054

#: rows whose quantiles :func:`robust_moments` computes at most
_QUANTILE_ROWS = 1 << 16


def robust_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column location and scale of the finite rows of ``x`` ``(n, k)``: the median and the
    central 95% range over ``2 * 1.96`` (the mean and sd of a normal column); a constant or missing
    column gets scale 1.

    Quantiles, not moments: under a heavy-tailed prior (eight schools' ``HalfCauchy``) a few
    simulations of size 1e4 made the sd 1,000 times the typical value, which squashed every
    ordinary observation to a context of about 0 (and the flow could not tell them apart).
    The 95% range, not the 68% one: it is about the sd where tails are exponential or lighter
    (Laplace: 1.08 sd, where the 68% range gives 0.81 sd), so fewer draws land beyond a spline
    normaliser's interval (``bound = 5`` scales; a spline is the identity outside it and cannot
    move mass there). With the 68% range the arithmetic circuit's Laplace-tailed ``z0``, ``z1``,
    ``z3`` put 3-4x more posteriors beyond it and the spline StrAF's symmetrised KL was 10x worse
    (8.1 against 0.71 nats after 40 CPU-s; ``benchmarks/results/NOTES.md``, seventh session).
    """
    if x.shape[-1] == 0:
        return x.new_zeros(0), x.new_ones(0)
    finite = torch.isfinite(x).all(-1)
    x = x[finite] if finite.any() else torch.zeros_like(x)
    if x.shape[0] < 2:
        return x.mean(0), torch.ones_like(x[0])
    q = torch.tensor([0.025, 0.5, 0.975], dtype=x.dtype, device=x.device)
    # (torch.quantile refuses inputs over 2^24 elements: pooled plate members or 10^5 observed
    # coordinates exceed that; an evenly strided subset of rows estimates the quantiles as well for a
    # standardisation, and the columns go in chunks)
    rows = x[:: max(1, -(-x.shape[0] // _QUANTILE_ROWS))]
    width = max(1, (1 << 24) // rows.shape[0])
    lo, loc, hi = torch.cat([torch.quantile(rows[:, j : j + width], q, dim=0) for j in range(0, x.shape[1], width)], -1)
    scale = (hi - lo) / (2 * _NORMAL_975)
    # constant coordinates (or a discrete one with most of its mass at one value) would divide by ~zero
    sd = x.std(0)
    scale = torch.where(torch.isfinite(scale) & (scale > 1e-6), scale, torch.where(sd > 1e-6, sd, torch.ones_like(sd)))
    return loc, scale


#: standardised context values beyond this many (robust) sds are compressed logarithmically
CONTEXT_TAIL = 5.0


def compress_tails(s: torch.Tensor, bound: float | None = None) -> torch.Tensor:
    """The identity on ``[-bound, bound]`` (default :data:`CONTEXT_TAIL`) and
    ``sign(s) (bound + asinh(|s| - bound))`` outside: a smooth (twice differentiable), strictly increasing map, so no information is lost, that keeps a
    standardised context of any size ``(*batch, c)`` below ``bound + 90`` in float32.

    Why: a simulation far in a heavy tail (a ``HalfCauchy`` scale of 2e4 gave an observation of
    4e4, 144 sds) fed the flow's linear skip a huge input; its latents overflowed to ``inf`` and the
    training loss with them. Inside ``bound`` (all but about 6e-7 of a normal context) nothing changes.
    """
    bound = CONTEXT_TAIL if bound is None else bound
    if math.isinf(bound):
        return s
    excess = s.abs() - bound
    return torch.where(excess > 0, s.sign() * (bound + torch.asinh(excess.clamp(min=0))), s)


def _is_identity(t) -> bool:
    """Whether a ``biject_to`` transform is the identity (``real`` supports: an empty composition)."""
    T = torch.distributions.transforms
    if isinstance(t, T.IndependentTransform):
        return _is_identity(t.base_transform)
    return isinstance(t, T.ComposeTransform) and all(_is_identity(p) for p in t.parts)


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

    def constrain(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconstrained ``u`` ``(*batch, *node_shape)`` -> the site's value and the elementwise
        ``log|d value / d u|``, with ``u`` first held within ``+-log(finfo.max) / 2`` for a
        transform that is not the identity (44 in float32).

        Why: the flow's sample is finite, but ``exp`` of a coordinate above 88 is ``inf`` in float32,
        and a reverse objective's gradient through an infinite value is NaN even where its term is
        masked out (``0 * inf``). Inside the bound (``exp(44) = 1e19``) nothing changes; beyond it the
        value stops there and its gradient is zero.
        """
        if not _is_identity(self.transform) and u.is_floating_point():
            bound = math.log(torch.finfo(u.dtype).max) / 2
            u = u.clamp(-bound, bound)
        v = self.transform(u)
        return v, self.transform.log_abs_det_jacobian(u, v)

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

    @property
    def constrained(self) -> bool:
        """Whether some latent site has a support other than the reals (a nonlinear ``biject_to``)."""
        return any(not _is_identity(b.transform) for b in self.blocks)

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
            if _is_identity(b.transform):  # a real site: no Jacobian (and no pass over 10^6 zeros)
                values[b.name] = u
                continue
            v, site_ladj = b.constrain(u)
            ladj = ladj + _sum_to_batch(site_ladj, batch_shape)
            values[b.name] = v
        return values, ladj

    def to_flow(self, u: torch.Tensor) -> torch.Tensor:
        """Trace-order ``u`` ``(*batch, d)`` -> the flow's standardised ``y`` ``(*batch, d)``."""
        # a 2-D gather along the last dim is several times faster than a batched one
        return (u.reshape(-1, u.shape[-1]).index_select(-1, self.perm).view(u.shape) - self.loc) / self.scale

    def from_flow(self, y: torch.Tensor) -> torch.Tensor:
        """The flow's ``y`` ``(*batch, d)`` -> trace-order ``u`` ``(*batch, d)``."""
        return self.output_map().apply(y)

    def output_map(self) -> OutputMap:
        """:meth:`from_flow` as an :class:`~pyro_struct.flows.base.OutputMap` (which a flow's sampler may fold in)."""
        return OutputMap(self.inv_perm, self.loc[self.inv_perm], self.scale[self.inv_perm])

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
        return compress_tails((flat.index_select(-1, self.perm) - self.loc) / self.scale)

    @torch.no_grad()
    def set_statistics(self, flat: torch.Tensor) -> None:
        """Standardise by the moments of flat observed samples ``(n, c)`` (trace order)."""
        if self.dim:
            loc, scale = robust_moments(flat.index_select(-1, self.perm))
            self.loc.copy_(loc)
            self.scale.copy_(scale)


class _PlateSite:
    """One site of a plate layout: a :class:`SiteBlock` and where its plate dimension is."""

    def __init__(self, info, plate_pos: int | None):
        self.block = SiteBlock(info)
        self.name = info.name
        self.pos = plate_pos
        self.shape = self.block.shape
        rest = [s for i, s in enumerate(self.shape) if i != plate_pos]
        self.width = _numel(rest) if plate_pos is not None else self.block.size

    def batch_shape(self, v: torch.Tensor, where: str, what: str) -> tuple[torch.Size, int | None]:
        """``(batch shape, N)`` of a value ``(*batch, *shape)`` whose plate dimension may have any size."""
        k = len(self.shape)
        tail = tuple(v.shape[v.dim() - k :]) if v.dim() >= k else None
        if self.pos is None:
            return self.block.check_shape(v, where, what), None
        ok = tail is not None and all(a == b for i, (a, b) in enumerate(zip(tail, self.shape)) if i != self.pos)
        if not ok:
            want = tuple("N" if i == self.pos else s for i, s in enumerate(self.shape))
            raise ValueError(
                f"{where}: {what} for site {self.name!r} has shape {tuple(v.shape)} but the guide expects "
                f"shape {want} with N members of the plate (optionally with leading batch dimensions)"
            )
        return v.shape[: v.dim() - k], int(tail[self.pos])

    def to_matrix(self, v: torch.Tensor, nb: int) -> torch.Tensor:
        """``(*batch, *shape)`` -> ``(*batch, N, width)`` (plate dimension first, the rest flattened)."""
        return v.movedim(nb + self.pos, nb).reshape(v.shape[:nb] + (v.shape[nb + self.pos], self.width))

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """``(*batch, N, width)`` -> ``(*batch, *shape)`` with that ``N``."""
        nb = m.dim() - 2
        rest = tuple(s for i, s in enumerate(self.shape) if i != self.pos)
        return m.reshape(m.shape[: nb + 1] + rest).movedim(nb, nb + self.pos)

    def member_labels(self) -> list[str]:
        """Member 0's node labels, in the order of the matrix columns."""
        from .graph import node_label

        rest = [range(s) for i, s in enumerate(self.shape) if i != self.pos]
        out = []
        for idx in itertools.product(*rest):
            full = list(idx)
            full.insert(self.pos, 0)
            out.append(node_label(self.name, tuple(full), self.shape))
        return out


class LevelMoments:
    """Standardisation buffers ``{name}_loc`` / ``{name}_scale`` per level of a shared-weight layout
    (plate, nested plate, chain): :attr:`moment_names` lists the levels, each pooled over its members."""

    moment_names: tuple = ()

    def _reset(self) -> None:
        """Every level back to the identity standardisation (loc 0, scale 1)."""
        for name in self.moment_names:
            getattr(self, f"{name}_loc").zero_()
            getattr(self, f"{name}_scale").fill_(1.0)

    def _copy_moments(self, pairs) -> None:
        """Set ``{name}_loc`` / ``{name}_scale`` to the robust moments of each ``(name, values (..., k))`` pair."""
        for name, y in pairs:
            if y is not None and y.shape[-1]:
                loc, scale = robust_moments(y.reshape(-1, y.shape[-1]))
                getattr(self, f"{name}_loc").copy_(loc)
                getattr(self, f"{name}_scale").copy_(scale)


class PlateLayout(LevelMoments, nn.Module):
    """Site values <-> the plate flow's globals ``(*batch, g)`` and members ``(*batch, N, k)``, for any ``N``.

    Latent sites outside the plate form the global vector (in the template's ``global_order``),
    those inside it the member matrix (columns in ``member_order``); observed sites likewise form
    the global context and the member observations (trace order). The plate's size is read from
    the values, so one layout serves every data-set size. Standardisation is per global
    coordinate and per member coordinate (shared by all members).

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet` (a site is in the plate or outside every plate).
        template: the :class:`~pyro_struct.plates.PlateInverse`.

    Attributes:
        global_labels, member_labels: latent labels of the flow's globals / member-0 columns.
        global_observed_labels, member_observed_labels: observed labels of the context columns.
    """

    moment_names = ("global", "member", "global_obs", "member_obs")

    def __init__(self, bn, template):
        super().__init__()
        self.plate, self.traced_size = template.plate, int(template.size)
        pos = {s: template.positions[s][1] for s in template.positions}
        self.latent = [_PlateSite(bn.sites[s], pos.get(s)) for s in bn.latent_sites]
        self.observed = [_PlateSite(bn.sites[s], pos.get(s)) for s in bn.observed_sites]
        g_sites = [s for s in self.latent if s.pos is None]
        m_sites = [s for s in self.latent if s.pos is not None]
        g_trace = [label for s in g_sites for label in bn.sites[s.name].nodes]
        m_trace = [label for s in m_sites for label in s.member_labels()]
        self.global_labels, self.member_labels = list(template.global_order), list(template.member_order)
        self.global_observed_labels = [label for s in self.observed if s.pos is None for label in bn.sites[s.name].nodes]
        self.member_observed_labels = [label for s in self.observed if s.pos is not None for label in s.member_labels()]
        dtype = torch.get_default_dtype()
        self.register_buffer("global_perm", _permutation(g_trace, self.global_labels, "global latent"))
        self.register_buffer("member_perm", _permutation(m_trace, self.member_labels, "member latent"))
        for name, size in (("global", len(g_trace)), ("member", len(m_trace)),
                           ("global_obs", len(self.global_observed_labels)), ("member_obs", len(self.member_observed_labels))):
            self.register_buffer(f"{name}_loc", torch.zeros(size, dtype=dtype))
            self.register_buffer(f"{name}_scale", torch.ones(size, dtype=dtype))

    @property
    def num_globals(self) -> int:
        return len(self.global_labels)

    @property
    def member_dim(self) -> int:
        return len(self.member_labels)

    # ------------------------------------------------------------ shapes
    def _shapes(self, sites, values: Mapping[str, Any], where: str, what: str, n_members: int | None = None):
        batches, sizes = [], {}
        for s in sites:
            b, n = s.batch_shape(values[s.name], where, what)
            batches.append(b)
            if n is not None:
                sizes[s.name] = n
        if n_members is not None:
            sizes = {"the observations": n_members, **sizes}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{where}: the sites of plate {self.plate!r} have different sizes {sizes}; they must share N")
        try:
            batch = torch.broadcast_shapes(*batches) if batches else torch.Size()
        except RuntimeError:
            raise ValueError(f"{where}: the batch shapes {[tuple(b) for b in batches]} do not broadcast") from None
        n = next(iter(sizes.values())) if sizes else (self.traced_size if n_members is None else n_members)
        return torch.Size(batch), n

    def latent_batch_shape(self, values: Mapping[str, Any], n_members: int, where: str = "log_prob") -> torch.Size:
        """The batch shape of latent values site -> ``(*batch, *shape)`` (their ``N`` must be ``n_members``)."""
        for s in self.latent:
            if s.name not in values:
                raise ValueError(f"{where}: missing value for latent site {s.name!r}; pass every latent site")
        return self._shapes(self.latent, {k: torch.as_tensor(v) for k, v in values.items()}, where, "the value", n_members)[0]

    # ------------------------------------------------------------ observed
    def observe(self, values: Mapping[str, Any], where: str = "posterior", check_finite: bool = True, compress: bool = True):
        """Observed values site -> ``(*batch, *shape)`` (any ``N``) -> ``(global context (*batch, cg) or None,
        member observations (*batch, N, ko), batch, N)``, standardised and (``compress``) tail-compressed. Errors name the site."""
        known = {s.name for s in self.observed}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(f"{where}: {unknown[0]!r} is not an observed site of the model; observed sites are {sorted(known)}")
        ref = self.global_loc
        tensors = {}
        for s in self.observed:
            if values.get(s.name) is None:
                raise ValueError(f"{where}: missing observation for site {s.name!r}; pass {s.name}=...")
            v = torch.as_tensor(values[s.name], dtype=ref.dtype, device=ref.device)
            if check_finite and not torch.isfinite(v).all():
                raise ValueError(f"{where}: the observation for site {s.name!r} has non-finite values; an amortised posterior needs finite observations")
            tensors[s.name] = v
        batch, n = self._shapes(self.observed, tensors, where, "observation")
        glob = [tensors[s.name].expand(batch + s.shape).reshape(batch + (s.width,)) for s in self.observed if s.pos is None]
        memb = [s.to_matrix(tensors[s.name].expand(batch + tensors[s.name].shape[tensors[s.name].dim() - len(s.shape):]), len(batch))
                for s in self.observed if s.pos is not None]
        # (compress=False: the raw standardised values, which the statistics are computed from)
        squash = compress_tails if compress else (lambda t: t)
        g_ctx = squash((torch.cat(glob, -1) - self.global_obs_loc) / self.global_obs_scale) if glob else None
        m_obs = torch.cat(memb, -1) if memb else ref.new_zeros(batch + (n, 0))
        return g_ctx, squash((m_obs - self.member_obs_loc) / self.member_obs_scale), batch, n

    # ------------------------------------------------------------ latent
    def pack(self, values: Mapping[str, torch.Tensor], batch_shape: torch.Size, n_members: int):
        """Constrained latents (with ``n_members`` members) -> standardised ``(y_globals (*batch, g), y_members (*batch, N, k))`` and
        ``log|d value / d u|`` ``(*batch,)`` (``+inf`` outside a site's support, so that ``log q = -inf``)."""
        batch_shape = torch.Size(batch_shape)
        nb = len(batch_shape)
        ref = self.global_loc
        glob, memb, ladj = [], [], ref.new_zeros(batch_shape)
        for s in self.latent:
            v = torch.as_tensor(values[s.name], dtype=ref.dtype, device=ref.device)
            v = v.expand(batch_shape + v.shape[v.dim() - len(s.shape):])
            t = s.block.transform
            u = t.inv(v)
            site_ladj = _sum_to_batch(t.log_abs_det_jacobian(u, v), batch_shape)
            outside = _sum_to_batch((~s.block.support.check(v)).to(ref.dtype), batch_shape) > 0
            ladj = ladj + torch.where(outside, torch.full_like(site_ladj, math.inf), site_ladj)
            u = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
            (glob if s.pos is None else memb).append(u.reshape(batch_shape + (s.width,)) if s.pos is None else s.to_matrix(u, nb))
        y_g = (torch.cat(glob, -1).index_select(-1, self.global_perm) - self.global_loc) / self.global_scale if glob else ref.new_zeros(batch_shape + (0,))
        if memb:
            y_m = (torch.cat(memb, -1).index_select(-1, self.member_perm) - self.member_loc) / self.member_scale
        else:
            y_m = ref.new_zeros(batch_shape + (n_members, 0))
        return y_g, y_m, ladj

    def unpack(self, y_globals: torch.Tensor, y_members: torch.Tensor):
        """Standardised ``(*batch, g)``, ``(*batch, N, k)`` -> constrained values site -> ``(*batch, *shape)``,
        the flat unconstrained vector ``(*batch, D_N)`` (trace order) and ``log|d value / d u|`` ``(*batch,)``."""
        batch = y_members.shape[:-2]
        u_g = (self.global_loc + self.global_scale * y_globals).index_select(-1, torch.argsort(self.global_perm))
        u_m = (self.member_loc + self.member_scale * y_members).index_select(-1, torch.argsort(self.member_perm))
        u_g, u_m = u_g.expand(batch + u_g.shape[-1:]), u_m
        values, flat, ladj = {}, [], y_members.new_zeros(batch)
        go = mo = 0
        for s in self.latent:
            if s.pos is None:
                u = u_g[..., go : go + s.width].reshape(batch + s.shape)
                go += s.width
            else:
                u = s.from_matrix(u_m[..., mo : mo + s.width])
                mo += s.width
            v, site_ladj = s.block.constrain(u)
            ladj = ladj + _sum_to_batch(site_ladj, batch)
            values[s.name] = v
            flat.append(u.reshape(batch + (-1,)))
        return values, torch.cat(flat, -1), ladj

    def unflatten(self, flat: torch.Tensor, n_members: int) -> dict[str, torch.Tensor]:
        """The flat unconstrained vector ``(*batch, D_N)`` (trace order) -> unconstrained site values."""
        out, off = {}, 0
        for s in self.latent:
            shape = tuple(n_members if i == s.pos else d for i, d in enumerate(s.shape))
            size = _numel(shape)
            out[s.name] = flat[..., off : off + size].reshape(flat.shape[:-1] + shape)
            off += size
        return out

    def log_scale(self, n_members: int) -> torch.Tensor:
        """The standardisation's ``log|du/dy|`` for ``n_members`` members."""
        return self.global_scale.log().sum() + n_members * self.member_scale.log().sum()

    @torch.no_grad()
    def set_statistics(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise by simulations site -> ``(n, *shape)``: globals per coordinate, members per
        coordinate pooled over the members (and so over data sets of any size)."""
        self._reset()
        g_ctx, m_obs, batch, n = self.observe({s.name: simulations[s.name] for s in self.observed}, "standardisation", False, False)
        y_g, y_m, _ = self.pack({s.name: simulations[s.name] for s in self.latent}, batch, n)
        self._copy_moments((("global", y_g), ("member", y_m), ("global_obs", g_ctx), ("member_obs", m_obs)))

    @torch.no_grad()
    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations site -> ``(*batch, *shape)`` (members pooled);
        the latents are left unstandardised (mean 0, sd 1)."""
        for name in ("global", "member", "global_obs", "member_obs"):
            getattr(self, f"{name}_loc").zero_()
            getattr(self, f"{name}_scale").fill_(1.0)
        g_ctx, m_obs, _, _ = self.observe(observations, "standardisation", False, False)
        self._copy_moments((("global_obs", g_ctx), ("member_obs", m_obs)))


# ---------------------------------------------------------------- nested plates
class _NestedSite:
    """One site of a nested plate layout: a :class:`SiteBlock`, its level (0 global, 1 group,
    2 member) and where its plate dimensions are (outer first)."""

    def __init__(self, info, positions: dict):
        self.block = SiteBlock(info)
        self.name = info.name
        self.shape = self.block.shape
        self.where = [p for p in positions.get(info.name, (None, None))[1:] if p is not None]
        self.level = len(self.where)
        rest = [s for i, s in enumerate(self.shape) if i not in self.where]
        self.width = _numel(rest) if self.level else self.block.size

    def want(self) -> tuple:
        """The expected shape with ``G`` / ``M`` at the plate dimensions (for error messages)."""
        names = dict(zip(self.where, ("G", "M")))
        return tuple(names.get(i, s) for i, s in enumerate(self.shape))

    def batch_shape(self, v: torch.Tensor, where: str, what: str) -> tuple[torch.Size, tuple]:
        """``(batch shape, (G,) or (G, M) or ())`` of a value ``(*batch, *shape)`` whose plate dimensions may have any size."""
        k = len(self.shape)
        tail = tuple(v.shape[v.dim() - k:]) if v.dim() >= k else None
        if tail is None or any(a != b for i, (a, b) in enumerate(zip(tail, self.shape)) if i not in self.where):
            raise ValueError(
                f"{where}: {what} for site {self.name!r} has shape {tuple(v.shape)} but the guide expects shape "
                f"{self.want()} with G groups of M members (optionally with leading batch dimensions)"
            )
        return v.shape[: v.dim() - k], tuple(int(tail[p]) for p in self.where)

    def to_matrix(self, v: torch.Tensor, nb: int) -> torch.Tensor:
        """``(*batch, *shape)`` -> ``(*batch, [G, [M,]] width)`` (plate dimensions first, the rest flattened)."""
        if not self.level:
            return v.reshape(v.shape[:nb] + (self.width,))
        units = tuple(v.shape[nb + p] for p in self.where)
        moved = v.movedim([nb + p for p in self.where], list(range(nb, nb + self.level)))
        return moved.reshape(v.shape[:nb] + units + (self.width,))

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """``(*batch, [G, [M,]] width)`` -> ``(*batch, *shape)`` with those sizes."""
        if not self.level:
            return m.reshape(m.shape[:-1] + self.block.node_shape)
        nb = m.dim() - 1 - self.level
        rest = tuple(s for i, s in enumerate(self.shape) if i not in self.where)
        out = m.reshape(m.shape[:-1] + rest)
        return out.movedim(list(range(nb, nb + self.level)), [nb + p for p in self.where])

    def unit_labels(self, bn) -> list[str]:
        """Group 0's (member ``(0, 0)``'s) node labels in the order of the matrix columns; every label for a global site."""
        if not self.level:
            return list(bn.sites[self.name].nodes)
        from .graph import node_label

        rest = [range(s) if i not in self.where else [0] for i, s in enumerate(self.shape)]
        return [node_label(self.name, idx, self.shape) for idx in itertools.product(*rest)]


_LEVELS = ("global", "group", "member")


class NestedPlateLayout(LevelMoments, nn.Module):
    """Site values <-> the nested plate flow's globals ``(*batch, t)``, groups ``(*batch, G, h)``
    and members ``(*batch, G, M, k)``, for any ``G`` and ``M``.

    Latent sites outside both plates form the global vector (in the template's ``global_order``),
    those in the outer plate only the group matrix (``group_order``), those in both the member
    tensor (``member_order``); observed sites likewise (trace order). Sizes are read from the
    values, so one layout serves every number of groups and members (groups of equal size: Pyro's
    nested vectorised plates are rectangular). Standardisation is per coordinate of each level,
    shared by its groups / members.

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet`.
        template: the :class:`~pyro_struct.plates.NestedPlateInverse`.
    """

    moment_names = tuple(k for name in _LEVELS for k in (name, f"{name}_obs"))

    def __init__(self, bn, template):
        super().__init__()
        self.plate, self.inner_plate = template.outer, template.inner
        self.plates = (template.outer, template.inner)
        self.traced_sizes = tuple(int(s) for s in template.sizes)
        self.traced_size = self.traced_sizes[0]
        self.latent = [_NestedSite(bn.sites[s], template.positions) for s in bn.latent_sites]
        self.observed = [_NestedSite(bn.sites[s], template.positions) for s in bn.observed_sites]
        orders = (template.global_order, template.group_order, template.member_order)
        self.labels = [list(o) for o in orders]
        self.observed_labels = [[lab for s in self.observed if s.level == lv for lab in s.unit_labels(bn)] for lv in range(3)]
        dtype = torch.get_default_dtype()
        for lv, name in enumerate(_LEVELS):
            trace = [lab for s in self.latent if s.level == lv for lab in s.unit_labels(bn)]
            self.register_buffer(f"{name}_perm", _permutation(trace, self.labels[lv], f"{name} latent"))
            for kind, size in ((name, len(trace)), (f"{name}_obs", len(self.observed_labels[lv]))):
                self.register_buffer(f"{kind}_loc", torch.zeros(size, dtype=dtype))
                self.register_buffer(f"{kind}_scale", torch.ones(size, dtype=dtype))

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(t, h, k)``: latent coordinates per global vector, group and member."""
        return tuple(len(lab) for lab in self.labels)

    @property
    def obs_dims(self) -> tuple[int, int, int]:
        """``(cg, ch, ko)``: observed coordinates outside the plates, per group and per member."""
        return tuple(len(lab) for lab in self.observed_labels)

    def latent_dim(self, sizes: tuple) -> int:
        """Coordinates of the flat unconstrained latent vector at ``sizes = (G, M)``."""
        t, h, k = self.dims
        return t + sizes[0] * h + sizes[0] * sizes[1] * k

    def context_dim(self, sizes: tuple) -> int:
        """Observed coordinates at ``sizes = (G, M)``."""
        cg, ch, ko = self.obs_dims
        return cg + sizes[0] * ch + sizes[0] * sizes[1] * ko

    def node_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple]:
        """Site -> node shape of the latent sites at the sizes that the site shapes ``shapes`` (any sites) have."""
        sizes = self._sizes({s.name: s.batch_shape(torch.empty(tuple(shapes[s.name])), "guide call", "the value")[1]
                             for s in self.latent + self.observed if s.name in shapes}, "guide call")
        return {s.name: self._shape_at(s, sizes) if s.level else s.block.node_shape for s in self.latent}

    @staticmethod
    def _shape_at(s: _NestedSite, sizes: tuple) -> tuple:
        at = dict(zip(s.where, sizes))
        return tuple(at.get(i, d) for i, d in enumerate(s.shape))

    # ------------------------------------------------------------ shapes
    def _sizes(self, found: Mapping[str, tuple], where: str, given: tuple | None = None) -> tuple:
        """``(G, M)`` agreed by every site (``given``: the sizes the latents must have)."""
        sizes: list[dict] = [{}, {}]
        for name, units in [("the observations", given or ())] + list(found.items()):
            for i, n in enumerate(units):
                sizes[i][name] = n
        for i, plate in enumerate(self.plates):
            if len(set(sizes[i].values())) > 1:
                raise ValueError(f"{where}: the sites of plate {plate!r} have different sizes {sizes[i]}; they must share it "
                                 "(ragged groups, with different numbers of members, are not supported: pad or split them)")
        return tuple(next(iter(s.values())) if s else d for s, d in zip(sizes, given or self.traced_sizes))

    def _batch(self, sites, values, where: str, what: str, given: tuple | None = None):
        batches, found = [], {}
        for s in sites:
            b, units = s.batch_shape(values[s.name], where, what)
            batches.append(b)
            found[s.name] = units
        try:
            batch = torch.broadcast_shapes(*batches) if batches else torch.Size()
        except RuntimeError:
            raise ValueError(f"{where}: the batch shapes {[tuple(b) for b in batches]} do not broadcast") from None
        return torch.Size(batch), self._sizes(found, where, given)

    def latent_batch_shape(self, values: Mapping[str, Any], sizes: tuple, where: str = "log_prob") -> torch.Size:
        """The batch shape of latent values site -> ``(*batch, *shape)`` (their sizes must be ``sizes``)."""
        for s in self.latent:
            if s.name not in values:
                raise ValueError(f"{where}: missing value for latent site {s.name!r}; pass every latent site")
        return self._batch(self.latent, {k: torch.as_tensor(v) for k, v in values.items()}, where, "the value", sizes)[0]

    # ------------------------------------------------------------ observed
    def observe(self, values: Mapping[str, Any], where: str = "posterior", check_finite: bool = True, compress: bool = True):
        """Observed values site -> ``(*batch, *shape)`` -> ``(global context (*batch, cg) or None,
        group observations (*batch, G, ch), member observations (*batch, G, M, ko), batch, (G, M))``,
        standardised and (``compress``) tail-compressed. Errors name the site."""
        known = {s.name for s in self.observed}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(f"{where}: {unknown[0]!r} is not an observed site of the model; observed sites are {sorted(known)}")
        ref, tensors = self.global_loc, {}
        for s in self.observed:
            if values.get(s.name) is None:
                raise ValueError(f"{where}: missing observation for site {s.name!r}; pass {s.name}=...")
            v = torch.as_tensor(values[s.name], dtype=ref.dtype, device=ref.device)
            if check_finite and not torch.isfinite(v).all():
                raise ValueError(f"{where}: the observation for site {s.name!r} has non-finite values; an amortised posterior needs finite observations")
            tensors[s.name] = v
        batch, sizes = self._batch(self.observed, tensors, where, "observation")
        nb, out = len(batch), []
        for lv, name in enumerate(_LEVELS):
            parts = [s.to_matrix(tensors[s.name].expand(batch + tensors[s.name].shape[tensors[s.name].dim() - len(s.shape):]), nb)
                     for s in self.observed if s.level == lv]
            m = torch.cat(parts, -1) if parts else ref.new_zeros(batch + tuple(sizes[:lv]) + (0,))
            standardised = (m - getattr(self, f"{name}_obs_loc")) / getattr(self, f"{name}_obs_scale")
            out.append(compress_tails(standardised) if compress else standardised)
        return (out[0] if out[0].shape[-1] else None), out[1], out[2], batch, sizes

    # ------------------------------------------------------------ latent
    def pack(self, values: Mapping[str, torch.Tensor], batch_shape: torch.Size, sizes: tuple):
        """Constrained latents at ``sizes`` -> standardised ``(y_globals (*batch, t), y_groups (*batch, G, h),
        y_members (*batch, G, M, k))`` and ``log|d value / d u|`` ``(*batch,)`` (``+inf`` outside a support)."""
        batch_shape = torch.Size(batch_shape)
        nb, ref = len(batch_shape), self.global_loc
        parts, ladj = ([], [], []), ref.new_zeros(batch_shape)
        for s in self.latent:
            v = torch.as_tensor(values[s.name], dtype=ref.dtype, device=ref.device)
            v = v.expand(batch_shape + v.shape[v.dim() - len(s.shape):])
            t = s.block.transform
            u = t.inv(v)
            site_ladj = _sum_to_batch(t.log_abs_det_jacobian(u, v), batch_shape)
            outside = _sum_to_batch((~s.block.support.check(v)).to(ref.dtype), batch_shape) > 0
            ladj = ladj + torch.where(outside, torch.full_like(site_ladj, math.inf), site_ladj)
            parts[s.level].append(s.to_matrix(torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0), nb))
        ys = []
        for lv, name in enumerate(_LEVELS):
            if parts[lv]:
                y = torch.cat(parts[lv], -1).index_select(-1, getattr(self, f"{name}_perm"))
                ys.append((y - getattr(self, f"{name}_loc")) / getattr(self, f"{name}_scale"))
            else:
                ys.append(ref.new_zeros(batch_shape + tuple(sizes[:lv]) + (0,)))
        return ys[0], ys[1], ys[2], ladj

    def unpack(self, y_globals: torch.Tensor, y_groups: torch.Tensor, y_members: torch.Tensor):
        """Standardised latents of the three levels -> constrained values site -> ``(*batch, *shape)``,
        the flat unconstrained vector ``(*batch, D)`` (trace order) and ``log|d value / d u|`` ``(*batch,)``."""
        batch = y_members.shape[:-3]
        us = []
        for y, lv, name in zip((y_globals, y_groups, y_members), range(3), _LEVELS):
            u = getattr(self, f"{name}_loc") + getattr(self, f"{name}_scale") * y
            u = u.index_select(-1, torch.argsort(getattr(self, f"{name}_perm")))
            us.append(u.expand(batch + u.shape[u.dim() - 1 - lv:]))
        values, flat, ladj, offsets = {}, [], y_members.new_zeros(batch), [0, 0, 0]
        for s in self.latent:
            o = offsets[s.level]
            u = s.from_matrix(us[s.level][..., o: o + s.width])
            offsets[s.level] += s.width
            v = s.block.transform(u)
            ladj = ladj + _sum_to_batch(s.block.transform.log_abs_det_jacobian(u, v), batch)
            values[s.name] = v
            flat.append(u.reshape(batch + (-1,)))
        return values, torch.cat(flat, -1), ladj

    def unflatten(self, flat: torch.Tensor, sizes: tuple) -> dict[str, torch.Tensor]:
        """The flat unconstrained vector ``(*batch, D)`` (trace order) -> unconstrained site values at ``sizes``."""
        out, off = {}, 0
        for s in self.latent:
            shape = self._shape_at(s, sizes) if s.level else s.block.node_shape
            size = _numel(shape)
            out[s.name] = flat[..., off: off + size].reshape(flat.shape[:-1] + shape)
            off += size
        return out

    def log_scale(self, sizes: tuple) -> torch.Tensor:
        """The standardisation's ``log|du/dy|`` at ``sizes = (G, M)``."""
        G, M = sizes
        return self.global_scale.log().sum() + G * self.group_scale.log().sum() + G * M * self.member_scale.log().sum()

    @torch.no_grad()
    def set_statistics(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise by simulations site -> ``(n, *shape)``: per coordinate of each level, pooled over its groups / members."""
        self._reset()
        g, h, m, batch, sizes = self.observe({s.name: simulations[s.name] for s in self.observed}, "standardisation", False, False)
        ys = self.pack({s.name: simulations[s.name] for s in self.latent}, batch, sizes)[:3]
        self._copy_moments(list(zip(_LEVELS, ys)) + list(zip((f"{n}_obs" for n in _LEVELS), (g, h, m))))

    @torch.no_grad()
    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the observations only (latents mean 0, sd 1)."""
        self._reset()
        g, h, m, _, _ = self.observe(observations, "standardisation", False, False)
        self._copy_moments(list(zip((f"{n}_obs" for n in _LEVELS), (g, h, m))))
