"""BN-structured decoders: a Bayesian network's conditionals as masked networks, a PyroModule for VAE models.

:class:`StructuredDecoder` is the generative half of a structured VAE (SIReN-VAE, Mouton & Kroon):
every node of a DAG ``G`` is one scalar Pyro sample site whose Gaussian conditional's mean and
scale are outputs of one :class:`~pyro_struct.nn.StrNN` masked by ``G`` (node ``i``'s outputs see
exactly its parents in ``G``), so tracing the model recovers ``G`` and the compiled guide gets
``G``'s faithful inverse.

Example:
    >>> import networkx as nx, pyro, torch
    >>> g = nx.DiGraph([("z1", "z2"), ("z1", "x1"), ("z2", "x2")])
    >>> decoder = StructuredDecoder(g, latent=["z1", "z2"], observed=["x1", "x2"])
    >>> def model(x1=None, x2=None, N=10):
    ...     with pyro.plate("data", N if x1 is None else x1.shape[0]):
    ...         return decoder({"x1": x1, "x2": x2})
    >>> sorted(model(N=3))
    ['x1', 'x2', 'z1', 'z2']
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import networkx as nx
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from .nn import StrNN

__all__ = ["StructuredDecoder", "LATENT_PRIORS"]

#: ``"structured"``: each latent's conditional is learned from its parents in ``G``;
#: ``"standard"``: latents are independent ``N(0, 1)`` (a vanilla VAE prior; ``G``'s latent edges dropped)
LATENT_PRIORS = ("structured", "standard")

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) = 1: scales start at 1


def _graph(graph, nodes: Sequence[str] | None) -> nx.DiGraph:
    """A DAG from a ``networkx.DiGraph`` or a bool adjacency ``(n, n)`` (``A[i, j]``: ``i`` depends on ``j``) with ``nodes``."""
    if isinstance(graph, nx.DiGraph):
        g = nx.DiGraph(graph)
    else:
        A = torch.as_tensor(graph).bool()
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"graph: an adjacency must be a square (n, n) bool tensor; got shape {tuple(A.shape)}")
        if nodes is None or len(nodes) != A.shape[0]:
            raise ValueError(f"graph: an adjacency needs nodes=[...] naming its {A.shape[0]} rows")
        g = nx.DiGraph()
        g.add_nodes_from(nodes)
        g.add_edges_from((nodes[j], nodes[i]) for i, j in A.nonzero().tolist())
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("graph: the decoder's graph must be a DAG (it has a cycle)")
    return g


class StructuredDecoder(PyroModule):
    """A learned Bayesian network with Gaussian conditionals, one Pyro site per node.

    Node ``v`` is sampled as ``pyro.sample(v, Normal(mu_v(pa_G(v)), sigma_v(pa_G(v))))`` in
    topological order, where ``(mu, log sigma)`` of every node are the two outputs per node of a
    single :class:`~pyro_struct.nn.StrNN` over all nodes with adjacency ``G`` (plus a masked linear
    skip into the means, so a linear-Gaussian network is representable exactly). Calling it
    inside a data plate gives one data point per member; the parameters are ordinary module
    parameters (a ``PyroModule``), trained by ``SVI`` or ``fit(objective="elbo", data=...)``.

    Relation to SIReN-VAE's decoder (Mouton & Kroon): their likelihood ``p(x | z)`` is a fully
    factored Gaussian whose mean and log-sd come from a DecoderNN masked so that ``x_i`` sees
    only ``pa_G(x_i)`` -- the observed rows here are exactly that. Their prior ``p(z)`` is a
    *graphical residual flow* ``GRF_n`` (four masked, spectrally normalised residual blocks over
    the latents, density by the exact triangular log-determinant, sampling by fixed-point
    inversion). Here the prior is one masked Gaussian conditional per latent node: an affine
    structured autoregressive prior, i.e. one StrAF layer in the generative direction, with the
    same conditional independencies as ``G`` and an exact density, sampled in one pass per node
    without an iterative inverse, but less flexible than a stack of residual
    blocks (each conditional is Gaussian). Because every node is its own site, the tracer sees
    ``G`` exactly and the encoder compiled by ``StructuredGuide`` is ``G``'s faithful inverse.

    Args:
        graph: a ``networkx.DiGraph`` or a bool adjacency ``(n, n)`` (``A[i, j]``: node ``i``
            depends on node ``j``) with ``nodes``.
        latent, observed: the node names of each kind (together every node, once).
        nodes: node names of an adjacency's rows (ignored for a DiGraph).
        hidden_sizes: the StrNN's hidden widths (widened where too narrow for an exact mask).
        latent_prior: one of :data:`LATENT_PRIORS`.
        min_scale: a floor added to every conditional's sd.
        activation: the StrNN's activation. Smooth by default: the tracer reads ``G`` from
            gradients at prior draws, and a ReLU unit that is off at every draw would hide an edge.

    Call: ``decoder(observations=None)`` with ``observations`` node -> value (``None`` entries
    and missing nodes are sampled); returns node -> value. Values are scalar per data point:
    shape ``(*plates)``.

    Attributes:
        order: nodes in sampling (topological) order.
    """

    def __init__(self, graph, latent: Sequence[str], observed: Sequence[str], *, nodes: Sequence[str] | None = None,
                 hidden_sizes: Sequence[int] = (32,), latent_prior: str = "structured", min_scale: float = 1e-3,
                 activation: str = "tanh"):
        super().__init__()
        g = _graph(graph, nodes)
        latent, observed = list(latent), list(observed)
        both = set(latent) & set(observed)
        if both:
            raise ValueError(f"node {sorted(both)[0]!r} is both latent and observed")
        if set(latent) | set(observed) != set(g.nodes):
            missing = sorted(set(g.nodes) - set(latent) - set(observed)) or sorted(set(latent) | set(observed) - set(g.nodes))
            raise ValueError(f"latent + observed must be the graph's nodes, each once; node {missing[0]!r} is not")
        if latent_prior not in LATENT_PRIORS:
            raise ValueError(f"latent_prior must be one of {LATENT_PRIORS}; got {latent_prior!r}")
        position = {v: i for i, v in enumerate(g.nodes)}
        self.order = list(nx.lexicographical_topological_sort(g, key=position.__getitem__))
        index = {v: i for i, v in enumerate(self.order)}
        self.latent, self.observed = [v for v in self.order if v in set(latent)], [v for v in self.order if v in set(observed)]
        self.latent_prior = latent_prior
        self.min_scale = float(min_scale)
        A = torch.zeros(len(self.order), len(self.order), dtype=torch.bool)
        for u, v in g.edges:
            if latent_prior == "structured" or v in set(observed):
                A[index[v], index[u]] = True
        self.net = StrNN(A, hidden_sizes=hidden_sizes, num_params=2, skip=(0,), activation=activation)
        self._index = index
        self._parents = {v: sorted((u for u in g.predecessors(v) if A[index[v], index[u]]), key=index.__getitem__) for v in self.order}
        self._parent_index = {v: torch.tensor([index[u] for u in ps], dtype=torch.long) for v, ps in self._parents.items()}
        self._rows = {v: torch.tensor([index[v]]) for v in self.order}

    @property
    def adjacency(self) -> torch.Tensor:
        """The mask ``(n, n)`` in :attr:`order` (``A[i, j]``: node ``i``'s conditional sees node ``j``)."""
        return self.net.adjacency

    def _conditional(self, net: StrNN, v: str, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sd ``(*batch)`` of node ``v`` given its parents' values.

        Only ``v``'s outputs are computed (``StrNN(..., rows=)``: the units with a path to them),
        from an input holding only ``v``'s parents (zeros elsewhere). The mask alone would ignore
        the others, but Pyro's provenance tracking reads dependencies from which values enter a
        tensor: a stack of every value so far would tell the tracer that each site depends on
        all earlier ones.
        """
        names = self._parents[v]
        if names:
            parents = torch.broadcast_tensors(*[torch.as_tensor(values[u]) for u in names])
            batch = parents[0].shape
            stacked = torch.stack([t.reshape(-1) for t in parents])  # feature-major (k, M)
        else:
            batch, stacked = torch.Size(), torch.zeros(0, 1, dtype=torch.get_default_dtype())
        inp = stacked.new_zeros(len(self.order), stacked.shape[1]).index_copy(0, self._parent_index[v], stacked)
        out = net(inp, rows=self._rows[v])[0]  # (2, M)
        return out[0].reshape(batch), (torch.nn.functional.softplus(out[1] + _SOFTPLUS_ONE) + self.min_scale).reshape(batch)

    def forward(self, observations: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        observations = dict(observations or {})
        unknown = [k for k in observations if k not in self._index]
        if unknown:
            raise ValueError(f"observations: {unknown[0]!r} is not a node of the decoder's graph")
        latent = set(self.latent)
        given = [k for k in self.latent if observations.get(k) is not None]
        if given:
            raise ValueError(f"observations: {given[0]!r} is a latent node; only observed nodes take values (condition latents with poutine.condition)")
        values: dict[str, torch.Tensor] = {}
        net = self.net  # one PyroModule attribute lookup (each registers the parameters with Pyro again)
        for v in self.order:
            if self.latent_prior == "standard" and v in latent:
                fn = dist.Normal(torch.zeros(()), torch.ones(()))
            else:
                fn = dist.Normal(*self._conditional(net, v, values))
            values[v] = pyro.sample(v, fn, obs=None if v in latent else observations.get(v))
        return values

    def extra_repr(self) -> str:
        return (f"latent={len(self.latent)}, observed={len(self.observed)}, edges={int(self.adjacency.sum())}, "
                f"latent_prior={self.latent_prior!r}")
