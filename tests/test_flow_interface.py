"""The interface every flow family shares (masks, parameter counts, passes, last_stats, validation)."""

import pytest
import torch

from pyro_struct import dag
from pyro_struct.flows import GraphicalResidualFlow, StrAF, StructuredCNF
from tests.flow_properties import check_interface, random_dag_adjacency


def _families(A, c):
    return {
        "straf": (StrAF(A, context_dim=c, num_layers=2, hidden_sizes=(8,)), 2 * (dag.depth(A) + 1)),
        "grf": (GraphicalResidualFlow(A, context_dim=c, num_layers=3, hidden_sizes=(8,)), 3),
        "cnf": (StructuredCNF(A, context_dim=c, hidden_sizes=(8,), rtol=1e-4, atol=1e-4), None),
    }


@pytest.mark.parametrize("family", ["straf", "grf", "cnf"])
@pytest.mark.parametrize("c, seed", [(0, 0), (2, 1)])
def test_every_family_declares_the_same_interface(family, c, seed):
    A = random_dag_adjacency(5, c, p=0.5, seed=seed)
    torch.manual_seed(seed)
    flow, passes = _families(A, c)[family]
    check_interface(flow.double(), passes)


def test_the_option_names_converge():
    A = random_dag_adjacency(4, 1, p=0.5, seed=2)
    for cls in (StrAF, GraphicalResidualFlow):
        flow = cls(A, context_dim=1, num_layers=2, hidden_sizes=(6,), mask_method="made")
        assert flow.num_layers == 2
    made = StructuredCNF(A, context_dim=1, hidden_sizes=(6,), mask_method="made")
    greedy = StructuredCNF(A, context_dim=1, hidden_sizes=(6,), mask_method="greedy")
    assert made.method == greedy.method == "dopri5"  # `method` stays the ODE solver
    assert made.masks.keys() == greedy.masks.keys()
    for cls in (StrAF, GraphicalResidualFlow):
        with pytest.raises(TypeError):
            cls(A, context_dim=1, method="made")
