"""Jacobian sparsity of a recorded torch graph: which (output, input element) pairs have a non-zero derivative.

Pure torch. The outputs must already be computed (with ``requires_grad`` inputs); every method
reads gradients of that recorded graph: batched reverse passes (one row per output element),
forward-mode columns (one pass per input element), and compressed reverse passes (rows summed in
residue classes, then coloured so that rows with disjoint supports share a pass) for large
outputs with sparse Jacobians.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "PairMask",
    "colour_classes",
    "reverse_nonzero",
    "forward_nonzero",
    "compressed_reverse_pairs",
    "large_output_pairs",
    "accumulate_sparsity",
    "LARGE_OUTPUT",
]

# Largest number of gradient entries one batched backward pass may produce; bigger
# Jacobians are computed in chunks of rows.
_JACOBIAN_CHUNK = 1 << 22
# Pair-wise dependency masks up to this many entries are kept dense, larger ones as index lists.
_DENSE_MASK_LIMIT = 1 << 22
# An output with more elements than this is not differentiated row by row (each row costs a
# pass over the whole graph): its Jacobian sparsity is found with forward passes for small
# inputs and compressed reverse passes for large ones (see large_output_pairs).
LARGE_OUTPUT = 128


class PairMask:
    """Which (output element, input element) pairs ever had a non-zero derivative.

    Accumulates over several evaluations (prior draws): an ``(n_out, n_in)`` bool matrix while
    that is small, else a list of ``(m, 2)`` index pieces.
    """

    def __init__(self, n_events: int, n_parent: int):
        self.shape = (n_events, n_parent)
        self.dense = (
            torch.zeros(n_events, n_parent, dtype=torch.bool) if n_events * n_parent <= _DENSE_MASK_LIMIT else None
        )
        self.pieces: list[torch.Tensor] = []

    def add(self, row0: int, nonzero: torch.Tensor) -> None:
        """``nonzero``: bool ``(rows, n_parent)`` for child events ``row0 ...``."""
        if self.dense is not None:
            self.dense[row0 : row0 + nonzero.shape[0]] |= nonzero
        else:
            idx = nonzero.nonzero()
            if idx.numel():
                idx[:, 0] += row0
                self.pieces.append(idx)

    def add_pairs(self, idx: torch.Tensor) -> None:
        """``idx``: ``(m, 2)`` long (child event, parent element) pairs."""
        if not idx.numel():
            return
        if self.dense is not None:
            self.dense[idx[:, 0], idx[:, 1]] = True
        else:
            self.pieces.append(idx)

    def pairs(self) -> torch.Tensor:
        """``(m, 2)`` long tensor of (child event, parent element) pairs."""
        if self.dense is not None:
            return self.dense.nonzero()
        if not self.pieces:
            return torch.zeros(0, 2, dtype=torch.long)
        return torch.unique(torch.cat(self.pieces), dim=0)


def colour_classes(children: list, reach: dict) -> list[list]:
    """Group outputs whose gradients can share one backward pass.

    ``reach[d]``: every input key output ``d`` may depend on. Two outputs share a pass when
    their ``reach`` sets are disjoint, so every non-zero input gradient belongs to exactly one
    of them. Greedy first-fit colouring; colour sets are Python ints used as bit sets.
    Returns the classes, each a list of keys of ``children`` in their given order.
    """
    using: dict[int, int] = {}
    classes: list[list[int]] = []
    for d in children:
        sites = reach[d]
        forbidden = 0
        for u in sites:
            forbidden |= using.get(u, 0)
        c = (~forbidden & (forbidden + 1)).bit_length() - 1
        if c == len(classes):
            classes.append([])
        classes[c].append(d)
        bit = 1 << c
        for u in sites:
            using[u] = using.get(u, 0) | bit
    return classes


def _batched_grads(outputs, inputs, grad_outputs, batched: bool):
    """Input gradients for a batch of cotangents; a Python loop where vmap is unsupported."""
    if not batched:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
    except (RuntimeError, NotImplementedError):
        rows = grad_outputs[0].shape[0]
        per_row = [
            torch.autograd.grad(outputs, inputs, [g[r] for g in grad_outputs], retain_graph=True, allow_unused=True)
            for r in range(rows)
        ]
        return tuple(
            None if all(p[i] is None for p in per_row)
            else torch.stack([p[i] if p[i] is not None else torch.zeros_like(inputs[i]) for p in per_row])
            for i in range(len(inputs))
        )


def reverse_nonzero(lp: torch.Tensor, inputs: list, cotangents: torch.Tensor) -> list:
    """``[(B, n_u) bool]``: which input elements have non-zero ``cotangents @ d lp / d input``.

    ``cotangents``: ``(B, R)``; batched in chunks of rows.
    """
    B = cotangents.shape[0]
    width = max(sum(x.numel() for x in inputs), lp.numel(), 1)
    chunk = max(1, min(B, _JACOBIAN_CHUNK // width))
    out = [[] for _ in inputs]
    for b0 in range(0, B, chunk):
        cot = cotangents[b0 : b0 + chunk]
        grads = _batched_grads([lp], inputs, [cot], True)
        for i, (g, x) in enumerate(zip(grads, inputs)):
            rows = cot.shape[0]
            out[i].append(
                torch.zeros(rows, x.numel(), dtype=torch.bool) if g is None else (g.detach().reshape(rows, -1) != 0).cpu()
            )
    return [torch.cat(o) for o in out]


def forward_nonzero(lp: torch.Tensor, inputs: list) -> list | None:
    """``[(R, n_u) bool]``: the Jacobian sparsity column by column (forward mode).

    Forward mode through the already recorded graph: ``g(c) = J^T c`` is linear in a dummy
    cotangent ``c``, so differentiating it again with tangent ``e_j`` gives column ``j`` of
    ``J``. Costs one pass per input element; ``None`` if the graph is not twice differentiable.
    """
    R = lp.numel()
    cot = torch.zeros_like(lp, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            firsts = torch.autograd.grad(lp, inputs, cot, create_graph=True, allow_unused=True)
            out = []
            for g, x in zip(firsts, inputs):
                n = x.numel()
                if g is None:
                    out.append(torch.zeros(R, n, dtype=torch.bool))
                    continue
                if not g.requires_grad:
                    return None  # a backward that is not differentiable: cannot read columns
                cols = []
                chunk = max(1, min(n, _JACOBIAN_CHUNK // max(R, n, 1)))
                for j0 in range(0, n, chunk):
                    m = min(chunk, n - j0)
                    tangents = g.new_zeros(m, n)
                    tangents[torch.arange(m), torch.arange(j0, j0 + m)] = 1
                    (col,) = torch.autograd.grad(
                        g, cot, tangents.reshape((m,) + tuple(g.shape)), retain_graph=True,
                        allow_unused=True, is_grads_batched=True,
                    )
                    cols.append(torch.zeros(m, R, dtype=torch.bool) if col is None else (col.detach().reshape(m, R) != 0).cpu())
                out.append(torch.cat(cols).T)
            return out
    except (RuntimeError, NotImplementedError):
        return None


def _coprime_moduli(n: int) -> tuple[int, int]:
    m = max(2, math.isqrt(max(n - 1, 0)) + 1)
    return m, m + 1  # consecutive integers are coprime and m (m + 1) >= n


def compressed_reverse_pairs(lp: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """``(m, 2)`` (row, element) pairs of the non-zero Jacobian entries ``d lp / d x``, or
    ``None`` when the Jacobian is too dense for this method.

    1. Superset: rows are summed with random positive weights in two coprime residue
       classes (``k mod m1``, ``k mod m2``); an entry ``(k, j)`` can be non-zero only if
       column ``j`` is non-zero in both of ``k``'s sums. For diagonal (plate) or banded
       Jacobians this is already (nearly) exact, with ``m1 + m2 ~ 2 sqrt(R)`` passes.
    2. Exact values: rows whose candidate supports are disjoint share one pass
       (Curtis-Powell-Reid colouring); every non-zero gradient entry then belongs to the
       single row of its colour that may touch it.
    """
    R, n = lp.numel(), x.numel()
    m1, m2 = _coprime_moduli(R)
    rows = torch.arange(R)
    weights = 1 + torch.rand(R, generator=torch.Generator().manual_seed(R), dtype=torch.float64)
    weights = weights.to(device=lp.device, dtype=lp.dtype)
    cot = lp.new_zeros(m1 + m2, R)
    cot[rows % m1, rows] = weights
    cot[m1 + rows % m2, rows] = weights
    (U,) = reverse_nonzero(lp, [x], cot)
    hits = U.nonzero()
    if hits.shape[0] > 64 * (R + n):
        return None
    per_class = torch.bincount(hits[:, 0], minlength=m1 + m2).tolist()
    flat = hits[:, 1].tolist()
    class_sets, pos = [], 0
    for c in per_class:
        class_sets.append(set(flat[pos : pos + c]))
        pos += c
    # greedy colouring of rows by their candidate supports; colour sets as Python-int bit sets
    using: dict[int, int] = {}
    colour = [0] * R
    sup_rows: list[int] = []
    sup_cols: list[int] = []
    n_colours = 0
    for k in range(R):
        row_cols = class_sets[k % m1] & class_sets[m1 + k % m2]
        forbidden = 0
        for j in row_cols:
            forbidden |= using.get(j, 0)
        c = (~forbidden & (forbidden + 1)).bit_length() - 1
        colour[k] = c
        if c >= n_colours:
            n_colours = c + 1
            if n_colours > R // 4:
                return None
        bit = 1 << c
        for j in row_cols:
            using[j] = using.get(j, 0) | bit
        sup_rows.extend([k] * len(row_cols))
        sup_cols.extend(row_cols)
    support = torch.stack([torch.tensor(sup_rows, dtype=torch.long), torch.tensor(sup_cols, dtype=torch.long)], 1)
    colour_t = torch.tensor(colour, dtype=torch.long)
    owner = torch.full((n_colours, n), -1, dtype=torch.long)
    owner[colour_t[support[:, 0]], support[:, 1]] = support[:, 0]
    cot = lp.new_zeros(n_colours, R)
    cot[colour_t, rows] = 1
    (hits,) = reverse_nonzero(lp, [x], cot)
    c_idx, j_idx = hits.nonzero().unbind(1)
    k_idx = owner[c_idx, j_idx]
    pairs = [torch.stack([k_idx[k_idx >= 0], j_idx[k_idx >= 0]], 1)]
    stray = (k_idx < 0).nonzero().reshape(-1)
    if stray.numel():
        # a gradient outside the candidate superset (cancelled random sums): every row of the colour
        for s in stray.tolist():
            members = (colour_t == c_idx[s]).nonzero().reshape(-1)
            pairs.append(torch.stack([members, j_idx[s].expand_as(members)], 1))
    return torch.cat(pairs)


def large_output_pairs(lp: torch.Tensor, inputs: list) -> list:
    """Per input, ``(m, 2)`` (event, element) pairs with a non-zero gradient, for a site whose
    dense Jacobian would be expensive. Small inputs: forward mode, one pass per element.
    Large inputs: compressed reverse mode (:func:`compressed_reverse_pairs`); dense as a fallback."""
    R = lp.numel()
    few = 2 * math.isqrt(R) + 2
    result: list = [None] * len(inputs)
    forward_ids = [i for i, x in enumerate(inputs) if x.numel() <= few]
    rest = [i for i in range(len(inputs)) if i not in forward_ids]
    if forward_ids:
        cols = forward_nonzero(lp, [inputs[i] for i in forward_ids])
        if cols is None:
            rest = list(range(len(inputs)))
        else:
            for i, nz in zip(forward_ids, cols):
                result[i] = nz.nonzero()
    for i in rest:
        x = inputs[i]
        pairs = compressed_reverse_pairs(lp, x) if x.numel() > few else None
        if pairs is None:
            dense = forward_nonzero(lp, [x]) if x.numel() < R else None
            if dense is None:
                eye = lp.new_zeros(R, R)
                eye.fill_diagonal_(1)
                dense = reverse_nonzero(lp, [x], eye)
            pairs = dense[0].nonzero()
        result[i] = pairs
    return result



def accumulate_sparsity(outputs: dict, parents: dict, values: dict, masks: dict) -> None:
    """Accumulate into ``masks[(d, u)]`` (a :class:`PairMask` of shape ``(outputs[d].numel(),
    values[u].numel())``) the non-zero entries of ``d outputs[d] / d values[u]`` for every
    ``u`` in ``parents[d]``.

    ``outputs``: key -> output tensor (any shape, read flat); ``values``: key -> input leaf
    with ``requires_grad``. Keys of outputs and inputs share one namespace: an output whose key
    is also an input key is taken to depend on that input (a site's log density depends on its
    own value), so it never shares a pass with an output differentiated with respect to it.
    Outputs with at most ``LARGE_OUTPUT`` elements share batched reverse passes (one row per
    element, outputs with disjoint inputs together); larger ones use
    :func:`large_output_pairs`.
    """
    small = []
    for d, out in outputs.items():
        if out.numel() > LARGE_OUTPUT:
            inputs = [values[u] for u in parents[d]]
            for u, pairs in zip(parents[d], large_output_pairs(out.reshape(-1), inputs)):
                masks[(d, u)].add_pairs(pairs)
        else:
            small.append(d)
    reach = {d: list(parents[d]) + [d] for d in small}
    for klass in colour_classes(small, reach):
        _shared_reverse_pass(klass, outputs, parents, values, masks)


def _shared_reverse_pass(klass: list, outputs: dict, parents: dict, values: dict, masks: dict) -> None:
    """Row-by-row reverse passes shared by the outputs of one colour class."""
    inputs_keys = list(dict.fromkeys(u for d in klass for u in parents[d]))
    inputs = [values[u] for u in inputs_keys]
    where = {u: i for i, u in enumerate(inputs_keys)}
    flat = [outputs[d].reshape(-1) for d in klass]
    n_rows = max(lp.numel() for lp in flat)
    width = max(sum(x.numel() for x in inputs), sum(lp.numel() for lp in flat), 1)
    chunk = max(1, min(n_rows, _JACOBIAN_CHUNK // width))
    batched = n_rows > 1
    for row0 in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - row0)
        grad_outputs = []
        for lp in flat:
            if batched:
                g = lp.new_zeros(rows, lp.numel())
                k = torch.arange(row0, min(row0 + rows, lp.numel()))
                g[k - row0, k] = 1
            else:
                g = torch.ones_like(lp)
            grad_outputs.append(g)
        grads = _batched_grads(flat, inputs, grad_outputs, batched)
        for d, lp in zip(klass, flat):
            valid = min(rows, lp.numel() - row0)
            if valid <= 0:
                continue
            for u in parents[d]:
                g = grads[where[u]]
                if g is not None:
                    nonzero = (g.detach().reshape(rows if batched else 1, -1) != 0)[:valid].cpu()
                    masks[(d, u)].add(row0, nonzero)
