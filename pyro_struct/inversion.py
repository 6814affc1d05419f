"""Inverse structures of a BayesNet: the minimally faithful inverse (NaMI) and baselines."""

from __future__ import annotations

import gc
import heapq
import random
from collections import Counter
from typing import Iterable, Sequence

import networkx as nx
import torch

from . import dag
from .errors import ModelStructureError
from .graph import BayesNet

__all__ = ["InverseStructure", "faithful_inverse", "inverse_structure", "ordered_inverse", "INVERSE_KINDS", "INVERSION_MODES"]

INVERSE_KINDS = ("faithful", "dense", "moralized", "random", "meanfield")
INVERSION_MODES = ("top", "bottom", "auto")

# Above this many latents the repr lists only a summary line.
_REPR_MAX_LATENTS = 30


# ----------------------------------------------------------------------------- result type
class InverseStructure:
    """A DAG ``H`` over the latent and observed nodes of a BayesNet, an I-map of ``p(z | x)``.

    Observed nodes have no parents in ``H``; every latent's parents come before it in the
    sampling order ``observed + order``. Use :func:`faithful_inverse` or
    :func:`inverse_structure` to build one.

    Attributes:
        bn: the BayesNet that was inverted.
        order: latent node labels in sampling order.
        observed: observed node labels, in ``bn.observed_nodes`` order (sampled "first": they are
            the conditioning input).
        kind: ``"faithful"``, ``"dense"``, ``"moralized"``, ``"random"`` or ``"meanfield"``.
        mode: elimination mode used for the latent order (``"top"`` or ``"bottom"``), or ``None``
            for ``"moralized"`` (which uses reversed trace order).
        barren: latents without an observed descendant (for ``"faithful"``: they keep their model
            parents and are sampled last).

    Example:
        >>> bn = BayesNet.from_edges([("z1", "z2"), ("z2", "x")], observed=["x"])
        >>> inv = faithful_inverse(bn, mode="top")
        >>> inv.order, inv.parents("z1")
        (['z2', 'z1'], ['z2'])
        >>> inv.adjacency()  # rows: order, cols: order + observed
        tensor([[False, False,  True],
                [ True, False, False]])
    """

    def __init__(
        self,
        bn: BayesNet,
        order: Sequence[str],
        parents: dict,
        kind: str,
        mode: str | None,
        barren: Iterable[str] = (),
    ):
        self.bn = bn
        self.order = list(order)
        self.observed = list(bn.observed_nodes)
        self.kind = kind
        self.mode = mode
        self.barren = list(barren)
        self._position = {n: i for i, n in enumerate(self.observed)}
        n_obs = len(self.observed)
        for i, n in enumerate(self.order):
            self._position[n] = n_obs + i
        if len(self._position) != n_obs + len(self.order):
            raise ValueError("latent order repeats a node or overlaps the observed nodes")
        pos = self._position
        self._parents: dict[str, list[str]] = {}
        for v in self.order:
            pv = sorted(parents.get(v, ()), key=pos.__getitem__)
            if pv and pos[pv[-1]] >= pos[v]:
                raise ValueError(f"parent {pv[-1]!r} of {v!r} is not earlier in the sampling order")
            self._parents[v] = pv
        self._graph: nx.DiGraph | None = None

    # ------------------------------------------------------------------ queries
    def parents(self, node: str) -> list[str]:
        """Parents of ``node`` in ``H``, sorted by sampling position (observed first, then ``order``)."""
        if node in self._parents:
            return list(self._parents[node])
        if node in self._position:
            return []  # observed nodes are conditioned on, never sampled
        raise KeyError(f"{node!r} is not a node of this inverse structure")

    @property
    def row_labels(self) -> list[str]:
        """Row labels of :meth:`adjacency`: the latents in sampling order."""
        return list(self.order)

    @property
    def col_labels(self) -> list[str]:
        """Column labels of :meth:`adjacency`: ``order + observed``."""
        return self.order + self.observed

    @property
    def num_edges(self) -> int:
        """Number of edges of ``H`` (all of them end in a latent)."""
        return sum(len(p) for p in self._parents.values())

    @property
    def depth(self) -> int:
        """Number of edges on the longest directed path among latents of ``H``."""
        index = {v: i for i, v in enumerate(self.order)}  # sampling order is topological
        parents = [[index[p] for p in self._parents[v] if p in index] for v in self.order]
        return max(dag.node_levels(parents), default=0)

    @property
    def graph(self) -> nx.DiGraph:
        """``H`` as a ``networkx.DiGraph`` (edges parent -> child; built on first access)."""
        if self._graph is None:
            g = nx.DiGraph()
            attrs = self.bn.graph.nodes
            for n in self.observed + self.order:
                g.add_node(n, **attrs[n])
            g.add_edges_from((p, v) for v in self.order for p in self._parents[v])
            self._graph = g
        return self._graph

    def adjacency(self) -> torch.Tensor:
        """Bool tensor ``A`` of shape ``(n_latent, n_latent + n_observed)``, ``A[i, j]`` iff ``col_labels[j] -> row_labels[i]``.

        Rows are :attr:`order`, columns ``order + observed``, so the latent block is strictly
        lower-triangular (the layout :class:`~pyro_struct.flows.base.ConditionalFlow` expects).
        """
        n_lat = len(self.order)
        n_obs = len(self.observed)
        col = {n: j for j, n in enumerate(self.order)}
        for j, n in enumerate(self.observed):
            col[n] = n_lat + j
        rows: list[int] = []
        cols: list[int] = []
        for i, v in enumerate(self.order):
            pv = self._parents[v]
            rows.extend([i] * len(pv))
            cols.extend(col[p] for p in pv)
        A = torch.zeros(n_lat, n_lat + n_obs, dtype=torch.bool)
        if rows:
            A[torch.tensor(rows), torch.tensor(cols)] = True
        return A

    def to_dict(self) -> dict:
        """JSON-serialisable description: kind, mode, orders, parents, counts."""
        return {
            "kind": self.kind,
            "mode": self.mode,
            "order": list(self.order),
            "observed": list(self.observed),
            "barren": list(self.barren),
            "parents": {v: list(self._parents[v]) for v in self.order},
            "num_edges": self.num_edges,
            "depth": self.depth,
        }

    def __len__(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        head = (
            f"InverseStructure(kind={self.kind!r}, mode={self.mode!r}, {len(self.order)} latent and "
            f"{len(self.observed)} observed nodes, {self.num_edges} edges, depth {self.depth})"
        )
        if len(self.order) > _REPR_MAX_LATENTS:
            return head
        lines = [head] + [f"  {v} <- {{{', '.join(self._parents[v])}}}" for v in self.order]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- validation
def _check_bn(bn) -> None:
    if not isinstance(bn, BayesNet):
        raise TypeError(
            f"bn must be a pyro_struct.BayesNet (from ps.trace_model(model) or BayesNet.from_edges); "
            f"got {type(bn).__name__}"
        )
    if not bn.latent_nodes:
        raise ModelStructureError(
            "the BayesNet has no latent node, so there is no posterior to structure; "
            "mark fewer sites as observed"
        )


def _check_mode(mode) -> None:
    if mode not in INVERSION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, INVERSION_MODES))}; got {mode!r}")


