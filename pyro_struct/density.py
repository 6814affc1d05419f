"""Density estimation and causal queries with structured flows on data: DensityFlow and CausalFlow.

A :class:`DensityFlow` fits a structured autoregressive flow (:class:`~pyro_struct.flows.StrAF`)
whose conditioners follow a DAG over the data columns (given, dense in a causal order, or learned
with :func:`~pyro_struct.learn_structure`). A :class:`CausalFlow` reads the fitted flow as a
structural causal model, one invertible mechanism per node (the StrNN paper's causal StrAF; with a
dense adjacency in a causal order it is CAREFL), and answers interventional and counterfactual
queries.

Example:
    >>> import networkx as nx, torch
    >>> g = nx.DiGraph([("a", "b")])
    >>> a = torch.randn(500); b = 2 * a + 0.5 * torch.randn(500)
    >>> cf = CausalFlow(g).fit({"a": a, "b": b}, num_steps=500, progress=False)
    >>> round(float(cf.intervene({"a": 1.0}).sample(4000)["b"].mean()))
    2
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import networkx as nx
import torch

__all__ = ["DensityFlow", "CausalFlow", "Intervention", "parse_graph", "topological_permutation"]

_FORMAT = "pyro_struct.DensityFlow/1"


def parse_graph(graph, names: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Node names and a ``(d, d)`` bool adjacency (``A[i, j]``: node ``i`` depends on node ``j``).

    Args:
        graph: a ``networkx.DiGraph`` (edges parent -> child; node order kept), or a ``(d, d)``
            adjacency (bool or 0/1 tensor or nested list) in our orientation.
        names: node names for an adjacency (default ``x0 .. x{d-1}``); not allowed with a graph.

    Raises:
        ValueError: a cycle (named), a non-square adjacency, self-loops, or names of the wrong length.
    """
    if isinstance(graph, nx.DiGraph):
        if names is not None:
            raise ValueError("names= is only for an adjacency; a networkx graph names its nodes itself")
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        A = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
        for parent, child in graph.edges:
            A[pos[child], pos[parent]] = True
        names = [str(n) for n in nodes]
    else:
        A = torch.as_tensor(graph)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"the adjacency must be a square (d, d) matrix; got shape {tuple(A.shape)}")
        A = A.bool()
        names = [f"x{i}" for i in range(A.shape[0])] if names is None else [str(n) for n in names]
        if len(names) != A.shape[0]:
            raise ValueError(f"names has {len(names)} entries but the adjacency has {A.shape[0]} nodes")
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be distinct; got {names}")
    if A.shape[0] == 0:
        raise ValueError("the graph has no nodes")
    if torch.diagonal(A).any():
        i = int(torch.nonzero(torch.diagonal(A))[0])
        raise ValueError(f"node {names[i]!r} depends on itself (a self-loop); a DAG has none")
    g = nx.DiGraph()
    g.add_nodes_from(names)
    g.add_edges_from((names[j], names[i]) for i, j in torch.nonzero(A).tolist())
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join([u for u, _ in nx.find_cycle(g)] + [nx.find_cycle(g)[0][0]])
        raise ValueError(f"the graph must be acyclic; it has the cycle {cycle}")
    return names, A


def topological_permutation(A: torch.Tensor) -> list[int]:
    """A topological order of the nodes of ``A`` (``(d, d)``, ``A[i, j]``: i depends on j), ties by index."""
    g = nx.DiGraph()
    g.add_nodes_from(range(A.shape[0]))
    g.add_edges_from((j, i) for i, j in torch.nonzero(A).tolist())
    return list(nx.lexicographical_topological_sort(g))


