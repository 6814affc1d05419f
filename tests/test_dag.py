"""Tests for pyro_struct.dag: levels, depth and transitive closure against networkx."""

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_struct import dag
from pyro_struct.flows import transitive_closure as reexported
from tests.flow_properties import dag_from_adjacency, random_dag_adjacency


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 12), c=st.integers(0, 3), p=st.sampled_from([0.0, 0.2, 0.6]), seed=st.integers(0, 9999))
def test_levels_depth_and_closure_match_networkx(d, c, p, seed):
    A = random_dag_adjacency(d, c, p=p, seed=seed)
    g = dag_from_adjacency(A)  # input index -> latent index
    latent = g.subgraph(range(d))
    expected_level = {i: max((len(path) - 1 for r in range(d) for path in nx.all_simple_paths(latent, r, i)),
                             default=0) for i in range(d)}
    assert dag.node_levels_of(A) == [expected_level[i] for i in range(d)]
    assert dag.depth(A) == nx.dag_longest_path_length(latent)
    groups = dag.levels(A)
    assert len(groups) == dag.depth(A) + 1
    assert sorted(torch.cat(groups).tolist()) == list(range(d))
    for k, level in enumerate(groups):
        for i in level.tolist():
            assert expected_level[i] == k
            # every parent lies in an earlier level, so one pass per level suffices
            assert all(expected_level[j] < k for j in torch.nonzero(A[i, :d]).flatten().tolist())
    C = dag.transitive_closure(A)
    strict = dag.transitive_closure(A, reflexive=False)
    for i in range(d):
        ancestors = nx.ancestors(g, i)
        assert set(torch.nonzero(strict[i]).flatten().tolist()) == ancestors
        assert set(torch.nonzero(C[i]).flatten().tolist()) == ancestors | {i}
    assert torch.equal(reexported(A), C)


def test_node_levels_on_parent_lists_and_errors():
    assert dag.node_levels([[], [0], [0, 1], [], [3, 0]]) == [0, 1, 2, 0, 1]
    assert dag.node_levels([]) == []
    with pytest.raises(ValueError, match="topological order"):
        dag.node_levels([[1], []])
    with pytest.raises(ValueError, match="shape"):
        dag.depth(torch.zeros(3, 2, dtype=torch.bool))
    upper = torch.zeros(2, 2, dtype=torch.bool)
    upper[0, 1] = True
    with pytest.raises(ValueError, match="lower-triangular"):
        dag.transitive_closure(upper)
    assert dag.levels(torch.zeros(0, 0, dtype=torch.bool)) == []


def _propagation_levels_networkx(A: torch.Tensor) -> list[int]:
    """An independent statement of the propagation level: 1 where a latent's parents (latent and
    context) include all its ancestors, else one more than its deepest parent's level."""
    d = A.shape[0]
    g = dag_from_adjacency(A)
    level: dict[int, int] = {}
    for i in nx.topological_sort(g.subgraph(range(d))):
        preds = set(g.predecessors(i))
        latent_parents = [p for p in preds if p < d]
        if nx.ancestors(g, i) <= preds or not latent_parents:
            level[i] = 1
        else:
            level[i] = 1 + max(level[p] for p in latent_parents)
    return [level[i] for i in range(d)]


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 10), c=st.integers(0, 3), p=st.sampled_from([0.2, 0.5, 1.0]), seed=st.integers(0, 9999))
def test_propagation_depth_matches_an_independent_statement(d, c, p, seed):
    A = random_dag_adjacency(d, c, p=p, seed=seed)
    assert dag.propagation_depth(A) == max(_propagation_levels_networkx(A))
    # never more than the longest input-to-latent path; 1 for a complete DAG with context everywhere
    assert dag.propagation_depth(A) <= dag.depth(A) + 1


def test_propagation_depth_of_chains_complete_dags_and_the_empty_graph():
    chain = torch.zeros(6, 7, dtype=torch.bool)
    chain[0, 6] = True
    for i in range(1, 6):
        chain[i, i - 1] = True
    assert dag.propagation_depth(chain) == 6  # x -> z0 -> ... -> z5: every edge must be walked
    complete = torch.ones(6, 7, dtype=torch.bool)
    complete[:, :6] = torch.tril(complete[:, :6], -1)
    assert dag.propagation_depth(complete) == 1  # every latent sees all its ancestors directly
    assert dag.propagation_depth(torch.zeros(0, 2, dtype=torch.bool)) == 0