# ----------------------------------------------------------------------------- NaMI core
class _Problem:
    """The part of the inversion shared by both modes: ids, barren split and moral graph.

    Nodes are identified by their trace position, which is also the tie-breaking key.
    """

    def __init__(self, bn: BayesNet):
        self.bn = bn
        pos = {n: bn.trace_position(n) for n in bn.graph.nodes}
        self.label = {i: n for n, i in pos.items()}
        g = bn.graph
        observed = [pos[n] for n in bn.observed_nodes]
        # Latents with an observed descendant are exactly the ancestors of observed nodes.
        relevant = set(observed)
        stack = list(observed)
        pred = g.pred
        while stack:
            u = stack.pop()
            for p in pred[self.label[u]]:
                ip = pos[p]
                if ip not in relevant:
                    relevant.add(ip)
                    stack.append(ip)
        latents = [pos[n] for n in bn.latent_nodes]
        self.latents = [i for i in latents if i in relevant]
        self.barren = [i for i in latents if i not in relevant]
        self.is_latent = {i: True for i in self.latents}
        for i in observed:
            self.is_latent[i] = False
        lat = self.is_latent
        # Latent-only parent/child lists drive the frontier; barren nodes are dropped.
        self.lat_parents = {i: [] for i in self.latents}
        self.lat_children = {i: [] for i in self.latents}
        # Moral graph J split by neighbour kind so that fill counts never look at
        # observed-observed pairs: all observed nodes are conditioned on together, so they are
        # treated as one clique and those edges are neither stored nor counted.
        self.ladj = {i: set() for i in self.latents}  # latent -> latent neighbours
        self.oadj = {i: set() for i in self.latents}  # latent -> observed neighbours
        self.obs_ladj = {i: set() for i in observed}  # observed -> latent neighbours
        for child_label in g.nodes:
            c = pos[child_label]
            if c not in lat:
                continue  # barren child: removed from the graph
            ps_ = [pos[p] for p in pred[child_label]]
            for p in ps_:
                self._join(p, c)
                if lat[c] and lat[p]:
                    self.lat_parents[c].append(p)
                    self.lat_children[p].append(c)
            for a in range(len(ps_)):
                for b in range(a + 1, len(ps_)):
                    self._join(ps_[a], ps_[b])

        # inner[w]: adjacent pairs (at least one latent end) among w's neighbours
        ladj, oadj = self.ladj, self.oadj
        self.inner: dict[int, int] = {}
        for w in self.latents:
            L, O = ladj[w], oadj[w]
            ll = sum(len(ladj[a] & L) for a in L) // 2
            lo = sum(len(oadj[a] & O) for a in L) if O else 0
            self.inner[w] = ll + lo

    def _join(self, a: int, b: int) -> None:
        la, lb = self.is_latent[a], self.is_latent[b]
        if la and lb:
            self.ladj[a].add(b)
            self.ladj[b].add(a)
        elif la:
            self.oadj[a].add(b)
            self.obs_ladj[b].add(a)
        elif lb:
            self.oadj[b].add(a)
            self.obs_ladj[a].add(b)

    def latent_edge_count(self) -> int:
        """Edges of J with at least one latent end (each becomes one edge of H)."""
        return sum(len(s) for s in self.ladj.values()) // 2 + sum(len(s) for s in self.oadj.values())


