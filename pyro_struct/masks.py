"""Binary weight masks whose product has exactly the zero pattern of an adjacency (StrNN).

Reference: Chen et al. (2023), Structured Neural Networks for Density Estimation and Causal
Inference, Algorithm 1 (greedy factorisation).

Example:
    >>> A = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    >>> masks = factorize(A, [4, 4])
    >>> [tuple(m.shape) for m in masks]
    [(4, 3), (4, 4), (3, 4)]
    >>> bool((mask_product(masks) > 0).eq(A).all())
    True
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

__all__ = ["factorize", "mask_product", "count_paths", "check_masks", "minimum_widths"]


def _as_bool_matrix(A) -> torch.Tensor:
    A = torch.as_tensor(A)
    if A.dim() != 2:
        raise ValueError(f"adjacency must be a 2-D (out, in) matrix; got shape {tuple(A.shape)}")
    return A.bool()


def _subset_mask(patterns: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``M[i, k]`` iff the input set of ``patterns[k]`` is a subset of ``rows[i]``'s.

    Args:
        patterns: ``(h, n)`` bool, the input pattern of each hidden unit.
        rows: ``(m, n)`` bool.

    Returns:
        ``(m, h)`` bool.
    """
    # |patterns[k] \ rows[i]| == 0, as one matmul (float32 counts are exact below 2**24)
    outside = (~rows).to(torch.float32) @ patterns.to(torch.float32).T
    return outside == 0


def _distinct_nonzero_rows(A: torch.Tensor) -> torch.Tensor:
    nonzero = A[A.any(1)]
    if len(nonzero) == 0:
        return nonzero
    return torch.unique(nonzero, dim=0)


def _cycle_patterns(A: torch.Tensor, width: int, order: str) -> torch.Tensor:
    """Input patterns of ``width`` hidden units cycling over ``A``'s distinct non-zero rows."""
    rows = _distinct_nonzero_rows(A)
    if len(rows) == 0:
        # nothing to connect: constant hidden units (an all-zero A is valid)
        return torch.zeros(width, A.shape[1], dtype=torch.bool)
    if order == "paths":
        # a unit with pattern p adds |p| x (#rows of A that contain p) paths; the units that
        # do not fill a whole cycle go to the patterns that add the most
        score = rows.sum(1).double() * _subset_mask(rows, A).sum(0).double()
        rows = rows[torch.argsort(score, descending=True, stable=True)]
    idx = torch.arange(width) % len(rows)
    return rows[idx]


def minimum_widths(A, num_hidden: int) -> int:
    """Smallest hidden width for which a factorisation of ``A`` is exact.

    Args:
        A: ``(out, in)`` adjacency.
        num_hidden: number of hidden layers (unused beyond validation: every layer needs the
            same minimum, the number of distinct non-zero rows of ``A``).

    Returns:
        The minimum width (at least 1).
    """
    A = _as_bool_matrix(A)
    if num_hidden < 0:
        raise ValueError("num_hidden must be >= 0")
    return max(1, len(_distinct_nonzero_rows(A)))


def _factorize(A: torch.Tensor, hidden_sizes: Sequence[int], order: str, widen: bool) -> list[torch.Tensor]:
    masks = []
    target = A
    for layer, h in enumerate(hidden_sizes):
        need = len(_distinct_nonzero_rows(target))
        if h < need:
            if not widen:
                raise ValueError(
                    f"hidden layer {layer} has width {h} but this adjacency needs at least {need} units "
                    f"(its number of distinct non-zero rows) for an exact factorisation; use hidden "
                    f"sizes >= {need} or pass widen=True"
                )
            warnings.warn(f"hidden layer {layer} widened from {h} to {need} units to keep the masks exact")
            h = need
        patterns = _cycle_patterns(target, h, order)  # (h, in_prev)
        masks.append(patterns)
        target = _subset_mask(patterns, target)  # (out, h): output i may use unit k
    masks.append(target)
    return masks


def factorize(
    A,
    hidden_sizes: Sequence[int],
    method: str = "greedy",
    widen: bool = False,
) -> list[torch.Tensor]:
    """Masks for an MLP whose input-output connectivity is exactly ``A``.

    Args:
        A: ``(out, in)`` bool adjacency; ``A[i, j]`` means output ``i`` may depend on input ``j``.
        hidden_sizes: widths of the hidden layers (may be empty: one masked linear layer).
        method: ``"greedy"`` (StrNN: hidden units cycle over the distinct rows of the
            current target, the leftover units given to the patterns that add the most
            input-output paths) or ``"made"`` (the subset-precedence baseline as in zuko's
            MADE: the same construction with rows taken in lexicographic order).
        widen: widen a hidden layer that is too narrow for an exact factorisation to the
            minimum (with a warning) instead of raising.

    Returns:
        ``len(hidden_sizes) + 1`` bool masks shaped like ``nn.Linear.weight``:
        ``(h1, in), (h2, h1), ..., (out, hL)``. Their boolean product equals ``A``.

    Raises:
        ValueError: a hidden layer narrower than the number of distinct non-zero rows of
            its target (with the minimum in the message) when ``widen=False``, an unknown
            method, or a malformed ``A``.
    """
    A = _as_bool_matrix(A)
    hidden_sizes = [int(h) for h in hidden_sizes]
    if any(h <= 0 for h in hidden_sizes):
        raise ValueError(f"hidden sizes must be positive; got {hidden_sizes}")
    if method == "greedy":
        masks = _factorize(A, hidden_sizes, "paths", widen)
    elif method == "made":
        masks = _factorize(A, hidden_sizes, "lexicographic", widen)
    else:
        raise ValueError(f"unknown factorisation method {method!r}; use 'greedy' or 'made'")
    check_masks(masks, A)
    return masks


def mask_product(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Number of input-output paths through a stack of masks.

    Args:
        masks: bool masks ``(h1, in), ..., (out, hL)``.

    Returns:
        ``(out, in)`` float64 tensor of path counts.
    """
    P = masks[0].double()
    for m in masks[1:]:
        P = m.double() @ P
    return P


def count_paths(masks: Sequence[torch.Tensor]) -> int:
    """Total number of input-output paths (the quantity the greedy factorisation maximises)."""
    return int(mask_product(masks).sum().item())


def check_masks(masks: Sequence[torch.Tensor], A) -> None:
    """Raise ``ValueError`` unless the masks connect exactly the pairs that ``A`` allows.

    Both directions are checked: a spurious connection breaks the structure (a wrong
    posterior), a missing one loses a dependency silently.
    """
    A = _as_bool_matrix(A)
    P = mask_product(masks) > 0
    if P.shape != A.shape:
        raise ValueError(f"mask product has shape {tuple(P.shape)}, adjacency {tuple(A.shape)}")
    spurious = P & ~A
    missing = A & ~P
    if spurious.any():
        i, j = torch.nonzero(spurious)[0].tolist()
        raise ValueError(f"masks connect output {i} to input {j}, which the adjacency forbids")
    if missing.any():
        i, j = torch.nonzero(missing)[0].tolist()
        raise ValueError(f"masks do not connect output {i} to input {j}, which the adjacency requires")
