"""learn_structure: a graphical normalizing flow with a NOTEARS constraint recovers small DAGs."""

import pytest
import torch

from pyro_struct.structure_learning import acyclicity, break_cycles, learn_structure

FAST = dict(steps_per_round=200, max_rounds=6, seed=0)


def _anm(kind: str, n: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, generator=g)  # noqa: E731
    if kind == "chain":  # x0 -> x1 -> x2
        x0 = r(); x1 = torch.sin(2 * x0) + 0.3 * r(); x2 = 2 * torch.tanh(1.5 * x1) + 0.3 * r()
    else:  # collider x0 -> x2 <- x1
        x0 = r(); x1 = r(); x2 = torch.sin(2 * x0) + 0.5 * x1**2 + 0.3 * r()
    return torch.stack([x0, x1, x2], -1)


@pytest.mark.parametrize("kind,edges", [("chain", {(1, 0), (2, 1)}), ("collider", {(2, 0), (2, 1)})])
def test_recovers_a_nonlinear_additive_noise_chain_and_collider(kind, edges):
    A = learn_structure(_anm(kind), **FAST)
    assert A.dtype == torch.bool and A.shape == (3, 3)
    assert {tuple(e) for e in torch.nonzero(A).tolist()} == edges


def test_acyclicity_is_zero_exactly_on_dags():
    dag = torch.tensor([[0.0, 0, 0], [0.7, 0, 0], [0.2, 1.3, 0]])
    assert float(acyclicity(dag)) == pytest.approx(0.0, abs=1e-6)
    cyc = dag.clone(); cyc[0, 2] = 0.5
    assert float(acyclicity(cyc)) > 1e-3


def test_break_cycles_drops_the_weakest_edge_of_each_cycle():
    keep = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)  # 0 -> 1 -> 2 -> 0
    strength = torch.tensor([[0, 0, 0.2], [0.9, 0, 0], [0, 0.8, 0]])
    A = break_cycles(strength, keep)
    assert A.tolist() == [[False] * 3, [True, False, False], [False, True, False]]


def test_bad_data_is_refused_with_the_row_count():
    X = _anm("chain", 50)
    X[[3, 7], 1] = float("nan")
    with pytest.raises(ValueError, match="2 row"):
        learn_structure(X, **FAST)


def test_structural_hamming_distance_counts_missing_extra_and_reversed_edges_once():
    from benchmarks.density import shd

    true = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)  # 0 -> 1 -> 2
    assert shd(true, true) == 0
    reversed_ = true.T.clone()
    assert shd(reversed_, true) == 2
    extra = true.clone(); extra[2, 0] = True
    assert shd(extra, true) == 1
    assert shd(torch.zeros(3, 3, dtype=torch.bool), true) == 2