class _Elimination:
    """One run of the NaMI elimination in ``"top"`` or ``"bottom"`` mode, one step at a time.

    The fill count of a latent ``w`` is ``pairs(w) - inner[w]``: ``pairs`` is the number of
    neighbour pairs with at least one latent end (from the two degrees, O(1)) and ``inner[w]``
    the number of those pairs that are adjacent. ``inner`` is kept up to date edge by edge (a
    new edge ``a - b`` adds one to every common neighbour of ``a`` and ``b``), so only nodes
    within distance 2 of the eliminated node are touched and nothing is recounted from scratch.
    The frontier is a heap keyed by ``(fill, trace position)`` with lazy invalidation.

    ``bound`` is a lower bound on the final number of edges of ``H`` (edges already given to
    ``H`` plus latent edges still in ``J``; each step adds its fill count), so a run can be
    abandoned as soon as it cannot beat another one.
    """

    def __init__(self, problem: _Problem, mode: str):
        self.mode = mode
        self.ladj = {i: set(s) for i, s in problem.ladj.items()}
        self.oadj = {i: set(s) for i, s in problem.oadj.items()}
        self.obs_ladj = {i: set(s) for i, s in problem.obs_ladj.items()}
        if mode == "top":
            self.up, self.down = problem.lat_parents, problem.lat_children
        else:
            self.up, self.down = problem.lat_children, problem.lat_parents
        self.inner: Counter = Counter(problem.inner)
        self.waiting = {i: len(self.up[i]) for i in problem.latents}
        self.version = dict.fromkeys(problem.latents, 0)
        self.in_frontier: set[int] = set()
        self.heap: list[tuple[int, int, int]] = []  # (fill, id, version)
        self.elimination: list[int] = []
        self.parents: dict[int, list[int]] = {}
        self.bound = problem.latent_edge_count()
        self._next: tuple[int, int] | None = None  # (fill, id) chosen but not yet eliminated
        for i in problem.latents:
            if self.waiting[i] == 0:
                self._push(i)

    def _fill(self, w: int) -> int:
        kl = len(self.ladj[w])
        return kl * (kl - 1) // 2 + kl * len(self.oadj[w]) - self.inner[w]

    def _push(self, i: int) -> None:
        self.in_frontier.add(i)
        self.version[i] += 1
        heapq.heappush(self.heap, (self._fill(i), i, self.version[i]))

    @property
    def done(self) -> bool:
        return self.peek() is None

    def peek(self) -> tuple[int, int] | None:
        """``(fill, id)`` of the next node to eliminate, or ``None`` when finished."""
        if self._next is None:
            heap = self.heap
            while heap:
                fill, i, ver = heapq.heappop(heap)
                if i in self.in_frontier and ver == self.version[i]:
                    self._next = (fill, i)
                    break
        return self._next

    def prospective_bound(self) -> int:
        """``bound`` after the next step (the final edge count once the run is done)."""
        nxt = self.peek()
        return self.bound if nxt is None else self.bound + nxt[0]

    def step(self) -> None:
        """Eliminate the next frontier node: fill in its neighbourhood, record its parents."""
        nxt = self.peek()
        if nxt is None:
            return
        self._next = None
        fill, v = nxt
        self.in_frontier.discard(v)
        ladj, oadj, obs_ladj, inner = self.ladj, self.oadj, self.obs_ladj, self.inner
        L = ladj[v]
        O = oadj[v]
        touched: set[int] = set(L)
        if fill:
            for a in L:
                la, oa = ladj[a], oadj[a]
                for b in L - la:
                    if b == a:
                        continue
                    lb = ladj[b]
                    common = la & lb
                    if len(common) > 8:
                        inner.update(common)  # one count per element, in C
                    else:
                        for w in common:
                            inner[w] += 1
                    touched |= common
                    c = len(common) + len(oa & oadj[b])
                    inner[a] += c
                    inner[b] += c
                    la.add(b)
                    lb.add(a)
                new_o = O - oa
                if new_o:
                    # New latent-observed edges a - o close no triangle among themselves (that
                    # would need an observed-observed edge), so their triangles can be counted
                    # from whichever side is smaller: per new o, or per latent neighbour of a.
                    gained = 0
                    if len(new_o) <= len(la):
                        for o in new_o:
                            common = la & obs_ladj[o]
                            for w in common:
                                inner[w] += 1
                            touched |= common
                            gained += len(common)
                    else:
                        for w in la:
                            k = len(oadj[w] & new_o)
                            if k:
                                inner[w] += k
                                gained += k
                                touched.add(w)
                    inner[a] += gained
                    oa |= new_o
                    for o in new_o:
                        obs_ladj[o].add(a)
        # N(v) is a clique now, so v was adjacent to deg(v) - 1 neighbours of each latent
        # neighbour w: removing v removes exactly that many adjacent pairs from w's count.
        drop = len(L) + len(O) - 1
        for a in L:
            ladj[a].discard(v)
            inner[a] -= drop
        for o in O:
            obs_ladj[o].discard(v)
        del ladj[v], oadj[v], inner[v]
        self.parents[v] = list(L) + list(O)
        self.elimination.append(v)
        self.bound += fill
        frontier = self.in_frontier
        touched.discard(v)
        for w in touched:
            if w in frontier:
                self._push(w)
        waiting = self.waiting
        for u in self.down[v]:
            waiting[u] -= 1
            if waiting[u] == 0:
                self._push(u)

    def run(self) -> "_Elimination":
        """Eliminate until the frontier is empty."""
        while self.peek() is not None:
            self.step()
        return self


