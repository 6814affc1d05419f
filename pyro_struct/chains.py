"""Time chains: find a chain of time-indexed sites in a BayesNet, invert it in filtering order and read off its one-step template.

A Python loop ``for t in range(T): z_t ~ p(z_t | z_{t-1}, theta); x_t ~ p(x_t | z_t, theta)``
(written with or without ``pyro.markov``) traces to sites ``z_0..z_{T-1}``, ``x_0..x_{T-1}``. Its
steps are alike up to a shift of the index, so the inverse is, as for a plate
(:mod:`pyro_struct.plates`), one step's pattern repeated:

- :func:`detect_chain` finds the chain: sites named ``<stem><t>`` (``z_0``, ``x_12``) for
  ``t = 0..T-1``, each stem with one shape, support and observed flag, a first-order dependence
  (a chain site depends on chain sites of its own and the previous step only) and the same
  element-level parent pattern at every step ``t >= 1`` (step 0 may lack some parents); sites
  outside the chain are its *globals*.
- :func:`chain_elimination` is the elimination order that inverts the chain as a filter:
  steps ``0, 1, ..., T-1``, then the globals. With :func:`~pyro_struct.inversion.ordered_inverse`
  it gives ``q(theta | x) q(z_{T-1} | theta, x_{0:T-1}) prod_{t<T-1} q(z_t | z_{t+1}, theta, x_{0:t})``:
  sampled backwards from ``T-1``, each step conditioned on its successor, the globals and the
  observations up to ``t`` (for an HMM this is exactly NaMI's top-mode inverse).
- :func:`chain_inverse` checks that an inverse has that form (every step's latents depend on
  their own step, the next step, globals and observations of steps ``<= t``; globals on
  globals and observations only) and returns the :class:`ChainInverse` template; the
  observations of steps ``<= t`` are what a recurrent summary ``h_t`` replaces.
- :func:`truncate_chain` is the network of the first few steps: its inverse has the same
  template (the neighbourhood of step ``t`` when it is eliminated involves steps ``<= t + 1``
  only), so a long chain is inverted at a constant cost.

Example:
    >>> from pyro_struct import trace_model
    >>> from pyro_struct.inversion import ordered_inverse
    >>> from pyro_struct.models.hmm import hmm
    >>> bn = trace_model(hmm(6), observed=[f"x_{t}" for t in range(6)])
    >>> chain, why = detect_chain(bn)
    >>> chain.length, chain.latent_stems, chain.observed_stems
    (6, ['z_'], ['x_'])
    >>> template = chain_inverse(ordered_inverse(bn, chain_elimination(chain)), chain)
    >>> template.neighbour.tolist(), template.step_summary.tolist(), template.max_lag
    ([[True]], [True], 5)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import networkx as nx
import torch

from .graph import BayesNet
from .inversion import InverseStructure

__all__ = ["ChainCouplingError", "Chain", "ChainInverse", "detect_chain", "chain_elimination", "chain_inverse",
           "expand_chain_inverse", "truncate_chain", "MIN_CHAIN_LENGTH"]

#: a chain has at least this many steps (shorter loops are left to the per-coordinate flow)
MIN_CHAIN_LENGTH = 3
_NAME = re.compile(r"^(.*\D)(\d+)$")


class ChainCouplingError(ValueError):
    """The inverse structure does not have the chain's filtering form (a step depends on a latent
    two or more steps away, on a later observation, or a global is sampled after chain latents)."""


@dataclass
class Chain:
    """A time chain in a BayesNet.

    Attributes:
        length: ``T``.
        latent_stems, observed_stems: stems of the chain's sites (``"z_"`` for ``z_0..z_{T-1}``), trace order.
        sites: stem -> the site names of steps ``0..T-1``.
        coords: the latent coordinates of one step, ``(stem, index)`` in trace order (``k`` of them).
        obs_coords: the observed coordinates of one step (``ko``).
        step_of: chain node label -> ``(t, j)``: step and coordinate (latent or observed list).
        global_latents, global_observed: node labels outside the chain, trace order.
    """

    length: int
    latent_stems: list
    observed_stems: list
    sites: dict
    coords: list
    obs_coords: list
    step_of: dict
    global_latents: list
    global_observed: list

    def labels(self, t: int, observed: bool = False) -> list[str]:
        """The node labels of step ``t`` (latent or observed), in coordinate order."""
        return [self.label(t, j, observed) for j in range(len(self.obs_coords if observed else self.coords))]

    def label(self, t: int, j: int, observed: bool = False) -> str:
        """The node label of coordinate ``j`` of step ``t``."""
        from .graph import node_label

        stem, index, shape = (self.obs_coords if observed else self.coords)[j]
        return node_label(self.site_name(stem, t), index, shape)

    def site_name(self, stem: str, t: int) -> str:
        """Step ``t``'s site of ``stem`` (``stem + str(t)`` beyond the traced length)."""
        names = self.sites[stem]
        return names[t] if t < len(names) else f"{stem}{t}"


