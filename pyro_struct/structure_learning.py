"""Learning a DAG from data: a graphical normalizing flow with a NOTEARS acyclicity constraint.

Reference: Wehenkel & Louppe (2021), Graphical Normalizing Flows (Wehenkel's thesis, chapter 6);
Zheng et al. (2018, 2020), DAGs with NO TEARS (the acyclicity function and its nonparametric form).

Each column ``x_i`` gets a conditioner ``h_i`` (a small MLP) fed every other column; the
continuous relaxation of the adjacency is ``A_ij``, the sum over all paths from input ``j`` to
``h_i``'s outputs of the products of absolute weights (as in GraN-DAG): ``h_i`` ignores ``x_j``
when ``A_ij = 0``. The flow ``u_i = tau(x_i; h_i(x))`` (an additive, affine or UMNN normaliser,
the package's own) is fitted by maximum likelihood under the constraint
``h(A) = tr(exp(A)) - d = 0`` (zero iff ``A`` is acyclic), with the augmented Lagrangian
``NLL + sparsity * sum_ij A_ij + alpha h(A) + rho / 2 h(A)^2``: each round minimises it
with the shared training loop, then raises the multiplier ``alpha += rho h`` and multiplies
``rho`` by 10 when ``h`` did not fall below a quarter of its previous value. The final
edge strengths (root-mean-square sensitivities of ``h_i`` to ``x_j`` on the data) are
thresholded and any cycle left is broken by dropping its weakest edge.

Example:
    >>> x0 = torch.randn(1000); x1 = torch.sin(2 * x0) + 0.3 * torch.randn(1000)
    >>> learn_structure(torch.stack([x0, x1], -1), progress=False)
    tensor([[False, False],
            [ True, False]])
"""

from __future__ import annotations

import math
from typing import Mapping

import networkx as nx
import torch
from torch import nn

__all__ = ["learn_structure", "GraphicalConditioner", "acyclicity", "break_cycles"]


def acyclicity(A: torch.Tensor) -> torch.Tensor:
    """NOTEARS' ``h(A) = tr(exp(A)) - d`` for a non-negative ``(d, d)`` ``A``: 0 iff ``A`` is acyclic, else > 0."""
    return torch.linalg.matrix_exp(A).diagonal().sum() - A.shape[0]


