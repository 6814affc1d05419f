"""CausalFlow: interventions and counterfactuals against closed forms, a nonlinear SCM and poutine.do."""

import networkx as nx
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct.density import CausalFlow

# a -> b -> c, a -> c, linear-Gaussian with unequal noise scales
W_BA, W_CB, W_CA = 1.5, -2.0, 0.5
MU_A, C_B, C_C = 1.0, 0.5, -1.0


def _linear_scm(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = MU_A + 0.8 * torch.randn(n, generator=g)
    b = C_B + W_BA * a + 0.5 * torch.randn(n, generator=g)
    c = C_C + W_CB * b + W_CA * a + 0.3 * torch.randn(n, generator=g)
    return {"a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def linear_flow():
    torch.manual_seed(0)
    graph = nx.DiGraph([("a", "b"), ("b", "c"), ("a", "c")])
    return CausalFlow(graph, num_layers=1, hidden_sizes=(16,)).fit(
        _linear_scm(1000, 0), num_steps=800, batch_size=250, lr=1e-2, validation=0.0, progress=False)


def test_interventional_means_match_the_closed_form(linear_flow):
    torch.manual_seed(1)
    s = linear_flow.intervene({"b": 2.0}).sample(20000)
    assert torch.all(s["b"] == 2.0)
    assert float(s["a"].mean()) == pytest.approx(MU_A, abs=0.06)  # upstream: unchanged
    assert float(s["c"].mean()) == pytest.approx(C_C + W_CB * 2.0 + W_CA * MU_A, abs=0.1)
    # the direct and total effects of a on c under do(a): W_CA + W_CB * W_BA per unit
    ate = linear_flow.ate("a", (0.5, 1.5), "c", num_samples=20000)
    assert float(ate) == pytest.approx(W_CA + W_CB * W_BA, abs=0.15)


def test_counterfactuals_match_the_closed_form(linear_flow):
    factual = _linear_scm(200, 5)
    cf = linear_flow.counterfactual(factual, {"b": 0.0})
    # same noise: a unchanged, b set, c shifted by W_CB * (0 - b)
    assert torch.allclose(cf["a"], factual["a"], atol=1e-4)
    assert torch.all(cf["b"] == 0.0)
    expected = factual["c"] + W_CB * (0.0 - factual["b"])
    rmse = float(((cf["c"] - expected) ** 2).mean().sqrt())
    assert rmse < 0.1, rmse  # c has scale ~ 3 here
    # per-row values; an intervention on the same values is the identity
    same = linear_flow.counterfactual(factual, {"b": factual["b"]})
    assert torch.allclose(same["c"], factual["c"], atol=1e-3)


def test_nonlinear_additive_noise_counterfactuals_are_recovered():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    n = 1000
    x = torch.randn(n, generator=g)
    noise_y = 0.3 * torch.randn(n, generator=g)
    y = torch.sin(2 * x) + x + noise_y
    z = 0.5 * y**2 + 0.2 * torch.randn(n, generator=g)
    flow = CausalFlow(nx.DiGraph([("x", "y"), ("y", "z")]), num_layers=1, hidden_sizes=(32, 32))
    flow.fit({"x": x, "y": y, "z": z}, num_steps=1200, batch_size=250, lr=5e-3, validation=0.0, progress=False)
    cf = flow.counterfactual({"x": x[:300], "y": y[:300], "z": z[:300]}, {"x": 0.5})
    truth = torch.sin(torch.tensor(1.0)) + 0.5 + noise_y[:300]
    keep = (x[:300].abs() < 2)  # abduction is only as good as the fit where data are
    rmse = float(((cf["y"] - truth)[keep] ** 2).mean().sqrt())
    assert rmse < 0.15, rmse  # the spread of y | do(x = 0.5) is 0.3


def test_unknown_intervened_node_is_named(linear_flow):
    with pytest.raises(ValueError, match="'q'"):
        linear_flow.intervene({"q": 1.0})
    with pytest.raises(ValueError, match="'zz'"):
        linear_flow.ate("a", (0.0, 1.0), "zz")


def _pyro_model():
    u = pyro.sample("u", dist.Normal(0.0, 1.0))
    v = pyro.sample("v", dist.Normal(torch.tanh(2 * u) + 0.5 * u, 0.4))
    pyro.sample("w", dist.Normal(1.0 - v, 0.3))


def test_from_model_answers_like_poutine_do_on_the_true_model():
    torch.manual_seed(4)
    flow = CausalFlow.from_model(_pyro_model, num_layers=1, hidden_sizes=(32,))
    assert flow.names == ["u", "v", "w"]
    assert flow.adjacency.tolist() == [[False] * 3, [True, False, False], [False, True, False]]
    with pyro.plate("rows", 1000):
        data = pyro.poutine.trace(_pyro_model).get_trace()
    flow.fit({k: data.nodes[k]["value"] for k in "uvw"}, num_steps=800, batch_size=250, lr=5e-3, validation=0.0,
             progress=False)
    intervened = pyro.poutine.do(_pyro_model, data={"u": torch.tensor(1.0)})
    with pyro.plate("rows", 20000):
        true = pyro.poutine.trace(intervened).get_trace()
    fitted = flow.intervene({"u": 1.0}).sample(20000)
    for k in "vw":
        assert float(fitted[k].mean()) == pytest.approx(float(true.nodes[k]["value"].mean()), abs=0.08)
        assert float(fitted[k].std()) == pytest.approx(float(true.nodes[k]["value"].std()), rel=0.15)