class DensityFlow:
    """A normalizing flow density over data columns whose conditioners follow a DAG.

    Args:
        graph_or_adjacency: a ``networkx.DiGraph`` over the columns (edges parent -> child), a
            ``(d, d)`` bool adjacency (``A[i, j]``: column ``i`` depends on column ``j``), or
            ``"learn"``: the DAG is learned from the data by :func:`~pyro_struct.learn_structure`
            at the first :meth:`fit` (then ``structure_options`` go to it).
        flow: ``"straf"`` (the flow follows the DAG) or ``"dense"`` (fully autoregressive in a
            topological order of the DAG: the causal order only, as in CAREFL).
        names: column names for an adjacency (default ``x0 ..``; dict data fixes them for ``"learn"``).
        structure_options: keyword arguments of :func:`~pyro_struct.learn_structure` (``"learn"`` only).
        **options: :class:`~pyro_struct.flows.StrAF` options (``num_layers`` (2), ``hidden_sizes``
            ((32, 32)), ``normalizer`` (``"affine"``, ``"spline"`` or ``"umnn"``), ...).

    Data are a tensor ``(n, d)`` (columns in ``names`` order) or a dict ``name -> (n,)``. The
    flow is trained on standardised columns; :meth:`log_prob` and :meth:`sample` are in data units.

    Attributes:
        names: the column names; adjacency: ``(d, d)`` bool, in ``names`` order.
        order: column indices in the flow's (topological) sampling order.
        flow: the :class:`~pyro_struct.flows.StrAF` over the standardised columns in ``order``.
        loc, scale: ``(d,)`` standardisation; history: losses of every fit (``fit_result``: the last).
    """

    default_options = {"num_layers": 2, "hidden_sizes": (32, 32), "normalizer": "affine"}

    def __init__(self, graph_or_adjacency="learn", flow: str = "straf", *, names: Sequence[str] | None = None,
                 structure_options: Mapping | None = None, **options):
        if flow not in ("straf", "dense"):
            raise ValueError(f"flow must be 'straf' or 'dense'; got {flow!r}")
        self.flow_kind = flow
        self.options = {**self.default_options, **options}
        self.structure_options = dict(structure_options or {})
        self.learned = isinstance(graph_or_adjacency, str)
        if self.learned and graph_or_adjacency != "learn":
            raise ValueError(f"graph_or_adjacency must be a DiGraph, an adjacency or 'learn'; got {graph_or_adjacency!r}")
        if self.structure_options and not self.learned:
            raise ValueError("structure_options are for graph_or_adjacency='learn' only")
        self.names = None if names is None else [str(n) for n in names]
        self.adjacency = None
        self.flow = None
        self.loc = self.scale = None
        self.history: list[float] = []
        self.fit_result = None
        self._dict_data = isinstance(graph_or_adjacency, nx.DiGraph)
        if not self.learned:
            self._set_structure(*parse_graph(graph_or_adjacency, names))

    # ------------------------------------------------------------------ structure
    def _set_structure(self, names: list[str], A: torch.Tensor) -> None:
        from .flows import StrAF

        self.names, self.adjacency = names, A.clone()
        self.order = topological_permutation(A)
        perm = torch.tensor(self.order)
        flow_A = A[perm][:, perm]
        if self.flow_kind == "dense":
            flow_A = torch.tril(torch.ones_like(flow_A), -1)
        self.flow = StrAF(flow_A, context_dim=0, **self.options)

    @property
    def dim(self) -> int:
        """Number of columns ``d``."""
        if self.names is None:
            raise RuntimeError("the structure is learned at the first fit; call fit(data) first")
        return len(self.names)

    def _fitted(self) -> None:
        if self.loc is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit(data) first")

    # ----------------------------------------------------------------------- data
    def _matrix(self, data, what: str = "data") -> torch.Tensor:
        """Data as a float tensor ``(n, d)`` in ``names`` order, checked."""
        dtype = torch.get_default_dtype()
        if isinstance(data, Mapping):
            missing = [n for n in self.names if n not in data]
            if missing:
                raise ValueError(
                    f"{what} has no column for graph node {missing[0]!r}"
                    + (f" (nor for {missing[1:]})" if len(missing) > 1 else "")
                    + f"; give a (n,) tensor for each of {self.names}"
                )
            cols = [torch.as_tensor(data[n], dtype=dtype).reshape(-1) for n in self.names]
            sizes = {c.shape[0] for c in cols}
            if len(sizes) != 1:
                raise ValueError(f"the columns of {what} have different lengths {sorted(sizes)}")
            X = torch.stack(cols, -1)
        else:
            X = torch.as_tensor(data, dtype=dtype)
            if X.dim() != 2 or X.shape[1] != len(self.names):
                raise ValueError(f"{what} must be a tensor of shape (n, {len(self.names)}) or a dict of columns; "
                                 f"got shape {tuple(X.shape)}")
        bad = ~torch.isfinite(X).all(-1)
        if bad.any():
            raise ValueError(f"{what} has {int(bad.sum())} row(s) with NaN or infinite values "
                             f"(first: row {int(torch.nonzero(bad)[0])}); drop or impute them first")
        return X

    def _columns(self, X: torch.Tensor, as_dict: bool | None):
        if as_dict if as_dict is not None else self._dict_data:
            return {n: X[..., i] for i, n in enumerate(self.names)}
        return X

    def _to_flow(self, X: torch.Tensor) -> torch.Tensor:
        """Data ``(*, d)`` -> standardised latents in sampling order."""
        return ((X - self.loc) / self.scale)[..., self.order]

    def _from_flow(self, z: torch.Tensor) -> torch.Tensor:
        X = torch.empty_like(z)
        X[..., self.order] = z
        return X * self.scale + self.loc

    # ------------------------------------------------------------------------ fit
    def fit(self, data, num_steps: int = 2000, batch_size: int = 256, validation: float = 0.1, progress: bool = True,
            lr: float = 5e-3, time_budget: float | None = None, weight_decay: float = 0.0, seed: int | None = None,
            **train_options):
        """Maximum likelihood on ``data`` with the shared training loop (:func:`pyro_struct.training.train`).

        Args:
            data: ``(n, d)`` tensor or dict ``name -> (n,)``.
            num_steps: optimisation steps; batch_size: rows per step.
            validation: share of the (shuffled) rows held out for early stopping (0: none).
            progress: a progress bar; lr: Adam's learning rate; time_budget: seconds (optional).
            seed: seeds the row shuffle and torch first.
            **train_options: more :func:`~pyro_struct.training.train` options (``lr_schedule``, ...).

        Returns:
            ``self`` (the training result is :attr:`fit_result`, its losses appended to :attr:`history`).
        """
        from .training import train
        from .training.batches import PoolSource, TensorPool

        if not 0 <= validation < 1:
            raise ValueError(f"validation must be a share of the rows in [0, 1); got {validation!r}")
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int; got {num_steps!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if seed is not None:
            torch.manual_seed(seed)
        X = self._prepare(data)
        if self.loc is None:
            self.loc = X.mean(0)
            self.scale = X.std(0).clamp(min=1e-8 * (1 + self.loc.abs()))
        if self.flow is None:
            from .structure_learning import learn_structure

            A = learn_structure((X - self.loc) / self.scale, **self.structure_options)
            self._set_structure(self.names, A)
        Z = self._to_flow(X)[torch.randperm(X.shape[0])]
        source = PoolSource(TensorPool(Z), batch_size, validation)
        flow = self.flow
        self.fit_result = train(flow, lambda batch: -flow.log_prob(batch.data).mean(), source, num_steps=num_steps, lr=lr,
                                time_budget=time_budget, progress=progress, desc=f"{type(self).__name__}.fit",
                                weight_decay=weight_decay, **train_options)
        self.history.extend(float(v) for v in self.fit_result)
        return self

    def _prepare(self, data) -> torch.Tensor:
        if self.names is None:  # "learn": the data name the columns
            if isinstance(data, Mapping):
                self.names, self._dict_data = [str(k) for k in data], True
            else:
                X = torch.as_tensor(data)
                if X.dim() != 2:
                    raise ValueError(f"data must be a tensor of shape (n, d) or a dict of columns; got shape {tuple(X.shape)}")
                self.names = [f"x{i}" for i in range(X.shape[1])]
        elif isinstance(data, Mapping) and self.loc is None:
            self._dict_data = True
        X = self._matrix(data)
        if X.shape[0] < 2:
            raise ValueError(f"data needs at least 2 rows to standardise; got {X.shape[0]}")
        return X

    # ------------------------------------------------------------------- density
    def log_prob(self, data) -> torch.Tensor:
        """``log p(x)`` in data units, ``(n,)``, for data ``(n, d)`` or a dict of ``(n,)`` columns."""
        self._fitted()
        X = self._matrix(data)
        return self.flow.log_prob(self._to_flow(X)) - torch.log(self.scale).sum()

    @torch.no_grad()
    def sample(self, n: int, as_dict: bool | None = None):
        """``n`` samples: a dict ``name -> (n,)`` (default when fitted on dict data) or a tensor ``(n, d)``."""
        self._fitted()
        return self._columns(self._from_flow(self.flow.sample(n=int(n))), as_dict)

    # ---------------------------------------------------------------- save / load
    def state_payload(self) -> dict:
        """Everything :meth:`load` needs, as a dict of tensors and plain values."""
        self._fitted()
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        return {
            "format": _FORMAT, "class": type(self).__name__, "names": list(self.names),
            "adjacency": self.adjacency.clone(), "flow_kind": self.flow_kind, "options": options,
            "learned": self.learned, "dict_data": self._dict_data, "loc": self.loc, "scale": self.scale,
            "flow": self.flow.state_dict(), "history": list(self.history),
        }

    def save(self, path) -> None:
        """Write the fitted flow (structure, options, standardisation, parameters) to ``path`` atomically."""
        from .io import atomic_save

        atomic_save(self.state_payload(), path)

    @classmethod
    def load(cls, path) -> "DensityFlow":
        """Read a flow written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled)."""
        from .io import read_payload

        payload = read_payload(path, format=_FORMAT, what="DensityFlow")
        kind = _CLASSES.get(payload["class"], DensityFlow)
        if not issubclass(kind, cls):
            raise ValueError(f"{path} holds a {payload['class']}, not a {cls.__name__}")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["options"].items()}
        self = kind.__new__(kind)
        DensityFlow.__init__(self, payload["adjacency"], payload["flow_kind"], names=payload["names"], **options)
        self.learned, self._dict_data = payload["learned"], payload["dict_data"]
        self.loc, self.scale = payload["loc"], payload["scale"]
        self.flow.load_state_dict(payload["flow"])
        self.history = list(payload["history"])
        return self

    def __repr__(self) -> str:
        edges = None if self.adjacency is None else int(self.adjacency.sum())
        return (f"{type(self).__name__}(d={None if self.names is None else len(self.names)}, edges={edges}, "
                f"flow={self.flow_kind!r}, normalizer={self.options.get('normalizer')!r}, fitted={self.loc is not None})")