def break_cycles(strength: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A DAG from the edges ``keep`` (``(d, d)`` bool, ``A[i, j]``: i depends on j) by dropping, while a
    cycle remains, the weakest edge of a cycle (``strength`` ``(d, d)``)."""
    A = keep.clone()
    g = nx.DiGraph()
    g.add_nodes_from(range(A.shape[0]))
    g.add_edges_from((j, i) for i, j in torch.nonzero(A).tolist())
    while True:
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            return A
        j, i = min(cycle, key=lambda e: float(strength[e[1], e[0]]))
        g.remove_edge(j, i)
        A[i, j] = False


class GraphicalConditioner(nn.Module):
    """The conditioners ``h_i(x)`` of all ``d`` columns at once, each fed every other column.

    Args:
        d: number of columns; num_params: normaliser parameters per column.
        hidden: hidden width of each column's MLP; depth: its number of hidden layers.

    Shapes: ``x`` ``(n, d)`` -> parameters ``(n, d, num_params)``. The output layer starts at zero
    (the identity flow).
    """

    def __init__(self, d: int, num_params: int, hidden: int = 16, depth: int = 2):
        super().__init__()
        self.d, self.num_params = int(d), int(num_params)
        scale = 1.0 / math.sqrt(d)
        self.first = nn.Parameter(torch.randn(d, hidden, d) * scale)  # (output i, hidden, input j)
        self.first_bias = nn.Parameter(torch.zeros(d, hidden))
        self.hidden = nn.ParameterList()
        self.hidden_bias = nn.ParameterList()
        for _ in range(depth - 1):
            self.hidden.append(nn.Parameter(torch.randn(d, hidden, hidden) / math.sqrt(hidden)))
            self.hidden_bias.append(nn.Parameter(torch.zeros(d, hidden)))
        self.out = nn.Parameter(torch.zeros(d, num_params, hidden))
        self.out_bias = nn.Parameter(torch.zeros(d, num_params))
        self.register_buffer("off_diagonal", ~torch.eye(d, dtype=torch.bool), persistent=False)

    def edge_weights(self) -> torch.Tensor:
        """The first-layer weights with the self-inputs masked: ``(d, hidden, d)``."""
        return self.first * self.off_diagonal.unsqueeze(1)

    def adjacency(self) -> torch.Tensor:
        """The relaxed adjacency ``(d, d)``: ``A_ij`` sums the products of absolute weights over all
        paths from input ``j`` to column ``i``'s outputs (as GraN-DAG), zero iff no path carries
        weight; unlike a first-layer norm it cannot be shrunk by scaling weight up in later layers."""
        C = self.edge_weights().abs()  # (i, h, j)
        for w in self.hidden:
            C = torch.einsum("igh,ihj->igj", w.abs(), C)
        return torch.einsum("iph,ihj->ij", self.out.abs(), C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normaliser parameters ``(n, d, num_params)`` of every column for rows ``x`` ``(n, d)``."""
        h = torch.einsum("ihj,nj->nih", self.edge_weights(), x) + self.first_bias
        for w, b in zip(self.hidden, self.hidden_bias):
            h = torch.einsum("igh,nih->nig", w, torch.tanh(h)) + b
        return torch.einsum("iph,nih->nip", self.out, torch.tanh(h)) + self.out_bias


class _GraphicalFlow(nn.Module):
    """``u_i = tau(x_i; h_i(x))``: the graphical flow whose likelihood is valid once the adjacency is a DAG."""

    def __init__(self, d: int, normalizer: str, hidden: int, depth: int):
        super().__init__()
        from .flows.straf import AffineNormalizer, UMNNNormalizer

        self.additive = normalizer == "additive"
        if normalizer in ("affine", "additive"):
            self.normalizer = AffineNormalizer()
        elif normalizer == "umnn":
            self.normalizer = UMNNNormalizer(embedding_dim=4, hidden_sizes=(16, 16), num_steps=20)
        else:
            raise ValueError(f"normalizer must be 'additive', 'affine' or 'umnn'; got {normalizer!r}")
        self.conditioner = GraphicalConditioner(d, self.normalizer.num_params, hidden, depth)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per row (nats; exact when the adjacency is acyclic)."""
        params = self.conditioner(x)
        if self.additive:  # a constant scale per column: additive noise, identifiable (Hoyer et al., 2009)
            params = torch.stack([params[..., 0], self.conditioner.out_bias[:, 1].expand(params.shape[:-1])], -1)
        u, log_grad = self.normalizer.to_noise(x, params)
        return (0.5 * u * u + 0.5 * math.log(2 * math.pi) - log_grad).sum(-1).mean()


def _sensitivity(model: "_GraphicalFlow", X: torch.Tensor) -> torch.Tensor:
    """Edge strengths ``(d, d)``: the root mean square over the data of ``d theta_i / d x_j`` (all of
    column ``i``'s normaliser parameters), in standardised units, so that rescaling weights
    between the conditioner's layers cannot hide or inflate an edge."""
    x = X[:1024].clone().requires_grad_(True)
    params = model.conditioner(x)  # (n, d, P)
    d, P = params.shape[1], params.shape[2]
    S = torch.zeros(d, d)
    for i in range(d):
        for p in range(P):
            (g,) = torch.autograd.grad(params[:, i, p].sum(), x, retain_graph=True)
            S[i] += (g * g).mean(0)
    return S.sqrt().detach()


def _as_matrix(data) -> torch.Tensor:
    if isinstance(data, Mapping):
        data = torch.stack([torch.as_tensor(v, dtype=torch.get_default_dtype()).reshape(-1) for v in data.values()], -1)
    X = torch.as_tensor(data, dtype=torch.get_default_dtype())
    if X.dim() != 2 or X.shape[1] < 2 or X.shape[0] < 10:
        raise ValueError(f"data must be a tensor (n, d) with d >= 2 and n >= 10, or a dict of columns; got shape {tuple(X.shape)}")
    bad = ~torch.isfinite(X).all(-1)
    if bad.any():
        raise ValueError(f"data has {int(bad.sum())} row(s) with NaN or infinite values; drop or impute them first")
    return (X - X.mean(0)) / X.std(0).clamp(min=1e-12)


def learn_structure(data, *, sparsity: float = 0.01, threshold: float = 0.1, steps_per_round: int = 500,
                    max_rounds: int = 8, tolerance: float = 1e-6, rho_max: float = 1e16, normalizer: str = "additive",
                    hidden: int = 8, depth: int = 2, lr: float = 1e-2, batch_size: int | None = None,
                    seed: int | None = 0, progress: bool = False, return_strength: bool = False):
    """Learn a DAG over the columns of ``data`` with a graphical normalizing flow (see the module docstring).

    Args:
        data: ``(n, d)`` tensor or dict ``name -> (n,)`` (columns in the dict's order); the
            columns are standardised first.
        sparsity: weight of the L1 penalty ``sum_ij A_ij`` on the relaxed adjacency (higher: fewer edges).
        threshold: an edge ``j -> i`` is kept when its strength, the root mean square over the
            data of ``d theta_i / d x_j`` (standardised units), exceeds this.
        steps_per_round: optimisation steps per augmented-Lagrangian round.
        max_rounds: at most this many rounds (stops earlier once ``h(A) <= tolerance``).
        tolerance: acyclicity tolerance on ``h(A)``; rho_max: the largest quadratic penalty.
        normalizer: ``"additive"`` (Gaussian noise of a constant scale per column around a learned
            mean: an additive-noise model, whose DAG is identifiable for nonlinear mechanisms),
            ``"affine"`` (the scale learned too) or ``"umnn"`` (monotonic, any conditional shape; slower
            and less identifiable).
        hidden, depth: width and number of hidden layers of each column's conditioner.
        lr: Adam's learning rate; batch_size: rows per step (default: all rows, up to 1024).
        seed: seeds torch first (``None``: leave the generator alone); progress: progress bars.
        return_strength: also return the ``(d, d)`` edge strengths.

    Returns:
        ``(d, d)`` bool adjacency, ``A[i, j]``: column ``i`` depends on column ``j`` (a DAG),
        and with ``return_strength`` the strengths ``(d, d)`` too.
    """
    from .training import train
    from .training.batches import PoolSource, TensorPool

    if seed is not None:
        torch.manual_seed(seed)
    X = _as_matrix(data)
    if not threshold >= 0 or not sparsity >= 0:
        raise ValueError(f"threshold and sparsity must be >= 0; got threshold={threshold}, sparsity={sparsity}")
    d = X.shape[1]
    model = _GraphicalFlow(d, normalizer, hidden, depth)
    source = PoolSource(TensorPool(X), int(batch_size or min(X.shape[0], 1024)), 0.0)
    alpha, rho, h_last = 0.0, 1.0, math.inf

    def loss_fn(batch):
        """The augmented Lagrangian at the current multipliers (read when called)."""
        A = model.conditioner.adjacency()
        h = acyclicity(A)
        return model.nll(batch.data) + sparsity * A.sum() + alpha * h + 0.5 * rho * h * h

    for _ in range(int(max_rounds)):
        train(model, loss_fn, source, num_steps=int(steps_per_round), lr=lr, lr_schedule="constant",
              progress=progress, desc="learn_structure")
        with torch.no_grad():
            h = float(acyclicity(model.conditioner.adjacency()))
        if h <= tolerance or rho >= rho_max:
            break
        if h > 0.25 * h_last:
            rho *= 10
        alpha += rho * h
        h_last = h
    strength = _sensitivity(model, X)
    A = break_cycles(strength, strength > threshold)
    return (A, strength) if return_strength else A
