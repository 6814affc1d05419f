"""Tests for the StrNN mask factorisation (greedy and MADE baseline) and path counting."""

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_struct.masks import (
    _LabelPaths,
    _labels,
    check_masks,
    count_paths,
    factorize,
    mask_product,
    minimum_widths,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def adjacencies(draw, max_d=60):
    """A random flow-style adjacency ``(d, d + c)``: strictly lower-triangular latents plus context."""
    d = draw(st.integers(1, max_d))
    c = draw(st.integers(0, 5))
    p = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(d, d + c, generator=g) < p
    A[:, :d] = torch.tril(A[:, :d], -1)
    return A


@st.composite
def adjacency_and_widths(draw, max_d=60):
    A = draw(adjacencies(max_d))
    r = minimum_widths(A, 1)
    num_hidden = draw(st.integers(1, 3))
    # widths at the minimum, a little above (partial cycles, where the methods differ) or multiples
    widths = [draw(st.sampled_from([r, r + 1, r + draw(st.integers(0, 2 * r + 3)), 2 * r, 3 * r + 1])) for _ in range(num_hidden)]
    return A, widths


def _exact(masks, A):
    return torch.equal(mask_product(masks) > 0, A)


@SETTINGS
@given(adjacency_and_widths(), st.sampled_from(["greedy", "made"]))
def test_mask_product_has_exactly_the_zero_pattern_of_A(aw, method):
    A, widths = aw
    masks = factorize(A, widths, method=method)
    assert [tuple(m.shape) for m in masks] == list(
        zip(widths + [A.shape[0]], [A.shape[1]] + widths)
    ), "masks must be shaped like nn.Linear.weight"
    assert all(m.dtype == torch.bool for m in masks)
    P = mask_product(masks) > 0
    assert not (P & ~A).any(), "spurious connection"
    assert not (A & ~P).any(), "missing connection"


@SETTINGS
@given(adjacency_and_widths())
def test_greedy_never_has_fewer_paths_than_made(aw):
    A, widths = aw
    greedy = count_paths(factorize(A, widths, method="greedy"))
    made = count_paths(factorize(A, widths, method="made"))
    assert greedy >= made


@SETTINGS
@given(adjacencies(), st.integers(1, 3), st.integers(1, 5))
def test_too_narrow_layer_raises_or_widens(A, num_hidden, deficit):
    r = len(_labels(A))
    if r <= 1:
        return  # no width below the minimum of 1
    narrow = max(1, r - deficit)
    widths = [r] * num_hidden
    layer = num_hidden - 1
    widths[layer] = narrow
    with pytest.raises(ValueError, match=rf"at least {r} units"):
        factorize(A, widths)
    with pytest.warns(UserWarning, match="widened"):
        masks = factorize(A, widths, widen=True)
    assert masks[layer].shape[0] == r, "widening goes to the minimum width exactly"
    assert _exact(masks, A)


def test_minimum_width_is_exactly_sufficient():
    g = torch.Generator().manual_seed(3)
    A = torch.tril(torch.rand(30, 30, generator=g) < 0.3, -1)
    r = minimum_widths(A, 2)
    assert r == len({tuple(row.tolist()) for row in A if row.any()})
    assert _exact(factorize(A, [r, r]), A)
    with pytest.raises(ValueError, match=str(r)):
        factorize(A, [r, r - 1])


@pytest.mark.parametrize("hidden", [[], [3], [4, 2, 5]])
def test_all_zero_adjacency(hidden):
    A = torch.zeros(4, 6, dtype=torch.bool)
    masks = factorize(A, hidden)
    assert len(masks) == len(hidden) + 1
    assert masks[0].shape[1] == 6 and masks[-1].shape[0] == 4
    assert not mask_product(masks).any()
    assert count_paths(masks) == 0


def test_no_hidden_layer_returns_A():
    A = torch.tensor([[0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    (mask,) = factorize(A, [])
    assert torch.equal(mask, A)


@SETTINGS
@given(adjacency_and_widths(max_d=25), st.sampled_from(["greedy", "made"]))
def test_count_paths_is_the_sum_of_the_mask_product(aw, method):
    A, widths = aw
    masks = factorize(A, widths, method=method)
    assert count_paths(masks) == int(mask_product(masks).sum())


def _exhaustive_best_single_layer(A, h):
    """Most paths over every way of giving the units beyond whole cycles to distinct labels."""
    labels = _labels(A)
    r = len(labels)
    paths = _LabelPaths(labels, A)
    best = 0.0
    for extra in itertools.combinations(range(r), h % r):
        n = torch.full((r,), float(h // r), dtype=torch.float64)
        n[list(extra)] += 1
        best = max(best, paths.total([n]))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_for_one_hidden_layer(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.tril(torch.rand(8, 8, generator=g) < 0.5, -1)
    r = minimum_widths(A, 1)
    h = r + r // 2
    masks = factorize(A, [h])
    # the best balanced assignment, or the paper's cycle over repeated rows when that has more paths
    assert count_paths(masks) >= _exhaustive_best_single_layer(A, h)
    assert count_paths(masks) == max(_exhaustive_best_single_layer(A, h), _paper_paths_if_exact(A, [h]))


def _unit_labels(masks):
    """Label (input set) of every hidden unit: a unit's label is the union of its predecessors'."""
    labels = [masks[0]]
    for m in masks[1:-1]:
        labels.append((m.double() @ labels[-1].double()) > 0)
    return labels


@pytest.mark.parametrize("method", ["greedy", "made"])
def test_label_level_path_count_matches_the_masks(method):
    # the greedy optimises a path count computed on labels; it must equal the count on units
    g = torch.Generator().manual_seed(1)
    A = torch.tril(torch.rand(12, 12, generator=g) < 0.4, -1)
    labels = _labels(A)
    r = len(labels)
    widths = [r + 2, 2 * r - 1, r + 5]
    masks = factorize(A, widths, method=method)
    rows = [tuple(row.tolist()) for row in labels]
    counts = []
    for unit_labels in _unit_labels(masks):
        idx = torch.tensor([rows.index(tuple(u.tolist())) for u in unit_labels])
        counts.append(torch.bincount(idx, minlength=r).double())
    assert [int(c.sum()) for c in counts] == widths
    assert all((c >= 1).all() for c in counts), "every label must occur in every layer"
    assert _LabelPaths(labels, A).total(counts) == count_paths(masks)


def test_greedy_adds_paths_on_a_random_dag():
    g = torch.Generator().manual_seed(0)
    A = torch.tril(torch.rand(50, 50, generator=g) < 0.3, -1)
    r = minimum_widths(A, 2)
    widths = [r + r // 2] * 2
    greedy = count_paths(factorize(A, widths, method="greedy"))
    made = count_paths(factorize(A, widths, method="made"))
    assert greedy > 1.05 * made


def test_methods_agree_on_whole_cycles():
    g = torch.Generator().manual_seed(2)
    A = torch.tril(torch.rand(20, 20, generator=g) < 0.3, -1)
    r = minimum_widths(A, 2)
    widths = [2 * r, 3 * r]
    # no free units: the balanced assignment is MADE's, so greedy is MADE or the paper's masks
    greedy = count_paths(factorize(A, widths, method="greedy"))
    assert greedy == max(count_paths(factorize(A, widths, method="made")), _paper_paths_if_exact(A, widths))


def test_made_baseline_cycles_lexicographically():
    A = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    masks = factorize(A, [4], method="made")
    # torch.unique order of the distinct non-zero rows: (0,1,0), (1,0,0), (1,1,0); unit 3 wraps
    assert masks[0].int().tolist() == [[0, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    greedy = factorize(A, [4], method="greedy")
    # the leftover unit goes to the row with most paths: (1,1,0) adds 2 paths, the others 1 x 2
    assert count_paths(greedy) >= count_paths(masks)


def test_check_masks_detects_both_directions():
    A = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    ok = factorize(A, [2])
    check_masks(ok, A)
    spurious = [ok[0].clone(), ok[1].clone()]
    spurious[0][:, 1] = True
    with pytest.raises(ValueError, match="forbids"):
        check_masks(spurious, A)
    missing = [ok[0].clone(), torch.zeros_like(ok[1])]
    with pytest.raises(ValueError, match="requires"):
        check_masks(missing, A)


def test_bad_arguments():
    A = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown factorisation method"):
        factorize(A, [2], method="exact")
    with pytest.raises(ValueError, match="positive"):
        factorize(A, [0])
    with pytest.raises(ValueError, match="2-D"):
        factorize(torch.ones(2, 2, 2), [2])


def test_factorize_accepts_int_adjacency_and_does_not_warn_when_wide_enough():
    A = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = factorize(A, [5, 5], widen=True)
    assert _exact(masks, A.bool())


# ------------------------------------------------- against the StrNN paper's greedy algorithm
def _strnn_paper_greedy(A, widths):
    """Chen et al. (2023), Algorithm 1, applied layer by layer, written independently of masks.py
    with Python sets: the hidden units copy the non-zero rows of the current target cyclically
    (repetitions included, in row order); ``M2[i][k] = 1`` iff row ``k`` of ``M1`` is a subset of
    the target's row ``i``; ``M2`` is the next target. Returns 0/1 nested lists ``(out, in)``-shaped
    per layer, or ``None`` when a target has no non-zero row."""
    target = [[bool(v) for v in row] for row in A.tolist()]
    masks = []
    for h in widths:
        nonzero = [row for row in target if any(row)]
        if not nonzero:
            return None
        M1 = [list(nonzero[k % len(nonzero)]) for k in range(h)]
        support = [{j for j, v in enumerate(row) if v} for row in M1]
        M2 = [[support[k] <= {j for j, v in enumerate(row) if v} for k in range(h)] for row in target]
        masks.append(M1)
        target = M2
    masks.append(target)
    return masks


def _paths_and_pattern(masks):
    """Total input-output paths and the (output, input) pattern of a list of nested-list masks."""
    counts = [[int(v) for v in row] for row in masks[0]]  # paths from input j into unit k
    for M in masks[1:]:
        counts = [[sum(int(M[i][k]) * counts[k][j] for k in range(len(M[i]))) for j in range(len(counts[0]))]
                  for i in range(len(M))]
    return sum(map(sum, counts)), [[c > 0 for c in row] for row in counts]


def _paper_paths_if_exact(A, widths):
    """Paths of the paper's greedy masks, or 0 where they are not exact."""
    masks = _strnn_paper_greedy(A, widths)
    if masks is None:
        return 0
    paths, pattern = _paths_and_pattern(masks)
    return paths if pattern == A.tolist() else 0


@settings(max_examples=60, deadline=None)
@given(adjacency_and_widths(max_d=16))
def test_greedy_keeps_at_least_the_paths_of_the_papers_greedy_and_of_made(aw):
    A, widths = aw
    ours = factorize(A, widths, method="greedy")
    assert _exact(ours, A)
    paths = count_paths(ours)
    assert paths >= count_paths(factorize(A, widths, method="made"))
    paper = _strnn_paper_greedy(A, [m.shape[0] for m in ours[:-1]])
    if paper is not None:
        paper_paths, pattern = _paths_and_pattern(paper)
        if pattern == A.tolist():  # the paper's masks are exact on this adjacency and widths
            assert paths >= paper_paths, (paths, paper_paths)


def test_repeated_rows_get_more_units_as_in_the_paper():
    # 6 outputs share one parent set and 1 output has another: on whole cycles the balanced
    # assignment gives both labels the same units, the paper's cycle over repeated rows gives
    # the shared pattern 6 of every 7 units, and the greedy keeps the better of the two
    A = torch.zeros(7, 4, dtype=torch.bool)
    A[:6, 0] = A[:6, 1] = True
    A[6, 2] = True
    widths = [14, 14]
    made = count_paths(factorize(A, widths, method="made"))
    paper_paths, pattern = _paths_and_pattern(_strnn_paper_greedy(A, widths))
    assert pattern == A.tolist() and paper_paths > made
    assert count_paths(factorize(A, widths)) == paper_paths


def test_paper_method_is_the_papers_algorithm_or_raises():
    g = torch.Generator().manual_seed(5)
    A = torch.tril(torch.rand(9, 9, generator=g) < 0.4, -1)
    widths = [12, 10]
    masks = factorize(A, widths, method="paper")
    assert [m.int().tolist() for m in masks] == [[[int(v) for v in row] for row in M]
                                                 for M in _strnn_paper_greedy(A, widths)]
    assert _exact(masks, A)
    # rows e0, e0, e1, e2, e3, e0 and 4 units (the minimum): the paper's cycle copies e0, e0, e1, e2
    # and misses e3, while the greedy's cycle over distinct rows is exact
    E = torch.eye(4, dtype=torch.bool)
    B = torch.cat([E[:1], E, E[:1]])
    with pytest.raises(ValueError, match="not exact"):
        factorize(B, [4], method="paper")
    assert _exact(factorize(B, [4]), B)