class CausalFlow(DensityFlow):
    """A :class:`DensityFlow` over a causal DAG read as a structural causal model.

    Each node ``x_i = f_i(x_ancestors, u_i)`` with ``f_i`` strictly increasing in its own noise
    ``u_i ~ N(0, 1)`` (the flow's inverse gives ``u`` from ``x`` exactly). Queries:
    :meth:`intervene` (``do(x_j = a)``: upstream nodes keep their distribution, downstream
    mechanisms are recomputed from fresh noise), :meth:`counterfactual` (abduction of ``u`` by the
    exact inverse, action, prediction) and :meth:`ate`.

    What is identifiable: with the true DAG and causal sufficiency (no hidden confounders), the
    interventional distributions are identified from observational data (truncated factorisation),
    so they are consistent as the flow's conditionals converge. Counterfactuals need more: they are
    identified when every true mechanism is strictly monotonic in a scalar noise (e.g. additive
    noise), which is the class the affine and monotonic (``"umnn"``, ``"spline"``) normalisers
    represent; for other mechanisms they are not identified from data at all. ``flow="dense"`` uses
    the causal order only (CAREFL): non-descendants placed later in the order may then depend on
    the intervened node through fitting error.

    Args:
        graph: a ``networkx.DiGraph`` with named nodes, or a ``(d, d)`` adjacency with ``names``.
        flow: ``"straf"`` (default) or ``"dense"``.
        names: node names for an adjacency.
        **options: StrAF options; ``normalizer`` is ``"affine"`` (default), ``"umnn"`` or ``"spline"``.
    """

    def __init__(self, graph, flow: str = "straf", *, names: Sequence[str] | None = None, **options):
        if isinstance(graph, str):
            raise ValueError("CausalFlow needs the causal DAG (a DiGraph or an adjacency); learn one first with "
                             "ps.learn_structure(data) if you must, and state that assumption")
        if options.get("normalizer", "affine") not in ("affine", "umnn", "spline"):
            raise ValueError(f"normalizer must be 'affine', 'umnn' or 'spline'; got {options['normalizer']!r}")
        super().__init__(graph, flow, names=names, **options)
        self._dict_data = True

    @classmethod
    def from_model(cls, model, *args, flow: str = "straf", **options) -> "CausalFlow":
        """The causal flow over the scalar nodes of a Pyro model's traced DAG (:func:`~pyro_struct.trace_model`).

        Every sample site (observed ones included) is a node named by its node label
        (``"x"``, ``"z[2]"``). ``*args`` go to ``trace_model``; the flow's mechanisms are then fitted to
        data with :meth:`fit` (a dict of node label -> ``(n,)``).
        """
        from .trace import trace_model

        bn = trace_model(model, *args)
        nodes = bn.nodes
        return cls(bn.adjacency(nodes, nodes), flow, names=nodes, **options)

    # -------------------------------------------------------------- the queries
    def _positions(self, interventions: Mapping, n: int) -> dict[int, torch.Tensor]:
        """``{flow position: standardised value (n,)}`` for ``{name: value}`` (scalar or ``(n,)``)."""
        self._fitted()
        if not isinstance(interventions, Mapping) or not interventions:
            raise ValueError("interventions must be a non-empty dict {node name: value}")
        where = {name: self.order.index(i) for i, name in enumerate(self.names)}
        out = {}
        for name, value in interventions.items():
            if name not in where:
                raise ValueError(f"cannot intervene on unknown node {name!r}; the graph's nodes are {self.names}")
            i = self.names.index(name)
            v = torch.as_tensor(value, dtype=self.loc.dtype).reshape(-1)
            if v.shape[0] not in (1, n):
                raise ValueError(f"the value for {name!r} must be a scalar or have shape ({n},); got {tuple(v.shape)}")
            out[where[name]] = ((v - self.loc[i]) / self.scale[i]).expand(n)
        return out

    def _clamped(self, u: torch.Tensor, clamp: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Latents from noise ``u`` ``(n, d)`` with the coordinates in ``clamp`` held at their values.

        The flow is triangular in its order: ``z_{<k}`` depends on ``u_{<k}`` only. So for the
        clamped positions in order, replacing ``u_k`` by the noise that maps to the clamped value
        given the (already final) ``z_{<k}`` clamps ``z_k`` and recomputes everything after it.
        """
        z, _ = self.flow(u)
        for k in sorted(clamp):
            z = z.clone()
            z[:, k] = clamp[k]
            u = u.clone()
            u[:, k] = self.flow.inverse(z)[0][:, k]
            z, _ = self.flow(u)
        for k, v in clamp.items():  # exact values (the inverse round trip is exact only up to round-off)
            z[:, k] = v
        return z

    def intervene(self, interventions: Mapping) -> "Intervention":
        """The interventional distribution ``p(x | do(x_j = a, ...))``.

        Args:
            interventions: ``{node name: value}`` (a float or a ``(n,)`` tensor per sample).

        Returns:
            an :class:`Intervention` with ``sample(n) -> dict name -> (n,)`` and ``mean(n)``.
        """
        self._positions(interventions, 1)  # check the names now
        return Intervention(self, dict(interventions))

    @torch.no_grad()
    def counterfactual(self, factual, interventions: Mapping):
        """Counterfactual columns: what the factual rows would have been under ``do(interventions)``.

        Abduction: the noise ``u = T^{-1}(x)`` of each factual row (exact inverse of the flow);
        action: the intervened nodes set; prediction: the mechanisms rerun on the same noise.

        Args:
            factual: dict ``name -> (n,)`` (every node) or an ``(n, d)`` tensor.
            interventions: ``{node name: value}`` (float or ``(n,)``).

        Returns:
            dict ``name -> (n,)`` (non-descendants of the intervened nodes equal the factual values).
        """
        self._fitted()
        X = self._matrix(factual, "factual")
        u, _ = self.flow.inverse(self._to_flow(X))
        z = self._clamped(u, self._positions(interventions, X.shape[0]))
        return self._columns(self._from_flow(z), True)

    @torch.no_grad()
    def ate(self, treatment: str, values: Sequence[float], outcome: str, num_samples: int = 10000) -> torch.Tensor:
        """Average treatment effect ``E[outcome | do(treatment=b)] - E[outcome | do(treatment=a)]``.

        Args:
            treatment, outcome: node names; values: ``(a, b)`` (control, treated).
            num_samples: Monte Carlo samples (both arms share their noise, which cancels most of
                the Monte Carlo error of the difference).

        Returns:
            a scalar tensor in the outcome's units.
        """
        if len(values) != 2:
            raise ValueError(f"values must be a pair (control, treated); got {values!r}")
        if outcome not in self.names:
            raise ValueError(f"unknown outcome node {outcome!r}; the graph's nodes are {self.names}")
        n = int(num_samples)
        u = torch.randn(n, self.dim, dtype=self.loc.dtype)
        arms = [self._from_flow(self._clamped(u, self._positions({treatment: v}, n))) for v in values]
        j = self.names.index(outcome)
        return (arms[1][:, j] - arms[0][:, j]).mean()


class Intervention:
    """``p(x | do(...))`` of a fitted :class:`CausalFlow` (from :meth:`CausalFlow.intervene`)."""

    def __init__(self, causal_flow: CausalFlow, interventions: dict):
        self.causal_flow = causal_flow
        self.interventions = interventions

    @torch.no_grad()
    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` samples: dict ``name -> (n,)`` (intervened nodes at their values)."""
        cf = self.causal_flow
        u = torch.randn(int(n), cf.dim, dtype=cf.loc.dtype)
        z = cf._clamped(u, cf._positions(self.interventions, int(n)))
        return cf._columns(cf._from_flow(z), True)

    def mean(self, num_samples: int = 10000) -> dict[str, torch.Tensor]:
        """Monte Carlo interventional means: dict ``name -> scalar``."""
        return {k: v.mean() for k, v in self.sample(num_samples).items()}

    def __repr__(self) -> str:
        return f"Intervention(do({', '.join(f'{k}={v}' for k, v in self.interventions.items())}))"


_CLASSES = {"DensityFlow": DensityFlow, "CausalFlow": CausalFlow}
