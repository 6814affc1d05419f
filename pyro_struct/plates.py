"""Plate templates: the members of a plate in a BayesNet, the inverse structure of one member, and its expansion.

Members of a Pyro plate are exchangeable, so the minimally faithful inverse of a plated model is, in
the cases where it does not couple members, the inverse of one representative member repeated:
``q(theta | x_1..N) prod_i q(z_i | theta, x_i)``. :func:`plate_inverse` reads that template off an
inverse structure of a small traced network (checking that every member has the same pattern and
that no member's latents depend on another's) and :func:`expand_plate_inverse` writes the
inverse for any number of members.

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_struct import trace_model, faithful_inverse
    >>> def model(N=3):
    ...     mu = pyro.sample("mu", dist.Normal(0., 1.))
    ...     with pyro.plate("data", N):
    ...         z = pyro.sample("z", dist.Normal(mu, 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=torch.zeros(N))
    >>> template = plate_inverse(faithful_inverse(trace_model(model)), "data")
    >>> template.member_parents["z[0]"], template.global_parents["mu"]
    ((['mu'], ['x[0]']), ([], ['x[0]']))
    >>> sorted(expand_plate_inverse(template, 5)["mu"])[:2]
    ['x[0]', 'x[1]']
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .graph import BayesNet, node_label
from .inversion import InverseStructure

__all__ = ["PlateCouplingError", "PlateInverse", "member_index", "plate_inverse", "expand_plate_inverse",
           "NestedPlateInverse", "nested_plates", "nested_plate_inverse", "expand_nested_plate_inverse"]


class PlateCouplingError(ValueError):
    """The inverse structure couples the members of a plate (or they are not exchangeable): it has
    no one-member template, and the plate needs a per-coordinate structure."""


def member_index(bn: BayesNet, node: str, plate: str) -> int | None:
    """The member of ``plate`` that ``node`` belongs to (``None`` for a node outside the plate)."""
    attrs = bn.graph.nodes[node]
    pos = bn.sites[attrs["site"]].plate_position(plate)
    return None if pos is None else int(attrs["index"][pos])


def _as_member(bn: BayesNet, node: str, plate: str, member: int) -> str:
    """The label of ``node``'s counterpart in ``member``."""
    attrs = bn.graph.nodes[node]
    info = bn.sites[attrs["site"]]
    pos = info.plate_position(plate)
    index = list(attrs["index"])
    index[pos] = member
    return node_label(info.name, tuple(index), info.node_shape)


@dataclass
class PlateInverse:
    """The inverse structure of a plated network written for one representative member (member 0).

    Attributes:
        plate: the plate's name.
        size: its size in the traced network.
        global_order: latents outside the plate, in sampling order (sampled before any member).
        member_order: member 0's latents, in sampling order (every member's are sampled the same way).
        global_parents: global latent -> (global parents, member-0 parents); a member-0 parent
            stands for that coordinate of every member (the input of a permutation-invariant pooling).
        member_parents: member-0 latent -> (global parents, member-0 parents).
        positions: site in the plate -> (rank of its node shape, position of the plate's dimension).
    """

    plate: str
    size: int
    global_order: list
    member_order: list
    global_parents: dict
    member_parents: dict
    positions: dict


def _split(bn: BayesNet, parents: list, plate: str) -> tuple[dict, list]:
    by_member: dict[int, list] = {}
    outside = []
    for p in parents:
        m = member_index(bn, p, plate)
        (outside if m is None else by_member.setdefault(m, [])).append(p)
    return by_member, outside


def _check_members(bn: BayesNet, inverse: InverseStructure, plate: str, size: int) -> dict:
    """Member-0 latent -> (global parents, member-0 parents), after checking every member agrees."""
    template: dict = {}
    for v in inverse.order:
        m = member_index(bn, v, plate)
        if m is None:
            continue
        by_member, outside = _split(bn, inverse.parents(v), plate)
        if set(by_member) - {m}:
            raise PlateCouplingError(f"{v!r} has inverse parents in other members of plate {plate!r}: the inverse couples members")
        own = sorted(_as_member(bn, p, plate, 0) for p in by_member.get(m, []))
        key = _as_member(bn, v, plate, 0)
        entry = (sorted(outside), own)
        if template.setdefault(key, entry) != entry:
            raise PlateCouplingError(f"member {m} of plate {plate!r} has another inverse pattern than member 0 (at {v!r})")
    return template


