"""The scalar-level Bayesian network that the tracer produces and the inversion consumes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import networkx as nx
import torch
from torch.distributions import constraints

__all__ = ["SiteInfo", "BayesNet", "node_label"]


def node_label(site: str, index: tuple, shape: tuple) -> str:
    """Label of one scalar coordinate: ``"name"`` for a scalar site, ``"name[i,j]"`` otherwise.

    >>> node_label("z", (1, 2), (3, 4))
    'z[1,2]'
    """
    if len(shape) == 0:
        return site
    return f"{site}[{','.join(str(i) for i in index)}]"


@dataclass
class SiteInfo:
    """One sample site of a traced model.

    Attributes:
        name: the Pyro site name.
        shape: shape of the site's (constrained) value, plates included.
        support: the support constraint of the site's distribution.
        observed: whether the site is observed.
        block: whether the site's coordinates form one joint block (a joint event such as
            ``MultivariateNormal`` or a support whose bijection mixes elements).
        node_shape: shape indexed by the site's scalar nodes. Equal to ``shape`` except for
            latent sites whose bijection to the unconstrained space changes the shape
            (simplex: ``(K,) -> (K - 1,)``), whose nodes index unconstrained coordinates.
        offset: position of the site's first coordinate in the flat latent (unconstrained)
            or observed vector, in trace order.
        event_dim: event dimension of the site's distribution.
        plates: ``(name, dim, size)`` of every vectorised plate the site is in (Pyro's
            ``cond_indep_stack``); ``dim`` is negative, counted from the right of the batch shape.
        covariate: an observed site that is a model argument, not a random variable
            (:mod:`pyro_struct.covariates`): a conditioning input like an observation.
        scale_parents: names of the sites that the ``scale`` (or ``scale_tril``) parameter of
            the site's distribution depends on, as traced (a funnel's ``z ~ Normal(0, exp(v / 2))``
            has ``("v",)``); empty where the distribution has no such parameter.
    """

    name: str
    shape: tuple
    support: constraints.Constraint
    observed: bool
    block: bool = False
    node_shape: tuple | None = None
    offset: int = 0
    event_dim: int = 0
    plates: tuple = ()
    covariate: bool = False
    scale_parents: tuple = ()

    def __post_init__(self):
        self.shape = tuple(self.shape)
        self.scale_parents = tuple(self.scale_parents)
        self.node_shape = tuple(self.shape if self.node_shape is None else self.node_shape)
        self.plates = tuple(tuple(p) for p in self.plates)

    def plate_position(self, plate: str) -> int | None:
        """Position in :attr:`node_shape` of ``plate``'s dimension (``None`` outside that plate)."""
        for name, dim, _ in self.plates:
            if name == plate:
                return len(self.shape) - self.event_dim + dim
        return None

    @property
    def numel(self) -> int:
        """Number of scalar nodes (coordinates) of the site."""
        n = 1
        for s in self.node_shape:
            n *= int(s)
        return n

    @property
    def nodes(self) -> list[str]:
        """Node labels of the site in row-major order."""
        return [
            node_label(self.name, idx, self.node_shape)
            for idx in itertools.product(*(range(int(s)) for s in self.node_shape))
        ]

    @property
    def indices(self) -> list[tuple]:
        """Row-major indices of the site's nodes."""
        return list(itertools.product(*(range(int(s)) for s in self.node_shape)))


