"""Tests of the Jacobian-sparsity engine on plain torch functions (no Pyro), against the zero
pattern of ``torch.autograd.functional.jacobian``."""

import pytest
import torch

from pyro_struct.trace import sparsity
from pyro_struct.trace.sparsity import (
    LARGE_OUTPUT,
    PairMask,
    accumulate_sparsity,
    colour_classes,
    compressed_reverse_pairs,
    forward_nonzero,
    large_output_pairs,
)


def leaf(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)


def true_pattern(f, *xs):
    """``[(R, n_i) bool]``: where the exact Jacobian of ``f`` is non-zero, per input."""
    jac = torch.autograd.functional.jacobian(f, tuple(x.detach() for x in xs))
    R = f(*xs).numel()
    return [j.reshape(R, -1) != 0 for j in jac]


def dense(pairs, shape):
    out = torch.zeros(shape, dtype=torch.bool)
    out[pairs[:, 0], pairs[:, 1]] = True
    return out


def engine_pattern(f, *xs):
    """The engine's answer for one output ``f(*xs)``, as dense bool matrices per input."""
    y = f(*xs)
    keys = [f"x{i}" for i in range(len(xs))]
    masks = {("y", k): PairMask(y.numel(), x.numel()) for k, x in zip(keys, xs)}
    accumulate_sparsity({"y": y}, {"y": keys}, dict(zip(keys, xs)), masks)
    return [dense(masks[("y", k)].pairs(), (y.numel(), x.numel())) for k, x in zip(keys, xs)]


def banded(x, width=2):
    out = x.clone()
    for k in range(1, width + 1):
        out = out + torch.roll(x, k) * 0.5 ** k  # circulant band
    return torch.tanh(out)


def diagonal(x):
    return torch.sin(x) * 3


def dense_map(x):
    return torch.tanh(x.cumsum(0) + x.sum())


def lower_triangular(x):
    return x.cumsum(0)


def few_nonzeros(x):
    # a small output reading a handful of entries of a large input
    idx = torch.tensor([3, 500, 999])
    return torch.stack([x[idx[0]] * x[idx[1]], x[idx[2]] ** 2, x[idx[0]] + 1.0])


@pytest.mark.parametrize("n", [7, LARGE_OUTPUT + 57])  # small: row passes; large: the large-output methods
@pytest.mark.parametrize("f", [banded, diagonal, dense_map, lower_triangular])
def test_single_output_matches_true_sparsity(f, n):
    x = leaf(n)
    (got,) = engine_pattern(f, x)
    (want,) = true_pattern(f, x)
    assert torch.equal(got, want)


def test_large_input_with_few_nonzeros():
    x = leaf(1000)
    (got,) = engine_pattern(few_nonzeros, x)
    (want,) = true_pattern(few_nonzeros, x)
    assert torch.equal(got, want) and int(got.sum()) == 4


def test_two_inputs_of_different_sizes():
    # a large output with one small input (forward columns) and one large input (compressed reverse)
    def f(a, b):
        return torch.exp(a[0]) * b + a[1] * torch.roll(b, 1)

    a, b = leaf(2, 1), leaf(3 * LARGE_OUTPUT, 2)
    got = engine_pattern(f, a, b)
    want = true_pattern(f, a, b)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_shared_passes_keep_outputs_apart():
    # y1 and y2 read disjoint inputs, so they share passes; y3 reads both and must not mix with them
    x1, x2 = leaf(5, 1), leaf(5, 2)
    outs = {"y1": torch.sin(x1) * torch.roll(x1, 1), "y2": x2.cumsum(0), "y3": x1 * x2.flip(0)}
    parents = {"y1": ["x1"], "y2": ["x2"], "y3": ["x1", "x2"]}
    values = {"x1": x1, "x2": x2}
    masks = {(d, u): PairMask(5, 5) for d, us in parents.items() for u in us}
    accumulate_sparsity(outs, parents, values, masks)
    fns = {
        "y1": lambda a, b: torch.sin(a) * torch.roll(a, 1),
        "y2": lambda a, b: b.cumsum(0),
        "y3": lambda a, b: a * b.flip(0),
    }
    for d, us in parents.items():
        want = dict(zip(["x1", "x2"], true_pattern(fns[d], x1, x2)))
        for u in us:
            assert torch.equal(dense(masks[(d, u)].pairs(), (5, 5)), want[u]), (d, u)


def test_colour_classes_have_disjoint_reach():
    reach = {0: [0, 5], 1: [1, 5], 2: [2, 6], 3: [3, 5, 6], 4: [4]}
    classes = colour_classes(list(reach), reach)
    assert sorted(d for c in classes for d in c) == list(reach)
    for klass in classes:
        seen = [u for d in klass for u in reach[d]]
        assert len(seen) == len(set(seen))
    assert len(classes) == 3  # 0, 1 and 3 pairwise share input 5


def test_forward_columns_and_compressed_rows_agree_with_jacobian():
    x = leaf(LARGE_OUTPUT + 40)
    y = banded(x, width=3)
    (want,) = true_pattern(lambda v: banded(v, 3), x)
    (cols,) = forward_nonzero(y, [x])
    assert torch.equal(cols, want)
    pairs = compressed_reverse_pairs(y, x)
    assert pairs is not None and torch.equal(dense(pairs, want.shape), want)


def test_compressed_rows_refuse_a_dense_jacobian():
    x = leaf(LARGE_OUTPUT + 40)
    assert compressed_reverse_pairs(dense_map(x), x) is None
    (pairs,) = large_output_pairs(dense_map(x), [x])  # falls back to an exact dense method
    assert torch.equal(dense(pairs, (x.numel(), x.numel())), true_pattern(dense_map, x)[0])


def test_pair_mask_sparse_storage_matches_dense(monkeypatch):
    idx = torch.tensor([[0, 1], [2, 3], [0, 1]])
    rows = torch.zeros(2, 4, dtype=torch.bool)
    rows[1, 2] = True
    stored = []
    for limit in (10**6, 0):  # dense matrix, then index pieces
        monkeypatch.setattr(sparsity, "_DENSE_MASK_LIMIT", limit)
        mask = PairMask(3, 4)
        mask.add_pairs(idx)
        mask.add(1, rows)  # rows 1, 2: entry (2, 2)
        stored.append(mask.pairs().tolist())
    assert stored[0] == stored[1] == [[0, 1], [2, 2], [2, 3]]