def _check_globals(bn: BayesNet, inverse: InverseStructure, plate: str, size: int) -> dict:
    """Global latent -> (global parents, member-0 parents), after checking each member feeds it alike."""
    out = {}
    for v in inverse.order:
        if member_index(bn, v, plate) is not None:
            continue
        by_member, outside = _split(bn, inverse.parents(v), plate)
        patterns = {m: sorted(_as_member(bn, p, plate, 0) for p in ps) for m, ps in by_member.items()}
        first = patterns.get(0, [])
        if by_member and (set(patterns) != set(range(size)) or any(p != first for p in patterns.values())):
            raise PlateCouplingError(f"the members of plate {plate!r} feed {v!r} differently: not exchangeable")
        if any(bn.graph.nodes[p]["observed"] is False for p in first):
            raise PlateCouplingError(f"{v!r} depends on member latents of plate {plate!r} in the inverse (it is sampled after them)")
        out[v] = (sorted(outside), first)
    return out


def plate_inverse(inverse: InverseStructure, plate: str) -> PlateInverse:
    """The one-member template of ``inverse`` for ``plate``.

    Args:
        inverse: an inverse structure of a traced plated model (any size of at least 2 members
            shows whether members are treated alike).
        plate: the plate's name.

    Returns:
        a :class:`PlateInverse`.

    Raises:
        PlateCouplingError: the inverse couples members, members have different patterns, or a
            latent outside the plate is sampled after member latents it depends on.
        ValueError: no site is in a plate of that name.
    """
    bn = inverse.bn
    sizes = {size for s in bn.sites.values() for name, _, size in s.plates if name == plate}
    if not sizes:
        raise ValueError(f"no site of the model is in a plate named {plate!r}")
    size = sizes.pop()
    members = _check_members(bn, inverse, plate, size)
    globals_ = _check_globals(bn, inverse, plate, size)
    member_order = [v for v in inverse.order if member_index(bn, v, plate) == 0]
    global_order = [v for v in inverse.order if v in globals_]
    position = {v: i for i, v in enumerate(inverse.order)}
    first_member = min((position[v] for v in inverse.order if v not in globals_), default=len(position))
    if any(position[g] > first_member for g in global_order):
        late = next(g for g in global_order if position[g] > first_member)
        raise PlateCouplingError(f"{late!r} (outside plate {plate!r}) is sampled after member latents in the inverse")
    positions = {
        s.name: (len(s.node_shape), s.plate_position(plate)) for s in bn.sites.values() if s.plate_position(plate) is not None
    }
    return PlateInverse(plate, size, global_order, member_order, globals_, members, positions)


def _member_label(template_label: str, positions: dict, member: int) -> str:
    site, _, rest = template_label.partition("[")
    rank, pos = positions[site]
    index = [int(i) for i in rest.rstrip("]").split(",")]
    index[pos] = member
    return node_label(site, tuple(index), (1,) * rank)


def expand_plate_inverse(template: PlateInverse, size: int) -> dict[str, list[str]]:
    """The inverse parents of every latent of the network with ``size`` members, from a template.

    Args:
        template: from :func:`plate_inverse`.
        size: number of members.

    Returns:
        latent label -> parent labels (globals' pooled parents for every member, each member's
        latents with their own member's parents).
    """
    pos = template.positions
    out = {}
    for v, (outside, pooled) in template.global_parents.items():
        out[v] = list(outside) + [_member_label(p, pos, m) for m in range(size) for p in pooled]
    for v, (outside, own) in template.member_parents.items():
        for m in range(size):
            out[_member_label(v, pos, m)] = list(outside) + [_member_label(p, pos, m) for p in own]
    return out