class BayesNet:
    """A directed acyclic graph over the scalar coordinates of a model's sample sites.

    An edge ``u -> v`` means the conditional density of ``v`` depends on ``u``. Each node
    has attributes ``site`` (str), ``index`` (tuple) and ``observed`` (bool).

    Args:
        graph: the scalar DAG, nodes labelled as :func:`node_label` does.
        sites: the site table, in trace order.

    Example:
        >>> bn = BayesNet.from_edges([("z", "x")], observed=["x"])
        >>> bn.latent_nodes, bn.observed_nodes
        (['z'], ['x'])
        >>> bn.adjacency(["x"], ["z"])
        tensor([[True]])
    """

    def __init__(self, graph: nx.DiGraph, sites: Sequence[SiteInfo]):
        if not nx.is_directed_acyclic_graph(graph):
            cycle = nx.find_cycle(graph)
            raise ValueError(f"BayesNet must be acyclic; found the cycle {cycle}")
        self.graph = graph
        self.sites: dict[str, SiteInfo] = {s.name: s for s in sites}
        # offsets: flat latent vector and flat observed vector, each in trace order
        lat_off = obs_off = 0
        for s in self.sites.values():
            if s.observed:
                s.offset, obs_off = obs_off, obs_off + s.numel
            else:
                s.offset, lat_off = lat_off, lat_off + s.numel
        self.latent_nodes: list[str] = [n for s in self.sites.values() if not s.observed for n in s.nodes]
        self.observed_nodes: list[str] = [n for s in self.sites.values() if s.observed for n in s.nodes]
        missing = set(graph.nodes) ^ set(self.latent_nodes + self.observed_nodes)
        if missing:
            raise ValueError(f"graph nodes and site table disagree on {sorted(missing)[:5]}")
        self._trace_position = {n: i for i, n in enumerate(self.nodes)}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        observed: Iterable[str] = (),
        nodes: Iterable[str] | None = None,
    ) -> "BayesNet":
        """A BayesNet of scalar sites from an edge list (for tests and hand-built networks).

        Args:
            edges: ``(parent, child)`` pairs.
            observed: names of observed nodes.
            nodes: all nodes in trace order (default: order of first appearance in
                ``edges``, then topologically sorted with that order breaking ties).
        """
        edges = list(edges)
        g = nx.DiGraph()
        if nodes is not None:
            g.add_nodes_from(nodes)
        g.add_edges_from(edges)
        if nodes is None:
            first = {n: i for i, n in enumerate(dict.fromkeys(n for e in edges for n in e))}
            order = list(nx.lexicographical_topological_sort(g, key=lambda n: first[n]))
        else:
            order = list(nodes)
        observed = set(observed)
        unknown = observed - set(order)
        if unknown:
            raise ValueError(f"observed nodes {sorted(unknown)} are not in the graph")
        sites = [SiteInfo(n, (), constraints.real, n in observed) for n in order]
        h = nx.DiGraph()
        for n in order:
            h.add_node(n, site=n, index=(), observed=n in observed)
        h.add_edges_from(g.edges)
        return cls(h, sites)

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph, observed: Iterable[str] = ()) -> "BayesNet":
        """A BayesNet of scalar sites from a ``networkx.DiGraph`` (nodes in the graph's order)."""
        return cls.from_edges(graph.edges, observed=observed, nodes=list(graph.nodes))

    # --------------------------------------------------------------------- queries
    @property
    def nodes(self) -> list[str]:
        """All nodes, site by site in trace order, row-major within a site."""
        return [n for s in self.sites.values() for n in s.nodes]

    @property
    def latent_sites(self) -> list[str]:
        return [s.name for s in self.sites.values() if not s.observed]

    @property
    def observed_sites(self) -> list[str]:
        return [s.name for s in self.sites.values() if s.observed]

    @property
    def num_edges(self) -> int:
        return self.graph.number_of_edges()

    def is_observed(self, node: str) -> bool:
        return bool(self.graph.nodes[node]["observed"])

    def trace_position(self, node: str) -> int:
        """Position of ``node`` in :attr:`nodes` (used to break ties deterministically)."""
        return self._trace_position[node]

    def parents(self, node: str) -> list[str]:
        """Parents of ``node`` in trace order."""
        return sorted(self.graph.predecessors(node), key=self._trace_position.__getitem__)

    def children(self, node: str) -> list[str]:
        """Children of ``node`` in trace order."""
        return sorted(self.graph.successors(node), key=self._trace_position.__getitem__)

    def topological_order(self) -> list[str]:
        """A topological order of all nodes; ties broken by trace order."""
        return list(nx.lexicographical_topological_sort(self.graph, key=self._trace_position.__getitem__))

    def adjacency(self, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None) -> torch.Tensor:
        """Bool tensor ``A`` of shape ``(len(rows), len(cols))`` with ``A[i, j]`` iff ``cols[j] -> rows[i]``.

        Rows are children, columns parents (the orientation of ``nn.Linear.weight``).
        Defaults: all nodes in trace order for both.
        """
        rows = self.nodes if rows is None else list(rows)
        cols = self.nodes if cols is None else list(cols)
        col_pos = {n: j for j, n in enumerate(cols)}
        A = torch.zeros(len(rows), len(cols), dtype=torch.bool)
        for i, r in enumerate(rows):
            for p in self.graph.predecessors(r):
                j = col_pos.get(p)
                if j is not None:
                    A[i, j] = True
        return A

    def site_graph(self) -> nx.DiGraph:
        """The site-level DAG: an edge ``a -> b`` when any node of ``a`` is a parent of one of ``b``."""
        g = nx.DiGraph()
        for s in self.sites.values():
            g.add_node(s.name, observed=s.observed, shape=s.shape)
        for u, v in self.graph.edges:
            su, sv = self.graph.nodes[u]["site"], self.graph.nodes[v]["site"]
            if su != sv:
                g.add_edge(su, sv)
        return g

    def to_dict(self) -> dict:
        """JSON-serialisable description: sites, nodes and edges."""
        return {
            "sites": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "node_shape": list(s.node_shape),
                    "support": str(s.support),
                    "observed": s.observed,
                    "block": s.block,
                    "offset": s.offset,
                    "plates": [list(p) for p in s.plates],
                    **({"covariate": True} if s.covariate else {}),
                }
                for s in self.sites.values()
            ],
            "nodes": self.nodes,
            "edges": [list(e) for e in sorted(self.graph.edges, key=lambda e: (self._trace_position[e[1]], self._trace_position[e[0]]))],
        }

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __repr__(self) -> str:
        lines = [
            f"BayesNet({len(self.latent_nodes)} latent and {len(self.observed_nodes)} observed nodes, "
            f"{self.num_edges} edges, {len(self.sites)} sites)"
        ]
        for s in self.sites.values():
            kind = "observed" if s.observed else "latent"
            extra = ", block" if s.block else ""
            lines.append(f"  {s.name:<16} {kind:<8} shape={tuple(s.shape)} nodes={s.numel} support={s.support}{extra}")
        return "\n".join(lines)