def _run_auto(problem: _Problem) -> _Elimination:
    """Run top and bottom interleaved, advancing the one with the smaller edge bound.

    Once one finishes, the other is abandoned as soon as its bound shows it cannot be
    sparser (ties go to top). This keeps ``"auto"`` near the cost of the better mode even
    when the other one fills in quadratically many edges (top mode on a plate).
    """
    runs = [_Elimination(problem, "top"), _Elimination(problem, "bottom")]
    alive = [True, True]
    while True:
        live = [k for k in (0, 1) if alive[k] and not runs[k].done]
        if not live:
            break
        k = min(live, key=lambda k: (runs[k].prospective_bound(), k))
        other = 1 - k
        if alive[other] and runs[other].done:
            best = runs[other].bound
            b = runs[k].prospective_bound()
            if b > best or (k == 1 and b >= best):
                alive[k] = False
                continue
        runs[k].step()
    finished = [runs[k] for k in (0, 1) if alive[k]]
    return min(finished, key=lambda r: (r.bound, r.mode != "top"))


def _barren_order(bn: BayesNet, barren_ids: list[int], label: dict) -> list[str]:
    """Barren latents in topological order of ``G`` (ties by trace position)."""
    names = [label[i] for i in barren_ids]
    sub = bn.graph.subgraph(names)
    return list(nx.lexicographical_topological_sort(sub, key=bn.trace_position))


