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

Where a check fails or the shortcut cannot apply (several plates, a model that builds tensors of
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
    """

    bn: BayesNet
    plate: str
    size: int
    members: int
    shapes: dict


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


def _shrunk(model: Callable, plate: str, members: int) -> Callable:
    def run(*args, **kwargs):
        with shrink_plate(plate, members):
            return model(*args, **kwargs)

    if hasattr(model, "observed_sites"):
        run.observed_sites = model.observed_sites
    return run


def _single_plate(first: Probe) -> tuple[str | None, int, str | None]:
    """``(plate, size, why not)``: the one vectorised plate of the run, or why the shortcut does not apply."""
    names = {(p[0], p[2]) for r in first.records for p in r.plates}
    if not names:
        return None, 0, None
    if len({n for n, _ in names}) > 1 or len(names) > 1:
        return None, 0, f"the model has the plates {sorted(n for n, _ in names)}"
    if first.value_dependent:
        return None, 0, "sampled values reach Python control flow or shapes"
    (plate, size), = names
    return plate, size, None


def _plate_pos(shape: tuple, plates: tuple, event_dim: int) -> int | None:
    for name, dim, _ in plates:
        return len(shape) - event_dim + dim
    return None


def _check_sites(first: Probe, bn: BayesNet, plate: str, size: int, members: int) -> str | None:
    """Why the full run and the template network differ in sites, shapes, plates or site-level parents (or ``None``)."""
    if [r.name for r in first.records] != list(bn.sites):
        return f"the sites of the shrunk model ({list(bn.sites)}) differ from the model's"
    for r in first.records:
        info = bn.sites[r.name]
        pos = info.plate_position(plate)
        full = list(r.shape)
        if pos is not None:
            if full[pos] != size or info.shape[pos] != members:
                return f"site {r.name!r} does not follow the plate's size (shape {r.shape})"
            full[pos] = members
        if tuple(full) != tuple(info.shape) or [p[:2] for p in r.plates] != [p[:2] for p in info.plates]:
            return f"site {r.name!r} has shape {r.shape} with all members but {info.shape} with {members}"
        if pos is not None and (info.block or info.node_shape != info.shape):
            return f"site {r.name!r} in plate {plate!r} is a joint block"
    names = [r.name for r in first.records]
    traced = {(names[u], r.name) for d, r in enumerate(first.records)
              for u in positions(r.prov | r.taint | r.nondiff) if u != d}
    if traced != set(bn.site_graph().edges):
        return "the site-level dependencies of the shrunk model differ from the model's"
    return None


def _member_view(x: torch.Tensor, pos: int | None) -> torch.Tensor:
    """``(N, rest)`` for a plate site (plate dimension first), ``(1, numel)`` outside the plate."""
    return x.reshape(1, -1) if pos is None else x.movedim(pos, 0).reshape(x.shape[pos], -1)


def _template_patterns(bn: BayesNet, plate: str, members: int) -> tuple[dict | None, str | None]:
    """``(child site, parent site) -> bool (rest_child, rest_parent)`` value-element edges within a
    member (or between a member and a global), the same for every member; or why not (coupled or
    unlike members). A joint block outside the plate (its nodes are not its value's elements) is
    connected to every element of the other site."""
    pos = {s: info.plate_position(plate) for s, info in bn.sites.items()}
    width = {s: math.prod(info.shape) // (members if pos[s] is not None else 1) for s, info in bn.sites.items()}
    whole = {s for s, info in bn.sites.items() if info.block or info.node_shape != info.shape}
    where: dict = {}  # site -> flat value offset -> (member or None, within-member offset)
    for s, info in bn.sites.items():
        view = _member_view(torch.arange(math.prod(info.shape)).reshape(info.shape), pos[s])
        where[s] = {v: (m if pos[s] is not None else None, j) for m, row in enumerate(view.tolist()) for j, v in enumerate(row)}
    per_member: dict = {}
    for p, c in bn.graph.edges:
        a, b = bn.graph.nodes[p], bn.graph.nodes[c]
        su, sd = a["site"], b["site"]
        if su == sd:
            continue
        mu, ru = (None, slice(None)) if su in whole else where[su][_offset(bn.sites[su], a["index"])]
        md, rd = (None, slice(None)) if sd in whole else where[sd][_offset(bn.sites[sd], b["index"])]
        if mu is not None and md is not None and mu != md:
            return None, f"{c!r} depends on another member's {p!r}"
        mats = per_member.setdefault((sd, su), [torch.zeros(width[sd], width[su], dtype=torch.bool) for _ in range(members)])
        for m in (range(members) if mu is None and md is None else [md if md is not None else mu]):
            mats[m][rd, ru] = True
    patterns = {}
    for key, mats in per_member.items():
        if any(not torch.equal(mats[0], m) for m in mats[1:]):
            return None, f"the members of plate {plate!r} have different parents at site {key[0]!r}"
        patterns[key] = mats[0]
    return patterns, None


def _offset(info, index: tuple) -> int:
    """Row-major offset of a node's index in its site's value."""
    off = 0
    for i, s in zip(index, info.shape):
        off = off * int(s) + int(i)
    return off


def _child_violation(first: Probe, run: Probe, d: int, plate: str, patterns: dict, gen: torch.Generator) -> str | None:
    """Two reverse passes per within-member coordinate of child ``d`` in the full-size ``run`` (its
    site-level parents from the provenance run ``first``; see the module docstring)."""
    r = run.records[d]
    names = [x.name for x in first.records]
    parents = [u for u in positions(first.records[d].prov) if u != d and run.records[u].value.requires_grad]
    if not parents:
        return None
    with torch.enable_grad():
        lp = elementwise_log_prob(r.fn, r.value)
    if not lp.requires_grad:
        return None
    pos_d = _plate_pos(r.shape, r.plates, r.fn.event_dim)
    if pos_d is not None and strip_wrappers(r.fn).event_dim:
        return f"site {r.name!r} in plate {plate!r} has joint events"
    lp_view = lp.reshape(r.shape if pos_d is not None else (-1,))
    n, rest = (r.shape[pos_d], lp_view.numel() // r.shape[pos_d]) if pos_d is not None else (1, lp_view.numel())
    weights = torch.randn(n, generator=gen, dtype=lp.dtype)
    cot = torch.zeros((2 * rest, n, rest), dtype=lp.dtype)
    cot[torch.arange(rest), :, torch.arange(rest)] = 1.0
    cot[rest + torch.arange(rest), :, torch.arange(rest)] = weights
    if pos_d is None:
        cot = cot.reshape(2 * rest, -1)
    else:  # back from (member, rest) to the site's own layout
        other = tuple(s for i, s in enumerate(r.shape) if i != pos_d)
        cot = cot.reshape((2 * rest, n) + other).movedim(1, 1 + pos_d)
    inputs = [run.records[u].value for u in parents]
    grads = _batched_grads([lp_view], inputs, [cot], True)
    for u, g in zip(parents, grads):
        if g is None:
            continue
        pu = run.records[u]
        pos_u = _plate_pos(pu.shape, pu.plates, pu.fn.event_dim)
        g = g.detach()
        g1 = torch.stack([_member_view(g[b], pos_u) for b in range(rest)])  # (rest_d, N_u, rest_u)
        g2 = torch.stack([_member_view(g[rest + b], pos_u) for b in range(rest)])
        allowed = patterns.get((r.name, names[u]), torch.zeros(rest, g1.shape[-1], dtype=torch.bool))
        if (((g1 != 0) | (g2 != 0)) & ~allowed.unsqueeze(1)).any():
            return f"{r.name!r} depends on {names[u]!r} in a way the {plate!r} template lacks"
        if pos_d is not None and pos_u is not None:
            scaled = weights.view(1, -1, 1) * g1
            if ((g2 - scaled).abs() > _RTOL * (g2.abs() + scaled.abs()) + 1e-30).any():
                return f"{r.name!r} depends on other members' {names[u]!r}: the plate couples members"
    return None


def trace_plate_template(
    model: Callable, args: tuple, kwargs: dict, observed: Iterable[str] | None = None,
    members: int = TEMPLATE_MEMBERS, seed: int = 0, **trace_options,
) -> tuple[PlateTemplateTrace | None, str | None]:
    """Trace ``model`` with its one plate shrunk to ``members`` members and check it against the full size.

    Args:
        model, args, kwargs: the model and the arguments it is traced with.
        observed: as for :func:`~pyro_struct.trace_model`.
        members: members of the shrunk plate (>= 2).
        seed: seed of the prior draws (the global RNG state is restored).
        **trace_options: passed to :func:`~pyro_struct.trace_model` (``granularity``, ``num_probes``).

    Returns:
        ``(PlateTemplateTrace, None)``, or ``(None, reason)``: ``(None, None)`` when the model has no
        plate or one of at most ``members`` members (tracing every member is as cheap), else the
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
        plate, size, why = _single_plate(first)
        if plate is None or size <= members:
            return None, why
        try:
            bn = trace_model(_shrunk(model, plate, members), *args, observed=observed, seed=seed, **trace_options, **kwargs)
        except ModelStructureError as e:
            return None, f"the model cannot run with plate {plate!r} shrunk to {members} members ({str(e).split(':')[0]})"
        why = _check_sites(first, bn, plate, size, members)
        patterns, why2 = (None, why) if why else _template_patterns(bn, plate, members)
        why = why or why2
        gen = torch.Generator().manual_seed(seed)
        # the tracer's draws at full size (the first plain, the others spread into the tails)
        for p in range(trace_options.get("num_probes", 3) if not why else 0):
            run = first if p == 0 else run_structure(model, args, kwargs, p - 1, seed + p, grad=True)
            if p:
                check_same_structure(first, run, f"probe {p}")
            for d in range(len(first.records)):
                why = why or _child_violation(first, run, d, plate, patterns, gen)
    finally:
        pyro.util.set_rng_state(rng_state)
        if gc_was_enabled:
            gc.enable()
    if why:
        return None, why
    return PlateTemplateTrace(bn, plate, size, members, {r.name: r.shape for r in first.records}), None
