"""Plate templates traced small: trace a model with one plate shrunk to a few members, then check at full size that it is the expansion.

Tracing a plate of ``N`` members costs ``O(N^1.5)`` gradient work and ``O(N)`` Python work per
node. Members of a Pyro plate are usually exchangeable, so the network of a few members tells
everything: :func:`trace_plate_template` runs the tracer with the plate's subsample indices set
to ``arange(members)`` (a messenger, the model is unchanged) and then checks, at the full size
and at the tracer's prior draws, that the full network has no dependency that the few-member network,
repeated per member, lacks:

- the same sample sites in the same order, with the same shapes up to the plate's dimension,
  the same plates and the same site-level parents (data flow, control flow, non-differentiable paths);
- for each child site and each of the tracer's ``num_probes`` prior draws (at full size), two reverse
  passes per within-member coordinate (cotangent one on every member, then a random weight per member): a member's gradient with respect to another member's
  parent shows up as ``g_random != r_member * g_ones``; any non-zero gradient must be an edge of
  the template (a dependency the template has but a member lacks only makes the guide's
  structure a little less sparse, never unfaithful).

Two plates (nested: groups with members inside each group; or side by side) are shrunk together
(``members`` groups of ``members`` members). A plate unit is then a group or a member of a group,
and the random weight of a child unit is a product of one random draw per plate index it shares
with the parent site: two coordinates may depend on each other only where their indices in the
plates they share agree, and every unit must have the template's pattern.

Where a check fails or the shortcut cannot apply (three plates or more, a model that builds tensors of
the full size itself, values that reach Python control flow, joint events in the plate), it
returns ``None`` and the reason, and the caller traces every member.

Example:
    >>> import pyro, pyro.distributions as dist
    >>> def model(N=1000):
    ...     mu = pyro.sample("mu", dist.Normal(0., 1.))
    ...     with pyro.plate("data", N):
    ...         z = pyro.sample("z", dist.Normal(mu, 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=None)
    >>> small, why = trace_plate_template(model, (), {"N": 1000}, observed=["x"])
    >>> small.plate, small.size, len(small.bn)
    ('data', 1000, 9)
"""

from __future__ import annotations

import gc
import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable

import pyro
import pyro.util
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import ModelStructureError
from ..graph import BayesNet
from .probe import Probe, check_same_structure, elementwise_log_prob, run_probe, run_structure, strip_wrappers
from .provenance import positions
from .sparsity import _batched_grads

__all__ = ["TEMPLATE_MEMBERS", "PlateTemplateTrace", "shrink_plate", "trace_plate_template"]

#: members of the shrunk plate a template is traced with (at least 2 show whether members are alike)
TEMPLATE_MEMBERS = 4
# relative size of a cross-member gradient that the random-weight check can see (float32 rounding)
_RTOL = 1e-4


@dataclass
class PlateTemplateTrace:
    """A model's network traced with plate ``plate`` shrunk to ``members`` members.

    Attributes:
        bn: the BayesNet of the shrunk model (sites in the plate have ``members`` along its dimension).
        plate: the plate's name.
        size: the plate's size at the model's arguments.
        members: the members traced.
        shapes: site -> value shape at the full size.
        sizes: every shrunk plate -> its full size (nested plates: both, when both exceed
            ``members``; ``plate``/``size`` are the first of them by name).
    """

    bn: BayesNet
    plate: str
    size: int
    members: int
    shapes: dict
    sizes: dict = None


class shrink_plate(Messenger):
    """Run a model with plate ``name`` holding only its first ``members`` members (its subsample
    indices become ``arange(members)``); the plate keeps its full size for scaling. Observations
    of the plate's full size (``obs=x`` with ``x`` of every member) keep their first ``members``."""

    def __init__(self, name: str, members: int):
        super().__init__()
        self.name, self.members = name, int(members)

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            if msg["name"] == self.name and msg["value"] is None:
                msg["value"] = torch.arange(self.members)
                msg["done"] = True
            return
        value = msg["value"]
        if not (msg["is_observed"] and torch.is_tensor(value)):
            return
        for f in msg["cond_indep_stack"]:
            if f.name == self.name and f.dim is not None:
                pos = value.dim() - msg["fn"].event_dim + f.dim
                if 0 <= pos < value.dim() and value.shape[pos] == f.full_size != self.members:
                    msg["value"] = value.narrow(pos, 0, self.members)