def _stems(bn: BayesNet) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for name in bn.sites:
        m = _NAME.match(name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = name
    return out


def _signature(info) -> tuple:
    return (tuple(info.shape), tuple(info.node_shape), info.observed, info.block, str(info.support), info.plates)


def _chain_stems(bn: BayesNet) -> tuple[list[str], int]:
    """The stems of the longest index range ``0..T-1`` shared by the most stems (``([], 0)`` if none)."""
    by_length: dict[int, list[str]] = {}
    for stem, steps in _stems(bn).items():
        T = len(steps)
        if T >= MIN_CHAIN_LENGTH and set(steps) == set(range(T)):
            by_length.setdefault(T, []).append(stem)
    if not by_length:
        return [], 0
    T = max(by_length, key=lambda n: (len(by_length[n]), n))
    return by_length[T], T


def _check_stems(bn: BayesNet, stems: list[str], steps: dict, T: int) -> str | None:
    for stem in stems:
        first = bn.sites[steps[stem][0]]
        if first.plates:
            return f"chain site {first.name!r} is in the plate {first.plates[0][0]!r} (chains inside plates are not supported)"
        for t in range(1, T):
            info = bn.sites[steps[stem][t]]
            if _signature(info) != _signature(first):
                return (f"chain sites {first.name!r} and {info.name!r} differ in shape, support or observed flag "
                        "(every step of a chain must be alike)")
    if not any(not bn.sites[steps[s][0]].observed for s in stems):
        return "the chain has no latent sites"
    return None


def _build(bn: BayesNet, stems: list[str], steps: dict, T: int) -> Chain:
    order = sorted(stems, key=lambda s: list(bn.sites).index(steps[s][0]))
    lat = [s for s in order if not bn.sites[steps[s][0]].observed]
    obs = [s for s in order if bn.sites[steps[s][0]].observed]
    step_of: dict[str, tuple[int, int]] = {}
    coords, obs_coords = [], []
    for group, target in ((lat, coords), (obs, obs_coords)):
        for stem in group:
            info = bn.sites[steps[stem][0]]
            for idx in info.indices:
                target.append((stem, tuple(idx), tuple(info.node_shape)))
    chain = Chain(T, lat, obs, {s: [steps[s][t] for t in range(T)] for s in order}, coords, obs_coords, step_of, [], [])
    for t in range(T):
        for j, n in enumerate(chain.labels(t)):
            step_of[n] = (t, j)
        for j, n in enumerate(chain.labels(t, observed=True)):
            step_of[n] = (t, j)
    chain.global_latents = [n for n in bn.latent_nodes if n not in step_of]
    chain.global_observed = [n for n in bn.observed_nodes if n not in step_of]
    return chain


def _pattern_violation(bn: BayesNet, chain: Chain) -> str | None:
    """Why the chain's steps are not first-order or not alike up to a shift (element level), or ``None``."""
    obs = {n: bn.graph.nodes[n]["observed"] for n in chain.step_of}
    patterns: dict[tuple, frozenset] = {}  # (kind, j) -> parent signature at steps >= 1
    for child, (t, j) in chain.step_of.items():
        sig = set()
        for p in bn.graph.predecessors(child):
            if p in chain.step_of:
                tp, jp = chain.step_of[p]
                if t - tp not in (0, 1):
                    return f"{child!r} depends on {p!r} ({t - tp} steps apart): only first-order chains share a step flow"
                sig.add((obs[p], jp, t - tp))
            else:
                sig.add(p)
        key = (obs[child], j)
        if t == 0:
            patterns.setdefault(("step0",) + key, frozenset(sig))
            continue
        if patterns.setdefault(key, frozenset(sig)) != frozenset(sig):
            return f"{child!r} has another parent pattern than the same coordinate of earlier steps (the steps are not alike)"
    for (kind, *key), sig in list(patterns.items()):
        if kind == "step0" and tuple(key) in patterns and not sig <= patterns[tuple(key)]:
            name = chain.label(0, key[1], key[0])
            return f"{name!r} has parents that later steps lack (the first step is not a special case of the others)"
    return None


def detect_chain(bn: BayesNet) -> tuple[Chain | None, str | None]:
    """The time chain of ``bn``.

    Returns:
        ``(Chain, None)``; ``(None, None)`` when no sites are named ``<stem><t>`` for
        ``t = 0..T-1`` with ``T >= MIN_CHAIN_LENGTH``; ``(None, reason)`` when such sites exist but
        do not form a chain that one step flow can share (the reason names the sites).
    """
    stems, T = _chain_stems(bn)
    if not stems:
        return None, None
    steps = _stems(bn)
    why = _check_stems(bn, stems, steps, T)
    if why:
        return None, why
    chain = _build(bn, stems, steps, T)
    why = _pattern_violation(bn, chain)
    return (None, why) if why else (chain, None)


def chain_elimination(chain: Chain) -> list[str]:
    """The filtering elimination order: step 0's latents, step 1's, ..., step ``T-1``'s, then the globals (reversed trace order)."""
    return [n for t in range(chain.length) for n in chain.labels(t)] + list(reversed(chain.global_latents))


def truncate_chain(bn: BayesNet, chain: Chain, steps: int) -> BayesNet:
    """The network of the globals and the chain's first ``steps`` steps (the induced subgraph)."""
    keep = set(chain.global_latents) | set(chain.global_observed)
    keep |= {n for n, (t, _) in chain.step_of.items() if t < steps}
    late = {s for names in chain.sites.values() for s in names[steps:]}
    sites = [dataclasses.replace(info) for name, info in bn.sites.items() if name not in late]
    graph = nx.DiGraph(bn.graph.subgraph(keep))
    return BayesNet(graph, sites)


@dataclass
class ChainInverse:
    """The one-step template of a chain's inverse (latent coordinates in the step's sampling order).

    Attributes:
        chain: the :class:`Chain` (of the network that was inverted).
        step_order: the step's latent coordinates (indices into ``chain.coords``) in sampling order.
        global_order: global latent labels in sampling order (sampled before the chain).
        within, neighbour: ``(k, k)`` bool: step-order coordinate ``i`` of step ``t`` depends on
            coordinate ``j`` of step ``t`` (``j < i``) / of step ``t + 1``; steps ``t < T - 1``.
        step_globals, step_observed: ``(k, g)`` / ``(k, cg)`` bool: on global latents / global observations.
        step_summary: ``(k,)`` bool: on observations of steps ``<= t`` (through the summary ``h_t``).
        boundary_within, boundary_globals, boundary_observed, boundary_summary: the same for the
            last step ``T - 1`` (sampled first, no successor).
        global_adjacency: ``(g, g + cg)`` bool: globals on earlier globals and global observations.
        global_pooled: ``(g,)`` bool: a global depends on chain observations (through a pooled summary).
        max_lag: the largest ``t - t'`` of an observation ``x_{t'}`` listed as a parent of step ``t``.
    """

    chain: Chain
    step_order: list
    global_order: list
    within: torch.Tensor
    neighbour: torch.Tensor
    step_globals: torch.Tensor
    step_observed: torch.Tensor
    step_summary: torch.Tensor
    boundary_within: torch.Tensor
    boundary_globals: torch.Tensor
    boundary_observed: torch.Tensor
    boundary_summary: torch.Tensor
    global_adjacency: torch.Tensor
    global_pooled: torch.Tensor
    max_lag: int = 0
    notes: list = field(default_factory=list)

    @property
    def step_dim(self) -> int:
        return len(self.step_order)

    @property
    def num_globals(self) -> int:
        return len(self.global_order)


def _step_orders(inverse: InverseStructure, chain: Chain) -> list[int]:
    """The step's coordinates in sampling order (the same at every step) and the check that steps are sampled backwards."""
    pos = {v: i for i, v in enumerate(inverse.order)}
    orders = {tuple(sorted(range(len(chain.coords)), key=lambda j: pos[chain.label(t, j)])) for t in range(chain.length)}
    if len(orders) != 1:
        raise ChainCouplingError("the inverse samples the coordinates of different steps in different orders")
    last = [max(pos[n] for n in chain.labels(t)) for t in range(chain.length)]
    first = [min(pos[n] for n in chain.labels(t)) for t in range(chain.length)]
    if any(first[t] < last[t + 1] for t in range(chain.length - 1)):
        raise ChainCouplingError("the inverse does not sample the chain's steps backwards from the last one")
    return list(orders.pop())


def _classify_step(inverse: InverseStructure, chain: Chain, rank: dict, gi: dict, ci: dict, t: int, parts: tuple) -> int:
    """Add step ``t``'s inverse parents to ``parts = (within, neighbour, globals, observed, summary)`` (sets of
    ``(row, column)`` pairs, rows for the summary); return the largest lag of an observation parent."""
    within, neighbour, glob, gobs, summ = parts
    first, observed, step_of = t, set(inverse.observed), chain.step_of
    for j in range(len(chain.coords)):
        v = chain.label(t, j)
        i = rank[j]
        for p in inverse.parents(v):
            if p in gi:
                glob.add((i, gi[p]))
            elif p in ci:
                gobs.add((i, ci[p]))
            elif p in observed:  # (the hot loop: O(T^2) observation parents in all)
                tp = step_of[p][0]
                if tp > t:
                    raise ChainCouplingError(f"{v!r} depends on the later observation {p!r} in the inverse")
                summ.add(i)
                if tp < first:
                    first = tp
            else:
                tp, jp = step_of[p]
                if tp == t:
                    within.add((i, rank[jp]))
                elif tp == t + 1 and neighbour is not None:
                    neighbour.add((i, rank[jp]))
                else:
                    raise ChainCouplingError(f"{v!r} depends on {p!r} in the inverse (only its own step and the next)")
    return t - first


def _mask(pairs, rows: int, cols: int | None = None) -> torch.Tensor:
    """A bool tensor ``(rows, cols)`` (``(rows,)`` when ``cols`` is ``None``) true at ``pairs``."""
    out = torch.zeros((rows,) if cols is None else (rows, cols), dtype=torch.bool)
    for ij in pairs:
        out[ij] = True
    return out


def chain_inverse(inverse: InverseStructure, chain: Chain) -> ChainInverse:
    """The one-step template of ``inverse`` for ``chain`` (see the module docstring).

    Raises:
        ChainCouplingError: the inverse is not of the chain's filtering form (the message names the node).
    """
    step_order = _step_orders(inverse, chain)
    rank = {j: i for i, j in enumerate(step_order)}
    pos = {v: i for i, v in enumerate(inverse.order)}
    global_order = [v for v in inverse.order if v not in chain.step_of]
    first_chain = min(pos[n] for n in chain.step_of if n in pos)
    late = [g for g in global_order if pos[g] > first_chain]
    if late:
        raise ChainCouplingError(f"the global {late[0]!r} is sampled after chain latents in the inverse")
    gi = {v: i for i, v in enumerate(global_order)}
    ci = {v: i for i, v in enumerate(chain.global_observed)}
    k, g, cg = len(step_order), len(gi), len(ci)
    step, boundary = tuple(set() for _ in range(5)), (set(), None, set(), set(), set())
    max_lag = 0
    for t in range(chain.length):
        max_lag = max(max_lag, _classify_step(inverse, chain, rank, gi, ci, t, boundary if t == chain.length - 1 else step))
    adjacency, pooled = set(), set()
    for v in global_order:
        for p in inverse.parents(v):
            if p in gi or p in ci:
                adjacency.add((gi[v], gi[p] if p in gi else g + ci[p]))
            elif p in chain.step_of and inverse.bn.graph.nodes[p]["observed"]:
                pooled.add(gi[v])
            else:
                raise ChainCouplingError(f"the global {v!r} depends on the chain latent {p!r} in the inverse")
    sw, sn, sg, so, ss = step
    bw, _, bg, bo, bs = boundary
    return ChainInverse(chain, step_order, global_order, _mask(sw, k, k), _mask(sn, k, k), _mask(sg, k, g), _mask(so, k, cg),
                        _mask(ss, k), _mask(bw, k, k), _mask(bg, k, g), _mask(bo, k, cg), _mask(bs, k),
                        _mask(adjacency, g, g + cg), _mask(pooled, g), max_lag)


def expand_chain_inverse(template: ChainInverse, length: int) -> dict[str, list[str]]:
    """What the compiled chain flow lets every latent of a chain of ``length`` steps depend on.

    The summary ``h_t`` stands for every observed coordinate of steps ``0..t`` and the globals'
    pooled summary for every chain observation, so these sets contain the inverse's parents
    (equal on latents, a superset on observations where the inverse lists fewer).

    Returns:
        latent label -> parent labels.
    """
    c, order = template.chain, template.step_order
    glob, gobs = template.global_order, c.global_observed
    every_obs = [n for t in range(length) for n in c.labels(t, observed=True)]
    out = {}
    for i, v in enumerate(glob):
        row = template.global_adjacency[i]
        out[v] = [glob[j] for j in range(len(glob)) if row[j]] + [gobs[j] for j in range(len(gobs)) if row[len(glob) + j]]
        out[v] += every_obs if template.global_pooled[i] else []
    for t in range(length):
        last = t == length - 1
        W, G, O, S = ((template.boundary_within, template.boundary_globals, template.boundary_observed, template.boundary_summary)
                      if last else (template.within, template.step_globals, template.step_observed, template.step_summary))
        for i, j in enumerate(order):
            ps = [c.label(t, order[a]) for a in range(len(order)) if W[i, a]]
            ps += [] if last else [c.label(t + 1, order[a]) for a in range(len(order)) if template.neighbour[i, a]]
            ps += [glob[a] for a in range(len(glob)) if G[i, a]] + [gobs[a] for a in range(len(gobs)) if O[i, a]]
            ps += [n for s in range(t + 1) for n in c.labels(s, observed=True)] if S[i] else []
            out[c.label(t, j)] = ps
    return out
