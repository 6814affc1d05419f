"""Binary weight masks whose product has exactly the zero pattern of an adjacency (StrNN).

Reference: Chen et al. (2023), Structured Neural Networks for Density Estimation and Causal
Inference, Algorithm 1 (greedy factorisation), and the MADE-style subset-precedence masks of
zuko's ``MaskedMLP`` as the baseline.

Both constructions give every hidden unit a *label*: one of the distinct non-zero rows of
``A`` (a set of inputs). Unit ``k`` reads input ``j`` iff ``j`` is in its label, reads unit
``k'`` of the previous layer iff ``label(k')`` is a subset of ``label(k)``, and output ``i``
reads unit ``k`` iff ``label(k)`` is a subset of ``A[i]``. When every label occurs in every
hidden layer, the mask product has exactly the zero pattern of ``A`` (every path stays inside
``A[i]``, and the chain of units labelled ``A[i]`` realises every allowed pair). This is the
StrNN recursion (hidden units copy the rows of the current target, the output-to-hidden mask
is the next target) written once for all layers.

Units beyond one full cycle over the labels are free. The baseline (``"made"``) gives them to
the first labels in lexicographic order; the greedy method gives them to the labels that add
the most input-output paths, by coordinate ascent over the layers started from the
baseline's assignment: each step is optimal for one layer given the others (the path count is
linear in one layer's label counts), so greedy never has fewer paths than the baseline.

The StrNN paper's own greedy algorithm (Algorithm 1, applied layer by layer) cycles over all
non-zero rows of the current target *with their repetitions*, in row order, so a row pattern
shared by many outputs gets proportionally many units; on sparse adjacencies with many equal
rows that keeps more paths than balanced cycles. ``"greedy"`` therefore also builds the paper's
masks and returns them when they are exact and have more paths: it never has fewer paths than
either the paper's algorithm or the baseline.

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

_MAX_SWEEPS = 20


def _as_bool_matrix(A, name: str = "adjacency") -> torch.Tensor:
    A = torch.as_tensor(A)
    if A.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) matrix; got shape {tuple(A.shape)}")
    return A.detach().cpu().bool()


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


def _labels(A: torch.Tensor) -> torch.Tensor:
    """Distinct non-zero rows of ``A`` in lexicographic order (``torch.unique``'s): ``(r, in)``."""
    nonzero = A[A.any(1)]
    if len(nonzero) == 0:
        return nonzero
    return torch.unique(nonzero, dim=0)


def minimum_widths(A, num_hidden: int) -> int:
    """Smallest hidden width for which a factorisation of ``A`` is exact.

    Args:
        A: ``(out, in)`` adjacency.
        num_hidden: number of hidden layers (every layer needs the same minimum: the number
            of distinct non-zero rows of ``A``).

    Returns:
        The minimum width (at least 1).
    """
    A = _as_bool_matrix(A)
    if num_hidden < 0:
        raise ValueError("num_hidden must be >= 0")
    return max(1, len(_labels(A)))


class _LabelPaths:
    """Input-output path counts of a label assignment, computed on labels rather than units.

    With ``n_l[b]`` units labelled ``b`` in hidden layer ``l``, the paths arriving at the
    units of label ``b`` are ``v_1 = |b| n_1`` and ``v_l = n_l * (S^T v_{l-1})``; the total is
    ``c . v_L`` with ``c[b]`` the number of outputs whose row contains ``b``. The total is
    linear in each ``n_l``, with coefficient ``f_l * g_l`` (paths into one unit times paths
    out of it).
    """

    def __init__(self, labels: torch.Tensor, A: torch.Tensor, subset=None, outputs=None):
        # subset[a, b]: label a is a subset of label b; outputs[i, b]: label b is a subset of A[i]
        subset = _subset_mask(labels, labels).T if subset is None else subset
        outputs = _subset_mask(labels, A) if outputs is None else outputs
        self.S = subset.double()
        self.size = labels.sum(1).double()
        self.c = outputs.sum(0).double()

    def marginal(self, counts: list[torch.Tensor], layer: int) -> torch.Tensor:
        """Paths added by one more unit of each label in ``layer``: ``(r,)``."""
        f = self.size
        for n in counts[:layer]:
            f = self.S.T @ (n * f)
        g = self.c
        for n in reversed(counts[layer + 1 :]):
            g = self.S @ (n * g)
        return f * g

    def total(self, counts: list[torch.Tensor]) -> float:
        return float((counts[-1] * self.marginal(counts, len(counts) - 1)).sum())


def _assign_labels(paths: _LabelPaths | None, r: int, widths: list[int]) -> list[torch.Tensor]:
    """Label index of every unit of every hidden layer (a list of ``(h_l,)`` long tensors).

    ``paths`` is ``None`` for the baseline (no optimisation of the leftover units).
    """
    # extras[l]: the labels that get one unit more than a full number of cycles
    extras = [torch.arange(h % r) for h in widths]
    if paths is not None and any(len(e) for e in extras):

        def counts_of(extra_sets):
            out = []
            for h, e in zip(widths, extra_sets):
                n = torch.full((r,), float(h // r), dtype=torch.float64)
                n[e] += 1
                out.append(n)
            return out

        best = paths.total(counts_of(extras))
        for _ in range(_MAX_SWEEPS):
            improved = False
            for layer, h in enumerate(widths):
                m = h % r
                if m == 0:
                    continue
                counts = counts_of(extras)
                gain = paths.marginal(counts, layer)
                candidate = list(extras)
                candidate[layer] = torch.argsort(gain, descending=True, stable=True)[:m]
                total = paths.total(counts_of(candidate))
                if total > best:
                    best, extras, improved = total, candidate, True
            if not improved:
                break
    assignments = []
    for h, e in zip(widths, extras):
        rest = torch.ones(r, dtype=torch.bool)
        rest[e] = False
        ordering = torch.cat([e, torch.nonzero(rest).flatten()])
        assignments.append(ordering[torch.arange(h) % r])
    return assignments


def _paper_greedy(A: torch.Tensor, widths: list[int]) -> list[torch.Tensor] | None:
    """The StrNN paper's greedy factorisation (Chen et al. 2023, Algorithm 1), layer by layer.

    For each hidden layer, ``M1`` copies the non-zero rows of the current target cyclically (with
    repetitions, in row order) and ``M2[i, k] = [M1[k] is a subset of target[i]]``; ``M2`` is the
    next target and the last one is the output mask. Returns ``None`` when a target has no
    non-zero row. The result may not be exact when a layer is narrower than the target's number of
    non-zero rows; the caller checks.
    """
    target = A
    masks = []
    for h in widths:
        rows = target[target.any(1)]
        if len(rows) == 0:
            return None
        M1 = rows[torch.arange(h) % len(rows)]
        masks.append(M1)
        target = _subset_mask(M1, target)
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
            An all-zero ``A`` is valid (constant outputs).
        hidden_sizes: widths of the hidden layers (may be empty: one masked linear layer).
        method: ``"greedy"`` (StrNN: hidden units cycle over the distinct non-zero rows of
            ``A``, the units left after whole cycles go to the rows that add the most
            input-output paths; the StrNN paper's Algorithm 1 is tried too and kept when it
            has more paths) or ``"made"`` (the subset-precedence baseline as in zuko's
            MADE: leftover units go to the first rows in lexicographic order) or ``"paper"``
            (the StrNN paper's Algorithm 1 alone, for comparisons; it raises where its masks are
            not exact).
        widen: widen a hidden layer that is too narrow for an exact factorisation to the
            minimum (with a warning) instead of raising.

    Returns:
        ``len(hidden_sizes) + 1`` bool masks shaped like ``nn.Linear.weight``:
        ``(h1, in), (h2, h1), ..., (out, hL)``. Their boolean product equals ``A``.

    Raises:
        ValueError: a hidden layer narrower than the number of distinct non-zero rows of
            ``A`` (with the minimum in the message) when ``widen=False``, an unknown method,
            or a malformed ``A``.

    Example:
        >>> A = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
        >>> [m.int().tolist() for m in factorize(A, [2])]
        [[[1, 0], [1, 0]], [[0, 0], [1, 1]]]
    """
    A = _as_bool_matrix(A)
    if method not in ("greedy", "made", "paper"):
        raise ValueError(f"unknown factorisation method {method!r}; use 'greedy', 'made' or 'paper'")
    try:
        widths = [int(h) for h in hidden_sizes]
    except TypeError:
        raise ValueError(f"hidden_sizes must be a sequence of positive integers; got {hidden_sizes!r}") from None
    if any(h <= 0 for h in widths):
        raise ValueError(f"hidden sizes must be positive; got {widths}")
    if not widths:
        return [A.clone()]

    labels = _labels(A)
    r = len(labels)
    if r == 0:
        # nothing to connect: hidden units and outputs are constants of their biases
        sizes = widths + [A.shape[0]]
        ins = [A.shape[1]] + widths
        return [torch.zeros(o, i, dtype=torch.bool) for o, i in zip(sizes, ins)]
    for layer, h in enumerate(widths):
        if h < r:
            if not widen:
                raise ValueError(
                    f"hidden layer {layer} has width {h} but this adjacency needs at least {r} units "
                    f"(its number of distinct non-zero rows) for an exact factorisation; use hidden "
                    f"sizes >= {r} or pass widen=True"
                )
            warnings.warn(f"hidden layer {layer} widened from {h} to {r} units to keep the masks exact")
            widths[layer] = r

    if method == "paper":
        paper = _paper_greedy(A, widths)
        if paper is None or not torch.equal(_connectivity(paper), A):
            raise ValueError(
                f"the StrNN paper's greedy masks are not exact for hidden sizes {widths} on this adjacency "
                f"(a layer narrower than its number of non-zero target rows); use method='greedy'"
            )
        return [m.contiguous() for m in paper]
    S = _subset_mask(labels, labels).T  # S[a, b]: label a subset of label b
    outputs = _subset_mask(labels, A)  # (out, r): label b subset of A[i]
    if method == "made":
        masks = _label_masks(labels, S, outputs, _assign_labels(None, r, widths))
        check_masks(masks, A)
        return masks
    return _greedy_masks(A, labels, S, outputs, widths)


def _label_masks(labels, S, outputs, assignment: list[torch.Tensor]) -> list[torch.Tensor]:
    """The masks of a label assignment: unit reads its label's inputs, the previous layer's units
    whose label is a subset of its own; output ``i`` reads the units whose label is within ``A[i]``."""
    masks = [labels[assignment[0]]]
    for prev, cur in zip(assignment[:-1], assignment[1:]):
        masks.append(S[prev][:, cur].T.contiguous())
    masks.append(outputs[:, assignment[-1]].contiguous())
    return masks


def _greedy_masks(A, labels, S, outputs, widths: list[int]) -> list[torch.Tensor]:
    """The better (in paths) of the coordinate-ascent assignment and the paper's Algorithm 1."""
    r = len(labels)
    paths = _LabelPaths(labels, A, S, outputs)
    assignment = _assign_labels(paths, r, widths)
    paper = _paper_assignment(A, r, widths)
    if paper is not None and paths.total(_label_counts(paper, r)) > paths.total(_label_counts(assignment, r)):
        assignment = paper
    masks = _label_masks(labels, S, outputs, assignment)
    check_masks(masks, A)
    if paper is None:
        # the paper's cycle misses a distinct row in some layer: its masks are not label masks, so
        # build them as the paper does and keep them if they are exact and have more paths
        direct = _paper_greedy(A, widths)
        if direct is not None and count_paths(direct) > count_paths(masks) and torch.equal(_connectivity(direct), A):
            masks = [m.contiguous() for m in direct]
    return masks


def _label_counts(assignment: list[torch.Tensor], r: int) -> list[torch.Tensor]:
    """Units per label in every hidden layer: ``(r,)`` float64 each."""
    return [torch.bincount(a, minlength=r).double() for a in assignment]


def _paper_assignment(A: torch.Tensor, r: int, widths: list[int]) -> list[torch.Tensor] | None:
    """The paper's masks (:func:`_paper_greedy`) as label indices per unit, or ``None`` when its cycle
    misses a distinct row in some layer.

    When every distinct row occurs in a layer, the paper's next target has the same non-zero rows
    as ``A`` and its masks are the label-subset masks, so every layer cycles over the label indices
    of ``A``'s non-zero rows in row order (repetitions included).
    """
    _, row_labels = torch.unique(A[A.any(1)], dim=0, return_inverse=True)  # the order of _labels
    assignment = [row_labels[torch.arange(h) % len(row_labels)] for h in widths]
    if any(len(torch.unique(a)) < r for a in assignment):
        return None
    return assignment


def mask_product(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Number of input-output paths through a stack of masks, per (output, input) pair.

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
    """Total number of input-output paths (the quantity the greedy factorisation maximises).

    Equals ``mask_product(masks).sum()``, computed with matrix-vector products.
    """
    v = masks[0].double().sum(1)  # paths from all inputs into each first-layer unit
    for m in masks[1:]:
        v = m.double() @ v
    return int(round(float(v.sum())))


def _connectivity(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether any path joins each (output, input) pair: ``(out, in)`` bool."""
    P = masks[0].to(torch.float32)
    for m in masks[1:]:
        # clamping keeps the counts 0/1, so float32 stays exact for any width
        P = (m.to(torch.float32) @ P).clamp_(max=1.0)
    return P > 0


def check_masks(masks: Sequence[torch.Tensor], A) -> None:
    """Raise ``ValueError`` unless the masks connect exactly the pairs that ``A`` allows.

    Both directions are checked: a spurious connection breaks the structure (a wrong
    posterior), a missing one loses a dependency silently.

    Args:
        masks: bool masks ``(h1, in), ..., (out, hL)``.
        A: ``(out, in)`` adjacency.
    """
    A = _as_bool_matrix(A)
    for k, (lower, upper) in enumerate(zip(masks[:-1], masks[1:])):
        if upper.shape[1] != lower.shape[0]:
            raise ValueError(f"mask {k + 1} has {upper.shape[1]} inputs but mask {k} has {lower.shape[0]} outputs")
    P = _connectivity(masks)
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
