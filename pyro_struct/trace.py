"""Trace a Pyro model into a scalar Bayesian network (DESIGN.md section 3)."""

from __future__ import annotations

import gc
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import networkx as nx
import pyro
import pyro.distributions as dist
import pyro.util
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Distribution, Independent, biject_to, transform_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import IndependentTransform, Transform
from torch.overrides import TorchFunctionMode

from .errors import ModelStructureError
from .graph import BayesNet, SiteInfo

__all__ = ["trace_model"]

# Largest number of gradient entries one batched backward pass may produce; bigger
# Jacobians are computed in chunks of rows.
_JACOBIAN_CHUNK = 1 << 22
# Pair-wise dependency masks up to this many entries are kept dense, larger ones as index lists.
_DENSE_MASK_LIMIT = 1 << 22
# A site with more log-density events than this is not differentiated row by row (each row
# costs a pass over the whole site): its Jacobian sparsity is found with forward passes for
# small parents and compressed reverse passes for large ones (see _large_site_dependencies).
_LARGE_SITE_EVENTS = 128

# Tensor methods that turn tensor values into Python values: anything computed from such a
# value (control flow, indices, Python floats) escapes both provenance and autograd.
_ESCAPE_NAMES = frozenset(
    {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__",
     "__array__", "equal", "allclose", "is_nonzero"}
)
# Ops with a gradient graph but a zero derivative almost everywhere: dependencies through
# them are invisible to gradients.
_ZERO_GRAD_NAMES = frozenset({"round", "floor", "ceil", "trunc", "fix", "sign", "sgn", "heaviside"})
# Ops whose output shape depends on tensor values (dynamic shapes without a Python escape).
_DATA_SHAPE_NAMES = frozenset(
    {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
     "repeat_interleave", "histc", "nonzero_static"}
)


# ----------------------------------------------------------------------------- provenance
class _ProvenanceMode(TorchFunctionMode):
    """Site-level provenance of every tensor computed while the model runs.

    Provenance is a bit mask over site positions (bit ``i``: the ``i``-th recorded site). Each
    torch call's outputs get the union of its tensor inputs' provenance, as
    ``pyro.ops.provenance`` does, but with a mode instead of a tensor subclass, which is
    several times cheaper per op. Conversions of tagged tensors to Python values (``item``,
    ``bool``, ...) are collected in :attr:`taint`: every later site may depend on them
    through control flow.
    """

    def __init__(self):
        super().__init__()
        # id -> (tensor, bits, non-differentiable bits); the tensor is held so that its id
        # cannot be reused while tracing. The second mask holds the sites that reach the tensor
        # through at least one op that gradients cannot see through.
        self.tags: dict[int, tuple[torch.Tensor, int, int]] = {}
        self.taint = 0
        self.value_dependent_shapes = False  # a tagged tensor went through a data-shaped op

    def tag(self, t: torch.Tensor, bits: int) -> None:
        self.tags[id(t)] = (t, bits, 0)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", None)
        escape = name in _ESCAPE_NAMES
        is_tensor = isinstance(out, torch.Tensor)
        if not (escape or is_tensor or out is None or type(out) is list or type(out) is tuple):
            return out  # shapes, dtypes, flags: nothing to tag
        tags = self.tags
        bits = nd = 0
        grad_in = False  # a tagged input is on the gradient graph
        for group in (args, kwargs.values()):
            for a in group:
                if type(a) is list or type(a) is tuple:
                    for b in a:
                        e = tags.get(id(b))
                        if e is not None:
                            bits |= e[1]
                            nd |= e[2]
                            grad_in = grad_in or b.requires_grad
                else:
                    e = tags.get(id(a))
                    if e is not None:
                        bits |= e[1]
                        nd |= e[2]
                        grad_in = grad_in or a.requires_grad
        if not bits:
            return out
        if escape:
            self.taint |= bits
            return out
        if name in _DATA_SHAPE_NAMES or (name == "__getitem__" and _has_mask_index(args)):
            self.value_dependent_shapes = True
        if is_tensor or out is None:
            # out is None: __setitem__ and friends write into their first argument
            target = out if is_tensor else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if target is not None:
                # the path leaves the gradient graph (comparisons, casts, detach, no_grad) or
                # has a zero derivative (rounding): gradients cannot see this dependency
                cut = name.rstrip("_") in _ZERO_GRAD_NAMES if name else False
                cut = cut or (grad_in and not target.requires_grad and torch.is_grad_enabled())
                tags[id(target)] = (target, bits, bits if cut else nd)
            return out
        # several outputs: which input feeds which is unknown, so cut only if all are cut
        outs = [b for b in out if isinstance(b, torch.Tensor)]
        cut = name.rstrip("_") in _ZERO_GRAD_NAMES if name else False
        cut = cut or (grad_in and torch.is_grad_enabled() and not any(b.requires_grad for b in outs))
        for b in outs:
            tags[id(b)] = (b, bits, bits if cut else nd)
        return out


def _has_mask_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in parts)