def _shrunk(model: Callable, plates: dict, members: int) -> Callable:
    def run(*args, **kwargs):
        with ExitStack() as stack:
            for name in plates:
                stack.enter_context(shrink_plate(name, members))
            return model(*args, **kwargs)

    if hasattr(model, "observed_sites"):
        run.observed_sites = model.observed_sites
    return run


def _template_plates(first: Probe, members: int) -> tuple[dict, str | None]:
    """``(plate -> full size of the plates to shrink, why not)``: the vectorised plates of the run
    larger than ``members`` (one plate, or two: nested or side by side), or why the shortcut does not apply."""
    names = {(p[0], p[2]) for r in first.records for p in r.plates}
    if not names:
        return {}, None
    if len({n for n, _ in names}) != len(names) or len(names) > 2:
        return {}, f"the model has the plates {sorted(n for n, _ in names)}"
    if first.value_dependent:
        return {}, "sampled values reach Python control flow or shapes"
    return {n: size for n, size in sorted(names) if size > members}, None


def _positions(shape: tuple, plates: tuple, event_dim: int) -> dict:
    """Plate name -> position of its dimension in a value of ``shape``."""
    return {name: len(shape) - event_dim + dim for name, dim, _ in plates}


def _check_sites(first: Probe, bn: BayesNet, plates: dict, members: int) -> str | None:
    """Why the full run and the template network differ in sites, shapes, plates or site-level parents (or ``None``)."""
    if [r.name for r in first.records] != list(bn.sites):
        return f"the sites of the shrunk model ({list(bn.sites)}) differ from the model's"
    for r in first.records:
        info = bn.sites[r.name]
        full = list(r.shape)
        for plate, size in plates.items():
            pos = info.plate_position(plate)
            if pos is None:
                continue
            if full[pos] != size or info.shape[pos] != members:
                return f"site {r.name!r} does not follow the size of plate {plate!r} (shape {r.shape})"
            full[pos] = members
            if info.block or info.node_shape != info.shape:
                return f"site {r.name!r} in plate {plate!r} is a joint block"
        if tuple(full) != tuple(info.shape) or [p[:2] for p in r.plates] != [p[:2] for p in info.plates]:
            return f"site {r.name!r} has shape {r.shape} with all members but {info.shape} with {members}"
    names = [r.name for r in first.records]
    traced = {(names[u], r.name) for d, r in enumerate(first.records)
              for u in positions(r.prov | r.taint | r.nondiff) if u != d}
    if traced != set(bn.site_graph().edges):
        return "the site-level dependencies of the shrunk model differ from the model's"
    return None


def _unit_view(x: torch.Tensor, pos: dict) -> torch.Tensor:
    """``(units, rest)``: the plate dimensions (``pos``: plate -> position, in plate-name order) first
    and flattened row-major, the rest flattened; ``(1, numel)`` outside every plate."""
    if not pos:
        return x.reshape(1, -1)
    where = [pos[p] for p in sorted(pos)]
    units = math.prod(x.shape[i] for i in where)
    return x.movedim(where, list(range(len(where)))).reshape(units, -1)


def _unit_sizes(shape: tuple, pos: dict) -> list:
    return [int(shape[pos[p]]) for p in sorted(pos)]