# ---------------------------------------------------------------- nested plates
def nested_plates(bn: BayesNet) -> tuple[str, str] | None:
    """``(outer, inner)`` when the model has exactly two plates and every site of the inner one is
    also in the outer one (groups, with members inside each group); ``None`` otherwise."""
    names = {p[0] for s in bn.sites.values() for p in s.plates}
    if len(names) != 2:
        return None
    a, b = sorted(names)
    sets = [{p[0] for p in s.plates} for s in bn.sites.values()]
    if all(a in s for s in sets if b in s):
        outer, inner = a, b
    elif all(b in s for s in sets if a in s):
        outer, inner = b, a
    else:
        return None
    return (outer, inner) if any(inner in s for s in sets) else None


@dataclass
class NestedPlateInverse:
    """The inverse structure of a network with nested plates (groups, each with members) written for
    group 0 and its member 0.

    Attributes:
        outer, inner: the group plate's and the member plate's names.
        sizes: ``(G, M)`` in the traced network.
        global_order, group_order, member_order: global latents, group 0's latents and member
            ``(0, 0)``'s latents, each in sampling order (every group and member is sampled alike).
        global_parents: global latent -> (global parents, group-0 parents, member-(0,0) parents);
            the last two are observed coordinates pooled over every group (and every member).
        group_parents: group-0 latent -> (global parents, group-0 parents, member-(0,0) parents
            pooled over the group's members).
        member_parents: member-(0,0) latent -> (global parents, group-0 parents, own parents).
        positions: site -> ``(rank of its node shape, position of the outer dimension, position
            of the inner dimension or None)``.
    """

    outer: str
    inner: str
    sizes: tuple
    global_order: list
    group_order: list
    member_order: list
    global_parents: dict
    group_parents: dict
    member_parents: dict
    positions: dict


def _unit(bn: BayesNet, node: str, outer: str, inner: str) -> tuple:
    """``()`` for a global node, ``(g,)`` for a group node, ``(g, m)`` for a member node."""
    g, m = member_index(bn, node, outer), member_index(bn, node, inner)
    return () if g is None else (g,) if m is None else (g, m)


def _as_unit_zero(bn: BayesNet, node: str, outer: str, inner: str) -> str:
    """The label of ``node``'s counterpart in group 0 (and member 0 of its plate)."""
    level = len(_unit(bn, node, outer, inner))
    label = node if level == 0 else _as_member(bn, node, outer, 0)
    return label if level < 2 else _as_member(bn, label, inner, 0)


def _nested_entry(bn: BayesNet, inverse: InverseStructure, v: str, outer: str, inner: str, sizes: tuple) -> tuple:
    """``v``'s relabelled (global, group, member) parents, after checking that they lie in its own
    group / member, and that deeper parents are observed and feed it alike from every member."""
    unit = _unit(bn, v, outer, inner)
    by_level: list[list] = [[], [], []]
    deeper: dict = {}  # pooled unit -> relabelled parents
    for p in inverse.parents(v):
        pu = _unit(bn, p, outer, inner)
        if len(pu) <= len(unit) and pu != unit[: len(pu)]:
            raise PlateCouplingError(f"{v!r} has inverse parent {p!r} in another group or member of plates "
                                     f"{outer!r}/{inner!r}: the inverse couples them")
        if len(pu) > len(unit):
            if pu[: len(unit)] != unit:
                raise PlateCouplingError(f"{v!r} pools {p!r} of another group of plate {outer!r}: the inverse couples groups")
            if not bn.graph.nodes[p]["observed"]:
                raise PlateCouplingError(f"{v!r} depends on the deeper latent {p!r} in the inverse (it is sampled after it)")
            deeper.setdefault(pu, []).append(_as_unit_zero(bn, p, outer, inner))
        by_level[len(pu)].append(_as_unit_zero(bn, p, outer, inner))
    # every pooled unit feeds v with the same pattern, and every unit at that level does
    for level in range(len(unit) + 1, 3):
        pooled = {u: sorted(ps) for u, ps in deeper.items() if len(u) == level}
        if pooled:
            span = [sizes[0]] if level == 1 else [sizes[0], sizes[1]]
            want = {unit + rest for rest in _product(span[len(unit):])}
            first = next(iter(pooled.values()))
            if set(pooled) != want or any(ps != first for ps in pooled.values()):
                raise PlateCouplingError(f"the members of plates {outer!r}/{inner!r} feed {v!r} differently: not exchangeable")
            by_level[level] = first
    return tuple(sorted(set(ps)) for ps in by_level)