_ATOMS = (str, bytes, int, float, bool, complex, torch.Size, type(None), torch.dtype, torch.device)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _object_bits(obj, mode: _ProvenanceMode, depth: int = 0, seen: set | None = None) -> tuple[int, int]:
    """Union of the provenance (all, non-differentiable) of every tensor reachable from a
    distribution's attributes."""
    tags = mode.tags
    if isinstance(obj, torch.Tensor):
        entry = tags.get(id(obj))
        return (0, 0) if entry is None else (entry[1], entry[2])
    if depth > 8 or isinstance(obj, _ATOMS) or isinstance(obj, _OPAQUE):
        return 0, 0
    if seen is None:
        seen = set()
    if id(obj) in seen:
        return 0, 0
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return 0, 0
    bits = nd = 0
    for x in children:
        if isinstance(x, torch.Tensor):
            entry = tags.get(id(x))
            if entry is not None:
                bits |= entry[1]
                nd |= entry[2]
        elif not isinstance(x, _ATOMS):
            b, n = _object_bits(x, mode, depth + 1, seen)
            bits |= b
            nd |= n
    return bits, nd


# ----------------------------------------------------------------------------- recording
def _strip_wrappers(fn: Distribution) -> Distribution:
    """The distribution under ``Independent``/``to_event``, ``mask`` and ``expand`` wrappers.

    Its ``log_prob`` gives one density per factorised element (or per joint event).
    """
    while True:
        if isinstance(fn, Independent):
            fn = fn.base_dist
        elif isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
            fn = fn.base_dist
        else:
            return fn


def _is_delta(fn: Distribution) -> bool:
    return isinstance(_strip_wrappers(fn), dist.Delta)


def _is_discrete(fn: Distribution, value: torch.Tensor) -> bool:
    support = getattr(fn, "support", None)
    if support is not None and getattr(support, "is_discrete", False):
        return True
    if getattr(fn, "has_enumerate_support", False):
        return True
    return not (value.is_floating_point() or value.is_complex())


def _elementwise_log_prob(fn: Distribution, value: torch.Tensor) -> torch.Tensor:
    """Flat per-event log density: factorised elements separately, joint events as one entry."""
    base = _strip_wrappers(fn)
    ed = base.event_dim
    batch = value.shape[: value.dim() - ed]
    lp = base.log_prob(value)
    if lp.shape != batch:
        lp = lp.expand(batch)
    return lp.reshape(-1)


@dataclass
class _Record:
    """One sample site of one model run."""

    name: str
    fn: Distribution
    value: torch.Tensor  # the leaf the model saw
    was_observed: bool  # carried obs= (or a conditioned value) in the model call
    prov: int = 0  # provenance bits of the distribution (site level)
    nondiff: int = 0  # the part of prov reached through ops that gradients cannot see through
    taint: int = 0  # provenance of values that escaped to Python before this site

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape)


@dataclass
class _Probe:
    """The sites of one model run, in trace order, and the sites passed through."""

    records: list = field(default_factory=list)
    spliced: dict = field(default_factory=dict)  # name -> why it is not a node
    # (provenance run only) whether sampled values reached Python control flow or shapes
    value_dependent: bool = False


class _ProbeMessenger(Messenger):
    """Samples every site from the prior (observed ones too) as a fresh leaf and records it."""

    def __init__(self, mode: _ProvenanceMode | None):
        super().__init__()
        self.mode = mode
        self.probe = _Probe()
        self._names: set = set()
        self._pending: dict = {}

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        name = msg["name"]
        infer = msg.get("infer") or {}
        fn = msg["fn"]
        if infer.get("is_auxiliary"):
            self.probe.spliced[name] = "an auxiliary site"
            return
        if infer.get("_deterministic") or _is_delta(fn):
            self.probe.spliced[name] = "a deterministic (Delta) site"
            return
        if msg["is_observed"] and msg.get("mask") is False:
            self.probe.spliced[name] = "an observed site masked out with mask=False"
            return
        if isinstance(_strip_wrappers(fn), dist.Unit):
            raise ModelStructureError(
                f"site {name!r} is a pyro.factor: a factor couples its inputs without being a "
                "variable, which pyro_struct cannot place in a Bayesian network. Write it as an "
                "observed sample site instead (pyro.sample(name, Distribution(...), obs=value))."
            )
        if name in self._names:
            raise ModelStructureError(
                f"site name {name!r} is used twice in one model run; give every sample site a unique name"
            )
        self._names.add(name)
        was_observed = bool(msg["is_observed"])
        self._pending[name] = (was_observed, msg["value"] if was_observed else None)
        if was_observed:
            # probes draw observed sites from the prior too: they may be parents of latents
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False
        if self.mode is not None and not msg["done"]:
            # draw the value here, out of provenance tracking: it is replaced by a fresh leaf
            # anyway, and the samplers' own ops and Python escapes are not the model's
            with torch._C.DisableTorchFunction():
                msg["value"] = fn(*msg["args"], **msg["kwargs"])
            msg["done"] = True

    def _pyro_post_sample(self, msg):
        pending = self._pending.pop(msg["name"], None)
        if pending is None:
            return
        was_observed, obs = pending
        fn = msg["fn"]
        value = msg["value"]
        if was_observed and isinstance(obs, torch.Tensor) and obs.shape != value.shape:
            # an observation broadcast against the distribution: draw the observation's shape
            try:
                with torch._C.DisableTorchFunction():
                    value = fn.expand(obs.shape[: obs.dim() - fn.event_dim]).sample()
            except (ValueError, RuntimeError):
                value = obs
        with torch._C.DisableTorchFunction():
            # a fresh tensor object: the leaf must not alias the user's observation
            leaf = value.detach().clone() if value is obs else value.detach()
            if leaf.is_floating_point():
                leaf.requires_grad_(True)
        msg["value"] = leaf
        record = _Record(msg["name"], fn, leaf, was_observed)
        mode = self.mode
        if mode is not None:
            record.prov, record.nondiff = _object_bits(fn, mode)
            record.taint = mode.taint
            mode.tag(leaf, 1 << len(self.probe.records))
        self.probe.records.append(record)


