"""Levels, depth and transitive closure of the DAG behind a flow adjacency (one implementation for the package).

A flow adjacency is a ``(d, d + c)`` bool tensor: ``A[i, j]`` means latent ``i`` depends on input ``j``
(the ``d`` latents in sampling order, then ``c`` context columns); its latent block is strictly
lower-triangular. The *level* of a latent is the number of edges on the longest path from a root to it
among the latents; the *depth* is the largest level.

Example:
    >>> A = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)  # d=3, c=1
    >>> node_levels_of(A), depth(A)
    ([0, 1, 2], 2)
    >>> [lv.tolist() for lv in levels(A)]
    [[0], [1], [2]]
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["node_levels", "node_levels_of", "levels", "depth", "propagation_depth", "transitive_closure"]


def node_levels(parents: Sequence[Sequence[int]]) -> list[int]:
    """Longest-path level of every node of a DAG given in topological order.

    Args:
        parents: ``parents[i]`` lists the indices of node ``i``'s parents, all ``< i``.

    Returns:
        ``levels[i]``: edges on the longest path from a root to node ``i`` (0 for roots).

    Raises:
        ValueError: a parent index that is not earlier in the order (the nodes are not topologically sorted).
    """
    level: list[int] = []
    for i, ps in enumerate(parents):
        best = -1
        for p in ps:
            if not 0 <= p < i:
                raise ValueError(
                    f"node {i} has parent {p}, which is not earlier in the order; give the nodes in topological order"
                )
            best = max(best, level[p])
        level.append(best + 1)
    return level


def node_levels_of(adjacency: torch.Tensor) -> list[int]:
    """Level of every latent of a flow adjacency ``(d, d + c)`` (only the latent block is read): ``d`` ints."""
    A = torch.as_tensor(adjacency)
    if A.dim() != 2 or A.shape[1] < A.shape[0]:
        raise ValueError(f"adjacency must have shape (d, d + context_dim); got shape {tuple(A.shape)}")
    d = A.shape[0]
    parents: list[list[int]] = [[] for _ in range(d)]
    for i, j in torch.nonzero(A[:, :d].bool().cpu()).tolist():
        parents[i].append(j)
    return node_levels(parents)


def levels(adjacency: torch.Tensor) -> list[torch.Tensor]:
    """Latents grouped by level: ``depth + 1`` long tensors; level ``k`` holds the latents whose longest
    path from a root has ``k`` edges, so all parents of a level-``k`` latent lie in earlier levels
    (sampling can fill one level per pass). Empty for ``d = 0``."""
    lv = node_levels_of(adjacency)
    if not lv:
        return []
    groups: list[list[int]] = [[] for _ in range(max(lv) + 1)]
    for i, k in enumerate(lv):
        groups[k].append(i)
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def depth(adjacency: torch.Tensor) -> int:
    """Edges on the longest path among the latents of a flow adjacency ``(d, d + c)`` (0 without latent edges)."""
    return max(node_levels_of(adjacency), default=0)


def propagation_depth(adjacency: torch.Tensor) -> int:
    """Layers a one-edge-per-layer flow needs before every latent holds what all its ancestors carry.

    A graphical residual block updates latent ``i`` from the current values of its parents and its
    context columns only, so information moves one edge of ``H`` per block. Latent ``i`` is
    *complete* after ``level(i)`` blocks, where ``level(i) = 1`` when ``i`` sees every one of its
    ancestors (latent or context, :func:`transitive_closure`) directly, and otherwise
    ``level(i) = 1 + max(level(p) for p in parents(i))`` (its last block must see its parents
    complete, since they summarise the ancestors it cannot see). This is the longest path from an
    input to a latent (context edges counted) on sparse structures such as a faithful inverse, and 1
    for a complete DAG, whose latents see all their ancestors directly.

    Args:
        adjacency: ``(d, d + c)`` bool tensor, latent block strictly lower-triangular.

    Returns:
        ``max_i level(i)`` (0 for ``d = 0``).

    Example:
        >>> chain = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.bool)  # x -> z0 -> z1
        >>> dense = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.bool)  # x -> z0 -> z1, x -> z1
        >>> depth(chain), propagation_depth(chain), propagation_depth(dense)
        (1, 2, 1)
    """
    A = torch.as_tensor(adjacency).bool().cpu()
    closure = transitive_closure(A, reflexive=False)
    d = A.shape[0]
    level: list[int] = []
    for i in range(d):
        parents = torch.nonzero(A[i, :d]).flatten().tolist()
        sees_all = bool((A[i] | ~closure[i]).all())
        level.append(1 if sees_all or not parents else 1 + max(level[p] for p in parents))
    return max(level, default=0)


def transitive_closure(adjacency: torch.Tensor, reflexive: bool = True) -> torch.Tensor:
    """(Reflexive-)transitive closure of a flow adjacency.

    Args:
        adjacency: ``(d, d + c)`` bool tensor, latent block strictly lower-triangular.
        reflexive: set ``C[i, i]`` for every latent.

    Returns:
        ``(d, d + c)`` bool tensor: ``C[i, j]`` iff there is a directed path from input ``j`` to latent
        ``i`` (of length >= 1, or 0 when ``reflexive``). A flow's output ``z_i`` can only depend on base
        noise ``eps_j`` and context ``x_k`` where the reflexive closure is true.
    """
    A = torch.as_tensor(adjacency).bool()
    if A.dim() != 2 or A.shape[1] < A.shape[0]:
        raise ValueError(f"adjacency must have shape (d, d + context_dim); got shape {tuple(A.shape)}")
    d = A.shape[0]
    if torch.triu(A[:, :d]).any():
        raise ValueError("the latent block of adjacency must be strictly lower-triangular (latents in sampling order)")
    C = A.clone()
    # rows in sampling order: row i's closure is its parents' closures ORed together
    for i in range(d):
        ps = torch.nonzero(A[i, :d]).flatten()
        if len(ps):
            C[i] |= C[ps].any(0)
    if reflexive:
        C[:, :d] |= torch.eye(d, dtype=torch.bool, device=C.device)
    return C