def _product(sizes: list) -> list[tuple]:
    return list(itertools.product(*(range(s) for s in sizes)))


def nested_plate_inverse(inverse: InverseStructure, outer: str, inner: str) -> NestedPlateInverse:
    """The group-0 / member-(0,0) template of ``inverse`` for plates ``inner`` nested in ``outer``.

    Args:
        inverse: an inverse structure of a traced model with the two plates (at least 2 groups
            and 2 members show whether they are treated alike).
        outer, inner: the plates' names (every site in ``inner`` is also in ``outer``).

    Returns:
        a :class:`NestedPlateInverse`.

    Raises:
        PlateCouplingError: the inverse couples groups or members, they have different patterns,
            or a latent depends on a deeper latent (a global on a group's, a group's on a member's).
        ValueError: the plates are not nested that way.
    """
    bn = inverse.bn
    if nested_plates(bn) != (outer, inner):
        raise ValueError(f"plates {outer!r}/{inner!r} are not the model's two nested plates (outer, inner)")
    sizes = tuple(next(p[2] for s in bn.sites.values() for p in s.plates if p[0] == name) for name in (outer, inner))
    entries: list[dict] = [{}, {}, {}]
    for v in inverse.order:
        level = len(_unit(bn, v, outer, inner))
        entry = _nested_entry(bn, inverse, v, outer, inner, sizes)
        key = _as_unit_zero(bn, v, outer, inner)
        if entries[level].setdefault(key, entry) != entry:
            raise PlateCouplingError(f"{v!r} has another inverse pattern than {key!r}: the groups or members of plates "
                                     f"{outer!r}/{inner!r} are not exchangeable")
    orders = [[v for v in inverse.order if _unit(bn, v, outer, inner) == u] for u in ((), (0,), (0, 0))]
    positions = {s.name: (len(s.node_shape), s.plate_position(outer), s.plate_position(inner))
                 for s in bn.sites.values() if s.plate_position(outer) is not None}
    return NestedPlateInverse(outer, inner, sizes, *orders, *entries, positions)


def _unit_label(template_label: str, positions: dict, unit: tuple) -> str:
    """The label of a group-0 / member-(0,0) node's counterpart in ``unit`` (``()``, ``(g,)`` or ``(g, m)``)."""
    site, _, rest = template_label.partition("[")
    if site not in positions:
        return template_label
    rank, po, pi = positions[site]
    index = [int(i) for i in rest.rstrip("]").split(",")]
    for pos, value in zip((po, pi), unit):
        if pos is not None:
            index[pos] = value
    return node_label(site, tuple(index), (1,) * rank)


def expand_nested_plate_inverse(template: NestedPlateInverse, groups: int, members: int) -> dict[str, list[str]]:
    """The inverse parents of every latent of the network with ``groups`` groups of ``members``
    members, from a nested template.

    Returns:
        latent label -> parent labels (a pooled parent stands for its coordinate in every group /
        member below the latent).
    """
    pos = template.positions
    out = {}
    units = [[()], _product([groups]), _product([groups, members])]
    tables = (template.global_parents, template.group_parents, template.member_parents)
    for level, table in enumerate(tables):
        for unit in units[level]:
            for v, by_level in table.items():
                ps = []
                for plevel, labels in enumerate(by_level):
                    below = [unit] if plevel <= level else [u for u in units[plevel] if u[:level] == unit]
                    ps += [_unit_label(p, pos, u[:plevel] if plevel <= level else u) for u in below for p in labels]
                out[_unit_label(v, pos, unit)] = ps
    return out