def faithful_inverse(bn: BayesNet, mode: str = "auto") -> InverseStructure:
    """The minimally faithful inverse of ``bn`` (NaMI, Webb et al. 2018) with min-fill elimination.

    The moral graph of ``bn`` is eliminated latent by latent, each step picking the frontier
    node that adds the fewest fill edges (ties: trace order); a latent's parents in ``H`` are
    its remaining neighbours when it is eliminated, and latents are sampled in reverse
    elimination order after the observed nodes. In ``"top"`` mode the frontier starts at latents
    without latent parents, in ``"bottom"`` mode at latents without latent children; ``"auto"``
    keeps the mode with fewer edges (ties: top). Barren latents (no observed descendant) are
    removed first and then sampled last from their model parents, in topological order.

    Fill counts ignore pairs of two observed nodes: all observations are conditioned on
    together, so those pairs never become edges of ``H``. The frontier is a heap keyed by
    ``(fill, trace position)`` whose fill counts are updated incrementally, so a network of
    bounded degree (after fill-in) is inverted in time close to linear in its size; ``"auto"``
    runs both modes interleaved and abandons the one that cannot be sparser, so a mode that
    would fill in quadratically many edges (top mode on a wide plate) costs little.

    Args:
        bn: the traced model.
        mode: ``"top"``, ``"bottom"`` or ``"auto"``.

    Returns:
        An :class:`InverseStructure` with ``kind="faithful"``; ``adjacency()`` has shape
        ``(n_latent, n_latent + n_observed)``.

    Example:
        >>> bn = BayesNet.from_edges([("z1", "z2"), ("z1", "x1"), ("z2", "x2")], observed=["x1", "x2"])
        >>> print(faithful_inverse(bn, mode="top"))
        InverseStructure(kind='faithful', mode='top', 2 latent and 2 observed nodes, 4 edges, depth 1)
          z2 <- {x1, x2}
          z1 <- {x1, z2}
    """
    _check_bn(bn)
    _check_mode(mode)
    # The elimination allocates one set per node and many heap tuples but creates no reference
    # cycles; pausing the cyclic collector saves its repeated full scans on large networks.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        problem = _Problem(bn)
        if not problem.latents:
            run = None
        elif mode == "auto":
            run = _run_auto(problem)
        else:
            run = _Elimination(problem, mode).run()
    finally:
        if gc_was_enabled:
            gc.enable()
    label = problem.label
    order: list[str] = []
    parents: dict[str, list[str]] = {}
    if run is not None:
        for v in reversed(run.elimination):
            name = label[v]
            order.append(name)
            parents[name] = [label[p] for p in run.parents[v]]
    barren = _barren_order(bn, problem.barren, label)
    for b in barren:
        order.append(b)
        parents[b] = list(bn.graph.predecessors(b))
    used_mode = run.mode if run is not None else ("top" if mode == "auto" else mode)
    return InverseStructure(bn, order, parents, kind="faithful", mode=used_mode, barren=barren)


