"""DensityFlow: fit on data with a known, dense or learned DAG; log_prob, sample, save/load, errors."""

import math

import networkx as nx
import pytest
import torch

from pyro_struct.density import DensityFlow, parse_graph
from pyro_struct.models import LinearGaussianNetwork

SMALL = dict(num_layers=1, hidden_sizes=(16,))


def _gaussian_data(n=600, seed=0):
    net = LinearGaussianNetwork.random(4, seed=seed)
    data = net.sample_joint(n, torch.Generator().manual_seed(seed))
    return net, data


def test_log_prob_is_in_data_units_and_close_to_the_true_density():
    torch.manual_seed(0)
    net, data = _gaussian_data()
    graph = nx.DiGraph()
    graph.add_nodes_from(net.site_names[v] for v in net.order)
    graph.add_edges_from((net.site_names[p], net.site_names[c]) for p, c in net.graph.edges)
    flow = DensityFlow(graph, **SMALL).fit(data, num_steps=600, batch_size=200, lr=1e-2, progress=False)
    # the affine StrAF represents a linear-Gaussian network exactly: held-out NLL near the truth
    test = net.sample_joint(2000, torch.Generator().manual_seed(99))
    X = torch.stack([test[net.site_names[v]] for v in net.order], -1).double()
    true = torch.distributions.MultivariateNormal(net.joint_mean, net.joint_cov).log_prob(X)
    fitted = flow.log_prob(test)
    assert fitted.shape == (2000,)
    assert float((true - fitted.double()).mean()) < 0.1 * 4  # nats per row, well under 0.1 per dimension
    # rescaling the data by c lowers the density by log|c| per column: log_prob is in data units
    scaled = DensityFlow(graph, **SMALL)
    scaled.loc, scaled.scale = flow.loc * 10, flow.scale * 10
    scaled.flow.load_state_dict(flow.flow.state_dict())
    ten = {k: 10 * v for k, v in test.items()}
    assert torch.allclose(scaled.log_prob(ten), fitted - 4 * math.log(10), atol=1e-4)
    samples = flow.sample(5000)
    assert set(samples) == set(flow.names) and samples[flow.names[0]].shape == (5000,)
    for i, v in enumerate(net.order):
        assert float(samples[net.site_names[v]].mean()) == pytest.approx(float(net.joint_mean[i]), abs=0.15 * float(net.joint_cov[i, i].sqrt()) + 0.05)


def test_save_load_round_trip_gives_the_same_density(tmp_path):
    torch.manual_seed(1)
    A = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    X = torch.randn(300, 3) @ torch.tensor([[1.0, 0.5, 0.2], [0, 1, 0.3], [0, 0, 1]])
    flow = DensityFlow(A, flow="dense", normalizer="spline", **SMALL).fit(X, num_steps=50, progress=False)
    path = tmp_path / "flow.pt"
    flow.save(path)
    back = DensityFlow.load(path)
    assert back.names == flow.names and back.flow_kind == "dense"
    assert torch.equal(back.adjacency, flow.adjacency)
    assert torch.allclose(back.log_prob(X), flow.log_prob(X))
    assert isinstance(back.sample(3), torch.Tensor) and back.sample(3).shape == (3, 3)


def test_the_flow_follows_the_dag_in_a_topological_order():
    # the user's columns are not in topological order: c -> a -> b
    graph = nx.DiGraph([("c", "a"), ("a", "b")])
    graph.add_nodes_from(["a", "b", "c"])
    flow = DensityFlow(graph, **SMALL)
    assert [flow.names[i] for i in flow.order] == ["c", "a", "b"]
    assert flow.flow.adjacency.tolist() == [[False] * 3, [True, False, False], [False, True, False]]
    dense = DensityFlow(graph, flow="dense", **SMALL)
    assert int(dense.flow.adjacency.sum()) == 3


def test_learned_graph_is_a_dag_over_the_dict_columns():
    torch.manual_seed(2)
    x = torch.randn(400)
    data = {"x": x, "y": torch.sin(2 * x) + 0.3 * torch.randn(400)}
    flow = DensityFlow("learn", structure_options=dict(steps_per_round=100, max_rounds=4), **SMALL)
    flow.fit(data, num_steps=100, progress=False)
    assert flow.names == ["x", "y"]
    assert flow.adjacency.tolist() == [[False, False], [True, False]]
    assert torch.isfinite(flow.log_prob(data)).all()


def test_a_cycle_is_refused_and_named():
    g = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a")])
    with pytest.raises(ValueError, match="cycle a -> b -> c -> a|cycle b -> c -> a -> b|cycle c -> a -> b -> c"):
        DensityFlow(g)
    with pytest.raises(ValueError, match="cycle"):
        parse_graph(torch.tensor([[0, 1], [1, 0]]), names=["u", "v"])


def test_bad_data_errors_name_the_node_and_count_the_rows():
    flow = DensityFlow(nx.DiGraph([("a", "b")]), **SMALL)
    with pytest.raises(ValueError, match="'b'"):
        flow.fit({"a": torch.randn(10)}, num_steps=1, progress=False)
    data = {"a": torch.randn(10), "b": torch.randn(10)}
    data["a"][[1, 4, 5]] = float("nan")
    with pytest.raises(ValueError, match="3 row"):
        flow.fit(data, num_steps=1, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        flow.log_prob({"a": torch.randn(3), "b": torch.randn(3)})
    with pytest.raises(ValueError, match="shape"):
        DensityFlow(torch.zeros(2, 3))


def test_load_refuses_a_file_that_is_not_a_density_flow(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="DensityFlow"):
        DensityFlow.load(path)


def test_fit_arguments_are_checked_by_name():
    flow = DensityFlow(nx.DiGraph([("a", "b")]), **SMALL)
    data = {"a": torch.randn(10), "b": torch.randn(10)}
    with pytest.raises(ValueError, match="validation"):
        flow.fit(data, validation=1.5, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        flow.fit(data, batch_size=0, progress=False)