def _template_patterns(bn: BayesNet, plate_names: list) -> tuple[dict | None, str | None]:
    """``(child site, parent site) -> bool (rest_child, rest_parent)`` value-element edges within a
    plate unit (a member; for nested plates a group or a member of a group), the same for every
    unit; or why not (coupled or unlike units). Two nodes may depend on each other only where their
    indices in the plates they share agree. A joint block outside the plates (its nodes are not its
    value's elements) is connected to every element of the other site."""
    traced = {p[0]: int(p[2]) for info in bn.sites.values() for p in info.plates}
    pos = {s: {p: info.plate_position(p) for p in plate_names if info.plate_position(p) is not None} for s, info in bn.sites.items()}
    sizes = {s: _unit_sizes(info.shape, pos[s]) for s, info in bn.sites.items()}
    width = {s: math.prod(info.shape) // math.prod(sizes[s]) for s, info in bn.sites.items()}
    whole = {s for s, info in bn.sites.items() if info.block or info.node_shape != info.shape}
    where: dict = {}  # site -> flat value offset -> (plate -> index, within-unit offset)
    for s, info in bn.sites.items():
        view = _unit_view(torch.arange(math.prod(info.shape)).reshape(info.shape), pos[s])
        names = sorted(pos[s])
        where[s] = {}
        for u, row in enumerate(view.tolist()):
            unit = dict(zip(names, _unravel(u, sizes[s])))
            for j, v in enumerate(row):
                where[s][v] = (unit, j)
    per_unit: dict = {}
    for p, c in bn.graph.edges:
        a, b = bn.graph.nodes[p], bn.graph.nodes[c]
        su, sd = a["site"], b["site"]
        if su == sd:
            continue
        uu, ru = ({}, slice(None)) if su in whole else where[su][_offset(bn.sites[su], a["index"])]
        ud, rd = ({}, slice(None)) if sd in whole else where[sd][_offset(bn.sites[sd], b["index"])]
        if any(uu[k] != ud[k] for k in uu.keys() & ud.keys()):
            return None, f"{c!r} depends on another member's {p!r}"
        mats = per_unit.setdefault((sd, su), {})
        key = tuple(sorted({**uu, **ud}.items()))
        mats.setdefault(key, torch.zeros(width[sd], width[su], dtype=torch.bool))[rd, ru] = True
    patterns = {}
    for (sd, su), mats in per_unit.items():
        union = sorted(set(pos[sd]) | set(pos[su]))
        if len(mats) != math.prod(traced[p] for p in union) or any(not torch.equal(m, next(iter(mats.values()))) for m in mats.values()):
            return None, f"the members of plates {union} have different parents at site {sd!r}"
        patterns[(sd, su)] = next(iter(mats.values()))
    return patterns, None


def _unravel(flat: int, sizes: list) -> tuple:
    """Row-major multi-index of ``flat`` in ``sizes``."""
    out = []
    for s in reversed(sizes):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _offset(info, index: tuple) -> int:
    """Row-major offset of a node's index in its site's value."""
    off = 0
    for i, s in zip(index, info.shape):
        off = off * int(s) + int(i)
    return off


def _unit_weights(sizes: list, names: list, shared: tuple, draws: dict) -> torch.Tensor:
    """``(units,)`` weights of a site's plate units (``names``, ``sizes``): the product of the
    random ``draws[plate]`` over the ``shared`` plates at the unit's indices (1 elsewhere)."""
    w = torch.ones(sizes, dtype=next(iter(draws.values())).dtype) if draws else torch.ones(sizes)
    for axis, name in enumerate(names):
        if name in shared:
            shape = [1] * len(sizes)
            shape[axis] = sizes[axis]
            w = w * draws[name][: sizes[axis]].reshape(shape)
    return w.reshape(-1)


def _child_violation(first: Probe, run: Probe, d: int, plate_names: list, patterns: dict, gen: torch.Generator) -> str | None:
    """Two reverse passes per within-unit coordinate of child ``d`` in the full-size ``run`` and per
    set of plates it shares with its parents (its site-level parents from the provenance run
    ``first``; see the module docstring): the second weights each child unit by a random product
    over the shared plates' indices, so a parent unit fed from a unit elsewhere in a shared plate
    shows ``g_random != w_unit * g_ones``."""
    r = run.records[d]
    names = [x.name for x in first.records]
    parents = [u for u in positions(first.records[d].prov) if u != d and run.records[u].value.requires_grad]
    if not parents:
        return None
    with torch.enable_grad():
        lp = elementwise_log_prob(r.fn, r.value)
    if not lp.requires_grad:
        return None
    pos_d = {k: v for k, v in _positions(r.shape, r.plates, r.fn.event_dim).items() if k in plate_names}
    if pos_d and strip_wrappers(r.fn).event_dim:
        return f"site {r.name!r} in plate {sorted(pos_d)[0]!r} has joint events"
    lp_view = lp.reshape(r.shape if pos_d else (-1,))
    sizes_d, names_d = _unit_sizes(r.shape, pos_d), sorted(pos_d)
    n, rest = math.prod(sizes_d), lp_view.numel() // math.prod(sizes_d)
    draws = {p: torch.randn(s, generator=gen, dtype=lp.dtype) for p, s in zip(names_d, sizes_d)}
    groups: dict = {}
    for u in parents:
        pu = run.records[u]
        pos_u = {k: v for k, v in _positions(pu.shape, pu.plates, pu.fn.event_dim).items() if k in plate_names}
        groups.setdefault(tuple(sorted(set(pos_d) & set(pos_u))), []).append((u, pos_u))
    for shared, members in groups.items():
        weights = _unit_weights(sizes_d, names_d, shared, draws)
        cot = torch.zeros((2 * rest, n, rest), dtype=lp.dtype)
        cot[torch.arange(rest), :, torch.arange(rest)] = 1.0
        cot[rest + torch.arange(rest), :, torch.arange(rest)] = weights
        if not pos_d:
            cot = cot.reshape(2 * rest, -1)
        else:  # back from (unit, rest) to the site's own layout
            where = [pos_d[p] for p in names_d]
            other = tuple(s for i, s in enumerate(r.shape) if i not in where)
            cot = cot.reshape((2 * rest, *sizes_d) + other).movedim(list(range(1, 1 + len(where))), [1 + w for w in where])
        grads = _batched_grads([lp_view], [run.records[u].value for u, _ in members], [cot], True)
        for (u, pos_u), g in zip(members, grads):
            if g is None:
                continue
            pu = run.records[u]
            g = g.detach()
            g1 = torch.stack([_unit_view(g[b], pos_u) for b in range(rest)])  # (rest_d, units_u, rest_u)
            g2 = torch.stack([_unit_view(g[rest + b], pos_u) for b in range(rest)])
            allowed = patterns.get((r.name, names[u]), torch.zeros(rest, g1.shape[-1], dtype=torch.bool))
            if (((g1 != 0) | (g2 != 0)) & ~allowed.unsqueeze(1)).any():
                return f"{r.name!r} depends on {names[u]!r} in a way the template lacks"
            if shared:
                w_u = _unit_weights(_unit_sizes(pu.shape, pos_u), sorted(pos_u), shared, draws)
                scaled = w_u.view(1, -1, 1) * g1
                if ((g2 - scaled).abs() > _RTOL * (g2.abs() + scaled.abs()) + 1e-30).any():
                    return f"{r.name!r} depends on other members' {names[u]!r}: the model couples members across plate(s) {list(shared)}"
    return None


def trace_plate_template(
    model: Callable, args: tuple, kwargs: dict, observed: Iterable[str] | None = None,
    members: int = TEMPLATE_MEMBERS, seed: int = 0, **trace_options,
) -> tuple[PlateTemplateTrace | None, str | None]:
    """Trace ``model`` with its plates (one, or two nested or side by side) shrunk to ``members``
    members each and check it against the full size.

    Args:
        model, args, kwargs: the model and the arguments it is traced with.
        observed: as for :func:`~pyro_struct.trace_model`.
        members: members of each shrunk plate (>= 2); a plate of at most that many is kept whole.
        seed: seed of the prior draws (the global RNG state is restored).
        **trace_options: passed to :func:`~pyro_struct.trace_model` (``granularity``, ``num_probes``).

    Returns:
        ``(PlateTemplateTrace, None)``, or ``(None, reason)``: ``(None, None)`` when the model has no
        plate or only plates of at most ``members`` members (tracing every member is as cheap), else the
        reason the template cannot stand for the model (the caller traces every member).

    Raises:
        ModelStructureError: as :func:`~pyro_struct.trace_model` (from the full-size run).
    """
    from . import trace_model

    if trace_options.get("granularity", "element") != "element":
        return None, None
    rng_state = pyro.util.get_rng_state()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        pyro.set_rng_seed(seed)
        first = run_probe(model, args, kwargs, with_provenance=True)
        shrink, why = _template_plates(first, members)
        if not shrink:
            return None, why
        plate_names = sorted({p[0] for r in first.records for p in r.plates})
        try:
            bn = trace_model(_shrunk(model, shrink, members), *args, observed=observed, seed=seed, **trace_options, **kwargs)
        except ModelStructureError as e:
            named = " and ".join(f"plate {p!r}" for p in sorted(shrink))
            return None, f"the model cannot run with {named} shrunk to {members} members ({str(e).split(':')[0]})"
        why = _check_sites(first, bn, shrink, members)
        patterns, why2 = (None, why) if why else _template_patterns(bn, plate_names)
        why = why or why2
        gen = torch.Generator().manual_seed(seed)
        # the tracer's draws at full size (the first plain, the others spread into the tails)
        for p in range(trace_options.get("num_probes", 3) if not why else 0):
            run = first if p == 0 else run_structure(model, args, kwargs, p - 1, seed + p, grad=True)
            if p:
                check_same_structure(first, run, f"probe {p}")
            for d in range(len(first.records)):
                why = why or _child_violation(first, run, d, plate_names, patterns, gen)
    finally:
        pyro.util.set_rng_state(rng_state)
        if gc_was_enabled:
            gc.enable()
    if why:
        return None, why
    plate, size = next(iter(shrink.items()))
    return PlateTemplateTrace(bn, plate, size, members, {r.name: r.shape for r in first.records}, dict(shrink)), None