def ordered_inverse(bn: BayesNet, elimination: Sequence[str]) -> InverseStructure:
    """The faithful inverse of ``bn`` obtained by eliminating its latents in a given order (no min-fill search).

    Elimination with fill-in in *any* order gives a faithful inverse (each latent's parents, its
    neighbours in the filled moral graph when it is eliminated, separate it from every latent
    eliminated after it); the order decides how sparse it is and which factorisation it is. A
    time chain eliminated from its first step to its last, then its globals, gives the filtering
    factorisation ``q(theta | x) prod_t q(z_t | z_{t+1}, theta, x_0..x_t)``
    (:mod:`pyro_struct.chains`). Barren latents are handled as by :func:`faithful_inverse`.

    Args:
        bn: the traced model.
        elimination: every non-barren latent node once, in elimination order (barren ones may be listed; they are skipped).

    Returns:
        An :class:`InverseStructure` with ``kind="faithful"`` and ``mode="ordered"``; latents are
        sampled in reverse elimination order.

    Raises:
        ValueError: ``elimination`` misses or repeats a latent node.

    Example:
        >>> bn = BayesNet.from_edges([("z1", "z2"), ("z1", "x1"), ("z2", "x2")], observed=["x1", "x2"])
        >>> inv = ordered_inverse(bn, ["z1", "z2"])
        >>> inv.order, inv.parents("z1")
        (['z2', 'z1'], ['x1', 'z2'])
    """
    _check_bn(bn)
    problem = _Problem(bn)
    label = problem.label
    ids = {n: i for i, n in label.items()}
    wanted = [ids[n] for n in elimination if n in ids and ids[n] in problem.ladj]
    if len(set(wanted)) != len(wanted) or set(wanted) != set(problem.latents):
        missing = sorted({label[i] for i in problem.latents} - {label[i] for i in wanted})[:3]
        raise ValueError(f"elimination must list every non-barren latent node once (missing or repeated: {missing})")
    ladj, oadj = problem.ladj, problem.oadj
    parents: dict[str, list[str]] = {}
    for v in wanted:
        L, O = ladj.pop(v), oadj.pop(v)
        for a in L:
            ladj[a].discard(v)
            ladj[a] |= L - {a}
            oadj[a] |= O
        parents[label[v]] = [label[p] for p in L] + [label[p] for p in O]
    order = [label[v] for v in reversed(wanted)]
    barren = _barren_order(bn, problem.barren, label)
    for b in barren:
        order.append(b)
        parents[b] = list(bn.graph.predecessors(b))
    return InverseStructure(bn, order, parents, kind="faithful", mode="ordered", barren=barren)


# ----------------------------------------------------------------------------- baselines
def _dense(faithful: InverseStructure) -> InverseStructure:
    order = faithful.order
    obs = faithful.observed
    parents = {v: obs + order[:i] for i, v in enumerate(order)}
    return InverseStructure(faithful.bn, order, parents, "dense", faithful.mode, faithful.barren)


def _meanfield(faithful: InverseStructure) -> InverseStructure:
    # the amortised mean-field baseline: every latent sees every observation, no latent
    order, obs = faithful.order, faithful.observed
    return InverseStructure(faithful.bn, order, {v: list(obs) for v in order}, "meanfield", faithful.mode, faithful.barren)