def _run_probe(model: Callable, args: tuple, kwargs: dict, with_provenance: bool) -> _Probe:
    mode = _ProvenanceMode() if with_provenance else None
    messenger = _ProbeMessenger(mode)
    try:
        with torch.enable_grad(), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with messenger:
                if mode is not None:
                    with mode:
                        model(*args, **kwargs)
                else:
                    model(*args, **kwargs)
    except ModelStructureError:
        raise
    except Exception as e:
        records = messenger.probe.records
        where = f"after site {records[-1].name!r}" if records else "before its first sample site"
        raise ModelStructureError(
            f"the model raised {type(e).__name__} while being traced ({where}): {e}. "
            "trace_model runs the model with every site drawn from its prior; make sure the model "
            "runs with the given arguments and with observed sites left unset."
        ) from e
    if mode is not None:
        messenger.probe.value_dependent = bool(mode.taint) or mode.value_dependent_shapes
    return messenger.probe


# ----------------------------------------------------------------------------- layout
@dataclass
class _Layout:
    """How one site's values, log-density events and scalar nodes line up."""

    name: str
    pos: int
    shape: tuple
    node_shape: tuple
    observed: bool
    support: Constraint
    event_dim: int  # of the site's distribution
    block: bool
    mixing: bool  # latent whose bijection mixes elements: children see whole groups
    n_values: int
    n_nodes: int
    n_events: int
    n_groups: int
    node_offset: int = 0

    @property
    def events_per_group(self) -> int:
        return self.n_events // self.n_groups if self.n_groups else 0

    @property
    def values_per_group(self) -> int:
        return self.n_values // self.n_groups if self.n_groups else 0

    @property
    def nodes_per_group(self) -> int:
        return self.n_nodes // self.n_groups if self.n_groups else 0


