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