def _moralized(bn: BayesNet) -> InverseStructure:
    # pyro.infer.inspect.get_dependencies: a latent depends on its children and on those
    # co-parents that come later in the trace, and latents are sampled in reverse trace order,
    # with no fill-in. Pyro treats observed values as constants; here they are inputs, so
    # observed parents and observed co-parents (the observed part of the Markov blanket) are
    # included as parents.
    g = bn.graph
    pos = bn.trace_position
    order = sorted(bn.latent_nodes, key=pos, reverse=True)
    parents: dict[str, set] = {v: set() for v in order}
    for v in order:
        parents[v].update(g.successors(v))
        parents[v].update(p for p in g.predecessors(v) if bn.is_observed(p))
    for d in g.nodes:
        ups = list(g.predecessors(d))
        for u1 in ups:
            if bn.is_observed(u1):
                continue
            for u2 in ups:
                if u2 == u1:
                    continue
                if bn.is_observed(u2) or pos(u2) > pos(u1):
                    parents[u1].add(u2)
    return InverseStructure(bn, order, parents, "moralized", None)


def _random(faithful: InverseStructure, seed: int) -> InverseStructure:
    order = faithful.order
    obs = faithful.observed
    n_lat, n_obs = len(order), len(obs)
    # allowed slots of row i: n_obs observed columns and the i earlier latents
    total = n_lat * n_obs + n_lat * (n_lat - 1) // 2
    k = faithful.num_edges
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(total), k))
    start = torch.arange(n_lat, dtype=torch.int64)
    start = start * n_obs + start * (start - 1) // 2  # first slot of each row
    flat = torch.tensor(chosen, dtype=torch.int64)
    rows = torch.searchsorted(start, flat, right=True) - 1
    offs = flat - start[rows]
    parents: dict[str, list[str]] = {v: [] for v in order}
    for r, o in zip(rows.tolist(), offs.tolist()):
        v = order[r]
        parents[v].append(obs[o] if o < n_obs else order[o - n_obs])
    return InverseStructure(faithful.bn, order, parents, "random", faithful.mode, faithful.barren)


def inverse_structure(bn: BayesNet, kind: str = "faithful", seed: int = 0, mode: str = "auto") -> InverseStructure:
    """An inverse structure of ``bn`` of the given kind.

    Args:
        bn: the traced model.
        kind: ``"faithful"`` (the minimally faithful inverse, :func:`faithful_inverse`),
            ``"dense"`` (same latent order; each latent depends on all observed and all earlier
            latents), ``"moralized"`` (what ``pyro.infer.inspect.get_dependencies`` computes:
            reversed edges plus co-parents, no fill-in, sampled in reverse trace order; not
            faithful in general, e.g. on an HMM) or ``"random"`` (same order and number of edges
            as the faithful inverse, a uniformly random pattern of allowed positions) or
            ``"meanfield"`` (each latent depends on all observed nodes and on no latent: the
            amortised mean-field baseline).
        seed: seed of the ``"random"`` pattern.
        mode: elimination mode for the faithful order (``"top"``, ``"bottom"``, ``"auto"``).

    Returns:
        An :class:`InverseStructure`; ``adjacency()`` has shape ``(n_latent, n_latent + n_observed)``.

    Example:
        >>> bn = BayesNet.from_edges([("z1", "z2"), ("z2", "x")], observed=["x"])
        >>> inverse_structure(bn, kind="dense").parents("z1")
        ['x', 'z2']
    """
    _check_bn(bn)
    _check_mode(mode)
    if kind not in INVERSE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, INVERSE_KINDS))}; got {kind!r}")
    if kind == "moralized":
        return _moralized(bn)
    faithful = faithful_inverse(bn, mode=mode)
    if kind == "faithful":
        return faithful
    if kind == "dense":
        return _dense(faithful)
    if kind == "meanfield":
        return _meanfield(faithful)
    return _random(faithful, seed)