def _prod(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _unconstraining_transform(name: str, support: Constraint, cache: dict | None = None) -> Transform:
    if cache is not None and id(support) in cache:
        return cache[id(support)][1]
    t = _find_transform(name, support)
    if cache is not None:
        cache[id(support)] = (support, t)  # the support is held so that its id stays unique
    return t


def _find_transform(name: str, support: Constraint) -> Transform:
    for factory in (biject_to, transform_to):
        try:
            return factory(support)
        except NotImplementedError:
            continue
    raise ModelStructureError(
        f"latent site {name!r} has support {support}, which has no bijection to unconstrained "
        "space (torch.distributions.biject_to); reparametrise it with a supported support or observe it"
    )


def _layout(record: _Record, pos: int, observed: bool, granularity: str, cache: dict | None = None) -> _Layout:
    fn, shape = record.fn, record.shape
    support = fn.support
    ed = _strip_wrappers(fn).event_dim  # joint event dims left after unwrapping Independent
    group_dims = ed
    node_shape = shape
    mixing = False
    if not observed:
        t = _unconstraining_transform(record.name, support, cache)
        node_shape = tuple(int(s) for s in t.inverse_shape(torch.Size(shape)))
        base = t
        while isinstance(base, IndependentTransform):
            base = base.base_transform
        if base.codomain.event_dim > 0 or node_shape != shape:
            mixing = True
            group_dims = max(ed, base.codomain.event_dim)
    group_dims = min(group_dims, len(shape))
    n_values = _prod(shape)
    n_groups = _prod(shape[: len(shape) - group_dims])
    if granularity == "site":
        n_groups = 1 if n_values else 0
    return _Layout(
        name=record.name,
        pos=pos,
        shape=shape,
        node_shape=node_shape,
        observed=observed,
        support=support,
        event_dim=int(fn.event_dim),
        block=granularity == "site" or group_dims > 0,
        mixing=mixing,
        n_values=n_values,
        n_nodes=_prod(node_shape),
        n_events=_prod(shape[: len(shape) - min(ed, len(shape))]),
        n_groups=n_groups,
    )


# ----------------------------------------------------------------------------- element level
class _PairMask:
    """Which (event of child, value element of parent) pairs ever had a non-zero gradient."""

    def __init__(self, n_events: int, n_parent: int):
        self.shape = (n_events, n_parent)
        self.dense = (
            torch.zeros(n_events, n_parent, dtype=torch.bool) if n_events * n_parent <= _DENSE_MASK_LIMIT else None
        )
        self.pieces: list[torch.Tensor] = []

    def add(self, row0: int, nonzero: torch.Tensor) -> None:
        """``nonzero``: bool ``(rows, n_parent)`` for child events ``row0 ...``."""
        if self.dense is not None:
            self.dense[row0 : row0 + nonzero.shape[0]] |= nonzero
        else:
            idx = nonzero.nonzero()
            if idx.numel():
                idx[:, 0] += row0
                self.pieces.append(idx)

    def add_pairs(self, idx: torch.Tensor) -> None:
        """``idx``: ``(m, 2)`` long (child event, parent element) pairs."""
        if not idx.numel():
            return
        if self.dense is not None:
            self.dense[idx[:, 0], idx[:, 1]] = True
        else:
            self.pieces.append(idx)

    def pairs(self) -> torch.Tensor:
        """``(m, 2)`` long tensor of (child event, parent element) pairs."""
        if self.dense is not None:
            return self.dense.nonzero()
        if not self.pieces:
            return torch.zeros(0, 2, dtype=torch.long)
        return torch.unique(torch.cat(self.pieces), dim=0)


def _color_classes(children: list[int], reach: dict[int, list[int]]) -> list[list[int]]:
    """Group children whose gradients can share one backward pass.

    Two children share a pass when no site is an input of one and an input or the output of
    the other, so every non-zero input gradient belongs to exactly one child. Greedy
    first-fit colouring; colour sets are Python ints used as bit sets.
    """
    using: dict[int, int] = {}
    classes: list[list[int]] = []
    for d in children:
        sites = reach[d]
        forbidden = 0
        for u in sites:
            forbidden |= using.get(u, 0)
        c = (~forbidden & (forbidden + 1)).bit_length() - 1
        if c == len(classes):
            classes.append([])
        classes[c].append(d)
        bit = 1 << c
        for u in sites:
            using[u] = using.get(u, 0) | bit
    return classes


def _batched_grads(outputs, inputs, grad_outputs, batched: bool):
    """Input gradients for a batch of cotangents; a Python loop where vmap is unsupported."""
    if not batched:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
    except (RuntimeError, NotImplementedError):
        rows = grad_outputs[0].shape[0]
        per_row = [
            torch.autograd.grad(outputs, inputs, [g[r] for g in grad_outputs], retain_graph=True, allow_unused=True)
            for r in range(rows)
        ]
        return tuple(
            None if all(p[i] is None for p in per_row)
            else torch.stack([p[i] if p[i] is not None else torch.zeros_like(inputs[i]) for p in per_row])
            for i in range(len(inputs))
        )


def _reverse_nonzero(lp: torch.Tensor, inputs: list, cotangents: torch.Tensor) -> list:
    """``[(B, n_u) bool]``: which input elements have non-zero ``cotangents @ d lp / d input``.

    ``cotangents``: ``(B, R)``; batched in chunks of rows.
    """
    B = cotangents.shape[0]
    width = max(sum(x.numel() for x in inputs), lp.numel(), 1)
    chunk = max(1, min(B, _JACOBIAN_CHUNK // width))
    out = [[] for _ in inputs]
    for b0 in range(0, B, chunk):
        cot = cotangents[b0 : b0 + chunk]
        grads = _batched_grads([lp], inputs, [cot], True)
        for i, (g, x) in enumerate(zip(grads, inputs)):
            rows = cot.shape[0]
            out[i].append(
                torch.zeros(rows, x.numel(), dtype=torch.bool) if g is None else (g.detach().reshape(rows, -1) != 0).cpu()
            )
    return [torch.cat(o) for o in out]


def _forward_nonzero(lp: torch.Tensor, inputs: list) -> list | None:
    """``[(R, n_u) bool]``: the Jacobian sparsity column by column (forward mode).

    Forward mode through the already recorded graph: ``g(c) = J^T c`` is linear in a dummy
    cotangent ``c``, so differentiating it again with tangent ``e_j`` gives column ``j`` of
    ``J``. Costs one pass per input element; ``None`` if the graph is not twice differentiable.
    """
    R = lp.numel()
    cot = torch.zeros_like(lp, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            firsts = torch.autograd.grad(lp, inputs, cot, create_graph=True, allow_unused=True)
            out = []
            for g, x in zip(firsts, inputs):
                n = x.numel()
                if g is None:
                    out.append(torch.zeros(R, n, dtype=torch.bool))
                    continue
                if not g.requires_grad:
                    return None  # a backward that is not differentiable: cannot read columns
                cols = []
                chunk = max(1, min(n, _JACOBIAN_CHUNK // max(R, n, 1)))
                for j0 in range(0, n, chunk):
                    m = min(chunk, n - j0)
                    tangents = g.new_zeros(m, n)
                    tangents[torch.arange(m), torch.arange(j0, j0 + m)] = 1
                    (col,) = torch.autograd.grad(
                        g, cot, tangents.reshape((m,) + tuple(g.shape)), retain_graph=True,
                        allow_unused=True, is_grads_batched=True,
                    )
                    cols.append(torch.zeros(m, R, dtype=torch.bool) if col is None else (col.detach().reshape(m, R) != 0).cpu())
                out.append(torch.cat(cols).T)
            return out
    except (RuntimeError, NotImplementedError):
        return None


def _coprime_moduli(n: int) -> tuple[int, int]:
    m = max(2, math.isqrt(max(n - 1, 0)) + 1)
    return m, m + 1  # consecutive integers are coprime and m (m + 1) >= n


def _sparse_reverse_pairs(lp: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """``(m, 2)`` (row, element) pairs of the non-zero Jacobian entries ``d lp / d x``, or
    ``None`` when the Jacobian is too dense for this method.

    1. Superset: rows are summed with random positive weights in two coprime residue
       classes (``k mod m1``, ``k mod m2``); an entry ``(k, j)`` can be non-zero only if
       column ``j`` is non-zero in both of ``k``'s sums. For diagonal (plate) or banded
       Jacobians this is already (nearly) exact, with ``m1 + m2 ~ 2 sqrt(R)`` passes.
    2. Exact values: rows whose candidate supports are disjoint share one pass
       (Curtis-Powell-Reid colouring); every non-zero gradient entry then belongs to the
       single row of its colour that may touch it.
    """
    R, n = lp.numel(), x.numel()
    m1, m2 = _coprime_moduli(R)
    rows = torch.arange(R)
    weights = 1 + torch.rand(R, generator=torch.Generator().manual_seed(R), dtype=torch.float64)
    weights = weights.to(device=lp.device, dtype=lp.dtype)
    cot = lp.new_zeros(m1 + m2, R)
    cot[rows % m1, rows] = weights
    cot[m1 + rows % m2, rows] = weights
    (U,) = _reverse_nonzero(lp, [x], cot)
    hits = U.nonzero()
    if hits.shape[0] > 64 * (R + n):
        return None
    per_class = torch.bincount(hits[:, 0], minlength=m1 + m2).tolist()
    flat = hits[:, 1].tolist()
    class_sets, pos = [], 0
    for c in per_class:
        class_sets.append(set(flat[pos : pos + c]))
        pos += c
    # greedy colouring of rows by their candidate supports; colour sets as Python-int bit sets
    using: dict[int, int] = {}
    colour = [0] * R
    sup_rows: list[int] = []
    sup_cols: list[int] = []
    n_colours = 0
    for k in range(R):
        row_cols = class_sets[k % m1] & class_sets[m1 + k % m2]
        forbidden = 0
        for j in row_cols:
            forbidden |= using.get(j, 0)
        c = (~forbidden & (forbidden + 1)).bit_length() - 1
        colour[k] = c
        if c >= n_colours:
            n_colours = c + 1
            if n_colours > R // 4:
                return None
        bit = 1 << c
        for j in row_cols:
            using[j] = using.get(j, 0) | bit
        sup_rows.extend([k] * len(row_cols))
        sup_cols.extend(row_cols)
    support = torch.stack([torch.tensor(sup_rows, dtype=torch.long), torch.tensor(sup_cols, dtype=torch.long)], 1)
    colour_t = torch.tensor(colour, dtype=torch.long)
    owner = torch.full((n_colours, n), -1, dtype=torch.long)
    owner[colour_t[support[:, 0]], support[:, 1]] = support[:, 0]
    cot = lp.new_zeros(n_colours, R)
    cot[colour_t, rows] = 1
    (hits,) = _reverse_nonzero(lp, [x], cot)
    c_idx, j_idx = hits.nonzero().unbind(1)
    k_idx = owner[c_idx, j_idx]
    pairs = [torch.stack([k_idx[k_idx >= 0], j_idx[k_idx >= 0]], 1)]
    stray = (k_idx < 0).nonzero().reshape(-1)
    if stray.numel():
        # a gradient outside the candidate superset (cancelled random sums): every row of the colour
        for s in stray.tolist():
            members = (colour_t == c_idx[s]).nonzero().reshape(-1)
            pairs.append(torch.stack([members, j_idx[s].expand_as(members)], 1))
    return torch.cat(pairs)


def _large_site_dependencies(lp: torch.Tensor, inputs: list) -> list:
    """Per input, ``(m, 2)`` (event, element) pairs with a non-zero gradient, for a site whose
    dense Jacobian would be expensive. Small inputs: forward mode, one pass per element.
    Large inputs: compressed reverse mode (:func:`_sparse_reverse_pairs`); dense as a fallback."""
    R = lp.numel()
    few = 2 * math.isqrt(R) + 2
    result: list = [None] * len(inputs)
    forward_ids = [i for i, x in enumerate(inputs) if x.numel() <= few]
    rest = [i for i in range(len(inputs)) if i not in forward_ids]
    if forward_ids:
        cols = _forward_nonzero(lp, [inputs[i] for i in forward_ids])
        if cols is None:
            rest = list(range(len(inputs)))
        else:
            for i, nz in zip(forward_ids, cols):
                result[i] = nz.nonzero()
    for i in rest:
        x = inputs[i]
        pairs = _sparse_reverse_pairs(lp, x) if x.numel() > few else None
        if pairs is None:
            dense = _forward_nonzero(lp, [x]) if x.numel() < R else None
            if dense is None:
                eye = lp.new_zeros(R, R)
                eye.fill_diagonal_(1)
                dense = _reverse_nonzero(lp, [x], eye)
            pairs = dense[0].nonzero()
        result[i] = pairs
    return result


def _probe_element_dependencies(records: list[_Record], grad_parents: dict[int, list[int]], masks: dict) -> None:
    """Accumulate into ``masks[(d, u)]`` the non-zero gradients of ``d``'s per-event log
    density with respect to the values of its parents ``u`` in this probe."""
    lps: dict[int, torch.Tensor] = {}
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in grad_parents:
            r = records[d]
            try:
                lp = _elementwise_log_prob(r.fn, r.value)
            except Exception:  # noqa: BLE001 -- a density we cannot evaluate falls back to site-level edges
                continue
            if lp.requires_grad:
                lps[d] = lp
    children = []
    for d, lp in lps.items():
        if lp.numel() > _LARGE_SITE_EVENTS:
            inputs = [records[u].value for u in grad_parents[d]]
            for u, pairs in zip(grad_parents[d], _large_site_dependencies(lp, inputs)):
                masks[(d, u)].add_pairs(pairs)
        else:
            children.append(d)
    reach = {d: grad_parents[d] + [d] for d in children}
    for klass in _color_classes(children, reach):
        inputs_pos = sorted({u for d in klass for u in grad_parents[d]})
        inputs = [records[u].value for u in inputs_pos]
        where = {u: i for i, u in enumerate(inputs_pos)}
        outputs = [lps[d] for d in klass]
        n_rows = max(lp.numel() for lp in outputs)
        width = max(sum(x.numel() for x in inputs), sum(lp.numel() for lp in outputs), 1)
        chunk = max(1, min(n_rows, _JACOBIAN_CHUNK // width))
        for row0 in range(0, n_rows, chunk):
            rows = min(chunk, n_rows - row0)
            batched = n_rows > 1
            grad_outputs = []
            for lp in outputs:
                if batched:
                    g = lp.new_zeros(rows, lp.numel())
                    k = torch.arange(row0, min(row0 + rows, lp.numel()))
                    g[k - row0, k] = 1
                else:
                    g = torch.ones_like(lp)
                grad_outputs.append(g)
            grads = _batched_grads(outputs, inputs, grad_outputs, batched)
            for d, lp in zip(klass, outputs):
                valid = min(rows, lp.numel() - row0)
                if valid <= 0:
                    continue
                for u in grad_parents[d]:
                    g = grads[where[u]]
                    if g is None:
                        continue
                    nonzero = (g.detach().reshape(rows if batched else 1, -1) != 0)[:valid].cpu()
                    masks[(d, u)].add(row0, nonzero)


# ----------------------------------------------------------------------------- edges
def _group_nodes(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Node indices ``keys[:, None] * size + arange(size)``, flattened per key: ``(len(keys), size)``."""
    return keys[:, None] * size + torch.arange(size)


def _pair_edges(child: _Layout, parent: _Layout, pairs: torch.Tensor | None) -> torch.Tensor:
    """Global ``(m, 2)`` (parent node, child node) edges for a site pair.

    ``pairs``: (child event, parent value element) dependencies, or ``None`` for all-to-all.
    """
    if child.n_nodes == 0 or parent.n_nodes == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    # a block child: an event's parents are its group's; a mixing parent: an element stands
    # for all unconstrained coordinates of its group
    c_unit = child.events_per_group if child.block else 1
    c_size = child.nodes_per_group if child.block else 1
    p_unit = parent.values_per_group if parent.mixing else 1
    p_size = parent.nodes_per_group if parent.mixing else 1
    if pairs is None:
        c_nodes = torch.arange(child.n_nodes)
        p_nodes = torch.arange(parent.n_nodes)
        cc, pp = torch.meshgrid(c_nodes, p_nodes, indexing="ij")
        return torch.stack([pp.reshape(-1) + parent.node_offset, cc.reshape(-1) + child.node_offset], 1)
    keys = torch.unique(torch.stack([pairs[:, 0] // c_unit, pairs[:, 1] // p_unit], 1), dim=0)
    c_nodes = _group_nodes(keys[:, 0], c_size)  # (m, c_size)
    p_nodes = _group_nodes(keys[:, 1], p_size)  # (m, p_size)
    cc = c_nodes[:, :, None].expand(-1, c_size, p_size)
    pp = p_nodes[:, None, :].expand(-1, c_size, p_size)
    return torch.stack([pp.reshape(-1) + parent.node_offset, cc.reshape(-1) + child.node_offset], 1)


def _block_edges(site: _Layout) -> torch.Tensor:
    """Edges inside each group of a block site: every node depends on the earlier ones."""
    size = site.nodes_per_group
    if not site.block or size < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    tri = torch.triu_indices(size, size, 1)  # (2, pairs) with row < col
    base = torch.arange(site.n_groups)[:, None] * size + site.node_offset
    src = (base + tri[0]).reshape(-1)
    dst = (base + tri[1]).reshape(-1)
    return torch.stack([src, dst], 1)


# ----------------------------------------------------------------------------- checks
def _check_same_structure(first: _Probe, other: _Probe, probe: int) -> None:
    a = [(r.name, r.shape) for r in first.records]
    b = [(r.name, r.shape) for r in other.records]
    if a == b:
        return
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    for (na, sa), (nb, sb) in zip(a, b):
        if na == nb and sa != sb:
            raise ModelStructureError(
                f"site {na!r} has shape {sa} in one prior draw and {sb} in another (dynamic structure). "
                "pyro_struct needs sites with fixed shapes; fix the shape (e.g. pad and mask) or make it "
                "independent of sampled values."
            )
    only_a = [n for n in names_a if n not in set(names_b)]
    only_b = [n for n in names_b if n not in set(names_a)]
    name = (only_a or only_b or [next(na for (na, _), (nb, _) in zip(a, b) if na != nb)])[0]
    raise ModelStructureError(
        f"site {name!r} appears in some prior draws but not in others, or in a different order "
        f"(dynamic structure: probe {probe} differs from probe 0). pyro_struct needs the same sites "
        "in every run of the model: replace value-dependent control flow by masking (poutine.mask) "
        "or sample every site unconditionally."
    )


def _resolve_observed(observed, first: _Probe) -> set:
    names = [r.name for r in first.records]
    if observed is None:
        return {r.name for r in first.records if r.was_observed}
    if isinstance(observed, str):
        observed = [observed]
    observed = list(observed)
    for o in observed:
        if not isinstance(o, str):
            raise TypeError(f"observed must be site names (str); got {o!r}")
        if o in first.spliced:
            raise ModelStructureError(
                f"observed site {o!r} is {first.spliced[o]}, not a random variable; "
                "remove it from observed="
            )
        if o not in names:
            raise ModelStructureError(
                f"observed site {o!r} is missing from the model's trace; its sample sites are {names}. "
                "Fix the name in observed= (site names, not argument names)."
            )
    return set(observed)


def _resolve_dependencies(dependencies, names: list[str]) -> list[tuple[int, int]]:
    if dependencies is None:
        return []
    if not isinstance(dependencies, Mapping):
        raise TypeError("dependencies must be a dict {child_site: [parent_site, ...]}")
    pos = {n: i for i, n in enumerate(names)}
    extra = []
    for child, parents in dependencies.items():
        if isinstance(parents, str):
            parents = [parents]
        for site in [child, *parents]:
            if site not in pos:
                raise ModelStructureError(
                    f"dependencies= names site {site!r}, which is not a sample site of the model; "
                    f"its sample sites are {names}"
                )
        for p in parents:
            if p == child:
                raise ModelStructureError(f"dependencies= makes site {child!r} depend on itself; remove it")
            extra.append((pos[child], pos[p]))
    return extra


# ----------------------------------------------------------------------------- entry point
def trace_model(
    model: Callable,
    *args,
    observed: Iterable[str] | str | None = None,
    granularity: str = "element",
    num_probes: int = 3,
    dependencies: Mapping[str, Iterable[str]] | None = None,
    seed: int | None = 0,
    **kwargs,
) -> BayesNet:
    """Trace a Pyro model into a :class:`~pyro_struct.graph.BayesNet` over scalar coordinates.

    The model is run ``num_probes`` times with every sample site (observed ones included)
    drawn from its prior. Which sites feed which comes from provenance tracking (exact for
    any torch op, and for values that escape to Python control flow); which *elements* feed
    which comes from batched gradients of each site's per-element log density with respect
    to its parents' values, united over the draws. A site pair with provenance but no
    non-zero gradient (rounding, comparisons, integer indexing) is connected all-to-all.

    Nodes are ordered site by site in trace order, row-major within a site, and labelled
    with :func:`~pyro_struct.graph.node_label` (``"z"``, ``"z[3]"``, ``"L[1,0]"``).

    Cost: sites with few events share batched backward passes (sites whose inputs do not
    overlap are differentiated together); a site with many events (a large plate) is
    differentiated with forward passes for its small parents and compressed reverse passes
    (about ``2 sqrt(events)``) for its large ones, so a plate of ``N`` costs ``O(N^1.5)``
    rather than ``O(N^2)``. Further draws are skipped when they cannot change the answer (no
    gradients to read and no sampled value reaching Python control flow or tensor shapes),
    e.g. for a Python-loop HMM of scalar sites.

    A parent site that reaches a child through any op that gradients cannot see through
    (rounding, comparisons, casts to integers, ``detach``, ``torch.no_grad``) is connected
    all-to-all even if other paths are differentiable (``z[0] + torch.round(z[1])``).

    - ``Independent``/``to_event`` events that factorise give one node per element; a joint
      event (``MultivariateNormal``, ``Dirichlet``, ...) is a block: its elements share their
      parents and each depends on the earlier ones. Latents whose support's bijection mixes
      elements (simplex, correlation Cholesky, ...) are blocks over their unconstrained
      coordinates (``SiteInfo.node_shape``, e.g. ``(K - 1,)`` for a ``K``-simplex).
    - ``pyro.deterministic`` and ``Delta`` sites are spliced out: their inputs pass through.
    - Auxiliary sites and observed sites masked with ``mask=False`` are ignored.

    Args:
        model: a Pyro model.
        *args, **kwargs: passed to the model on every run.
        observed: names of the observed sites. Default: the model's ``observed_sites``
            attribute if it declares one (the example models in :mod:`pyro_struct.models` do,
            so they can be traced without data), else the sites called with ``obs=``.
            Observed sites called without a value are drawn from the prior while tracing.
            Every other non-deterministic sample site is a latent.
        granularity: ``"element"`` (default) or ``"site"``: every site is one block and
            every node of a parent site feeds every node of a child site.
        num_probes: number of prior draws (default 3).
        dependencies: extra site-level edges ``{child_site: [parent_site, ...]}`` (every
            node of each parent to every node of the child).
        seed: seed of the prior draws; the global RNG state (torch, random, numpy) is
            restored afterwards.

    Model keyword arguments named like the options above cannot be passed through; wrap
    the model in a closure instead.

    Returns:
        The ``BayesNet``.

    Raises:
        ModelStructureError: discrete latent sites, sites whose set or shapes change between
            draws, observed sites missing from the trace, no latent site, a model that raises.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=torch.tensor(0.5))
        >>> sorted(trace_model(model).graph.edges)
        [('z', 'x')]
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model; got {type(model).__name__}")
    if granularity not in ("element", "site"):
        raise ValueError(f"granularity must be 'element' or 'site'; got {granularity!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int; got {num_probes!r}")
    seed = 0 if seed is None else int(seed)
    if observed is None:
        observed = getattr(model, "observed_sites", None)

    rng_state = pyro.util.get_rng_state()
    # the provenance run keeps every intermediate tensor alive; cyclic GC passes over them
    # would dominate the tracing time of large models
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        pyro.set_rng_seed(seed)
        first = _run_probe(model, args, kwargs, with_provenance=True)
        records = first.records
        names = [r.name for r in records]
        observed_names = _resolve_observed(observed, first)
        for r in records:
            if r.name not in observed_names and _is_discrete(r.fn, r.value):
                raise ModelStructureError(
                    f"latent site {r.name!r} is discrete ({type(_strip_wrappers(r.fn)).__name__} with support "
                    f"{r.fn.support}); pyro_struct guides need continuous latents. Marginalise it out "
                    "analytically, relax it to a continuous distribution, or list it in observed=."
                )
        if all(n in observed_names for n in names):
            raise ModelStructureError(
                f"the model has no latent site: every sample site ({names}) is observed; "
                "there is no posterior to approximate. Pass observed= without the sites to infer."
            )
        transforms: dict = {}
        layouts = [_layout(r, i, r.name in observed_names, granularity, transforms) for i, r in enumerate(records)]
        offset = 0
        for lay in layouts:
            lay.node_offset, offset = offset, offset + lay.n_nodes

        def positions(bits: int) -> list[int]:
            out = []
            while bits:
                low = bits & -bits
                out.append(low.bit_length() - 1)
                bits ^= low
            return out

        parents = {d: [u for u in positions(r.prov) if u != d] for d, r in enumerate(records)}
        control = {d: [u for u in positions(r.taint) if u != d] for d, r in enumerate(records)}
        nondiff = {d: [u for u in positions(r.nondiff) if u != d] for d, r in enumerate(records)}

        # pairs whose element-level answer is not already all-to-all need gradients
        grad_parents: dict[int, list[int]] = {}
        if granularity == "element":
            for d, us in parents.items():
                child = layouts[d]
                for u in us:
                    par = layouts[u]
                    single_parent_unit = par.n_values == 1 or (par.mixing and par.n_groups == 1)
                    if child.n_groups <= 1 and single_parent_unit:
                        continue
                    if not records[u].value.requires_grad:
                        continue
                    grad_parents.setdefault(d, []).append(u)
        masks = {
            (d, u): _PairMask(layouts[d].n_events, layouts[u].n_values) for d, us in grad_parents.items() for u in us
        }

        _probe_element_dependencies(records, grad_parents, masks)
        # further draws can only change the answer if gradients are read, or if sampled values
        # steer Python control flow or tensor shapes (possible dynamic structure)
        more_probes = num_probes if grad_parents or first.value_dependent else 1
        for p in range(1, more_probes):
            pyro.set_rng_seed(seed + p)
            probe = _run_probe(model, args, kwargs, with_provenance=False)
            _check_same_structure(first, probe, p)
            _probe_element_dependencies(probe.records, grad_parents, masks)
            del probe
    finally:
        pyro.util.set_rng_state(rng_state)
        if gc_was_enabled:
            gc.enable()

    extra = _resolve_dependencies(dependencies, names)
    if extra:
        site_dag = nx.DiGraph()
        site_dag.add_edges_from((u, d) for d, us in parents.items() for u in us)
        site_dag.add_edges_from((u, d) for d, us in control.items() for u in us)
        site_dag.add_edges_from((u, d) for d, u in extra)
        if not nx.is_directed_acyclic_graph(site_dag):
            cycle = [names[u] for u, _ in nx.find_cycle(site_dag)]
            raise ModelStructureError(
                f"dependencies= creates the cycle {' -> '.join(cycle + cycle[:1])}; "
                "an extra dependency must point from an earlier site to a later one"
            )

    # (d, u) -> element pairs found by gradients, or None for all-to-all
    site_pairs: dict = {}
    for d in range(len(records)):
        for u in parents[d]:
            mask = masks.get((d, u))
            found = mask.pairs() if mask is not None else None
            # no non-zero gradient at all: the path is not differentiable, connect all
            site_pairs[(d, u)] = found if found is not None and found.shape[0] else None
        # control flow and non-differentiable paths: invisible to gradients, so all-to-all
        for u in control[d] + nondiff[d]:
            site_pairs[(d, u)] = None
    for d, u in extra:
        site_pairs[(d, u)] = None
    scalar_edges = []  # the common case of two one-node sites, kept out of torch for speed
    pieces = []
    for (d, u), pairs in site_pairs.items():
        child, parent = layouts[d], layouts[u]
        if child.n_nodes == 1 and parent.n_nodes == 1:
            scalar_edges.append((parent.node_offset, child.node_offset))
        else:
            pieces.append(_pair_edges(child, parent, pairs))
    pieces.extend(_block_edges(lay) for lay in layouts if lay.block and lay.nodes_per_group > 1)
    edges = scalar_edges
    if pieces:
        edges = edges + torch.unique(torch.cat(pieces), dim=0).tolist()

    infos = [
        SiteInfo(
            name=lay.name,
            shape=lay.shape,
            support=lay.support,
            observed=lay.observed,
            block=lay.block,
            node_shape=lay.node_shape,
            event_dim=lay.event_dim,
        )
        for lay in layouts
    ]
    graph = nx.DiGraph()
    labels: list[str] = []
    attrs: list = []
    for info in infos:
        site_labels = info.nodes
        labels.extend(site_labels)
        attrs.extend(
            (label, {"site": info.name, "index": idx, "observed": info.observed})
            for label, idx in zip(site_labels, info.indices)
        )
    graph.add_nodes_from(attrs)
    graph.add_edges_from((labels[a], labels[b]) for a, b in edges)
    return BayesNet(graph, infos)
