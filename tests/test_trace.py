"""Tests of trace_model: exact scalar dependency structure of real Pyro models."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import pyro_struct as ps
from pyro_struct import trace as trace_module
from pyro_struct.trace import probe as probe_module
from pyro_struct.trace.sparsity import LARGE_OUTPUT
from pyro_struct.errors import ModelStructureError
from pyro_struct.trace import trace_model


def edges(bn):
    return set(bn.graph.edges)


# ----------------------------------------------------------------------------- models
def chain_model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    z3 = pyro.sample("z3", dist.Normal(torch.tanh(z2), 1.0))
    pyro.sample("x", dist.Normal(z3, 0.5), obs=torch.tensor(0.3))


def hmm_model(T):
    def model(x=None):
        z = pyro.sample("z_0", dist.Normal(0.0, 1.0))
        for t in range(T):
            if t > 0:
                z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z, 0.5))
            pyro.sample(f"x_{t}", dist.Normal(z, 0.5), obs=None if x is None else x[t])

    return model


def hmm_edges(T):
    out = {(f"z_{t}", f"x_{t}") for t in range(T)}
    return out | {(f"z_{t}", f"z_{t + 1}") for t in range(T - 1)}


def hierarchical_model(N):
    def model(x=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(mu, tau))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model


def hierarchical_edges(N):
    out = {(p, f"z[{i}]") for p in ("mu", "tau") for i in range(N)}
    return out | {(f"z[{i}]", f"x[{i}]") for i in range(N)}


def convolution_model(n_in, kernel=(0.5, -1.0, 2.0)):
    k = torch.tensor(kernel)
    n_out = n_in - len(kernel) + 1

    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(n_in), 1.0).to_event(1))
        mean = F.conv1d(z.view(1, 1, -1), k.view(1, 1, -1)).view(-1)
        pyro.sample("x", dist.Normal(mean, 0.1).to_event(1), obs=x if x is not None else torch.zeros(n_out))

    return model, {(f"z[{i + j}]", f"x[{i}]") for i in range(n_out) for j in range(len(kernel))}


# ----------------------------------------------------------------------------- exact edges
def test_chain():
    bn = ps.trace_model(chain_model)  # the package-level export
    assert edges(bn) == {("z1", "z2"), ("z2", "z3"), ("z3", "x")}
    assert bn.latent_nodes == ["z1", "z2", "z3"] and bn.observed_nodes == ["x"]
    assert bn.nodes == ["z1", "z2", "z3", "x"]


def test_hmm_python_loop():
    T = 4
    bn = trace_model(hmm_model(T), x=torch.zeros(T))
    assert edges(bn) == hmm_edges(T)
    assert bn.observed_sites == [f"x_{t}" for t in range(T)]


def test_hierarchical_plate():
    bn = trace_model(hierarchical_model(3), x=torch.zeros(3))
    assert edges(bn) == hierarchical_edges(3)
    assert bn.sites["z"].shape == (3,) and not bn.sites["z"].block
    assert bn.graph.nodes["z[2]"] == {"site": "z", "index": (2,), "observed": False}


def test_vector_site_to_event_is_elementwise():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(2 * z + 1, 1.0).to_event(1), obs=torch.zeros(4))

    bn = trace_model(model)
    assert edges(bn) == {(f"z[{i}]", f"x[{i}]") for i in range(4)}
    assert bn.sites["z"].event_dim == 1 and not bn.sites["z"].block


def test_convolution_window():
    model, expected = convolution_model(7)
    bn = trace_model(model)
    assert edges(bn) == expected


def test_positive_and_unit_interval_latents_stay_elementwise():
    def model():
        a = pyro.sample("a", dist.LogNormal(torch.zeros(3), 1.0).to_event(1))
        g = pyro.sample("g", dist.Gamma(a, 2.0).to_event(1))
        b = pyro.sample("b", dist.Beta(g, a.flip(0)).to_event(1))
        pyro.sample("x", dist.Normal(b, 0.1).to_event(1), obs=torch.zeros(3))

    bn = trace_model(model)
    expected = {(f"a[{i}]", f"g[{i}]") for i in range(3)}
    expected |= {(f"g[{i}]", f"b[{i}]") for i in range(3)}
    expected |= {(f"a[{2 - i}]", f"b[{i}]") for i in range(3)}
    expected |= {(f"b[{i}]", f"x[{i}]") for i in range(3)}
    assert edges(bn) == expected
    for name in "agb":
        assert bn.sites[name].node_shape == (3,) and not bn.sites[name].block


def test_multivariate_normal_is_a_block():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.0]])
        z = pyro.sample("z", dist.MultivariateNormal(mu * torch.ones(3), cov))
        pyro.sample("x", dist.Normal(z[1], 1.0), obs=torch.tensor(0.0))

    bn = trace_model(model)
    expected = {("mu", f"z[{i}]") for i in range(3)}
    expected |= {("z[0]", "z[1]"), ("z[0]", "z[2]"), ("z[1]", "z[2]"), ("z[1]", "x")}
    assert edges(bn) == expected
    assert bn.sites["z"].block and bn.sites["z"].node_shape == (3,)


def test_plate_of_multivariate_normals_blocks_per_event():
    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("p", 2):
            pyro.sample("z", dist.MultivariateNormal(loc.unsqueeze(-1).expand(2, 2), torch.eye(2)))

    bn = trace_model(model)
    expected = {(f"loc[{i}]", f"z[{i},{k}]") for i in range(2) for k in range(2)}
    expected |= {(f"z[{i},0]", f"z[{i},1]") for i in range(2)}
    assert edges(bn) == expected


def test_deterministic_site_is_spliced_out():
    def model():
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        d = pyro.deterministic("d", 3 * z1)
        z2 = pyro.sample("z2", dist.Normal(d, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=torch.tensor(1.0))

    bn = trace_model(model)
    assert edges(bn) == {("z1", "z2"), ("z2", "x")}
    assert "d" not in bn.sites


def test_eight_schools_with_deterministic_theta_in_the_plate():
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def model(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            theta = pyro.deterministic("theta", mu + tau * eta)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    bn = trace_model(model, y=torch.zeros(8))
    assert list(bn.sites) == ["mu", "tau", "eta", "y"] and bn.observed_sites == ["y"]
    assert bn.sites["eta"].shape == (8,) and bn.sites["y"].shape == (8,)
    assert edges(bn) == {(p, f"y[{i}]") for i in range(8) for p in ("mu", "tau", f"eta[{i}]")}


def test_delta_site_is_spliced_out():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        s = pyro.sample("s", dist.Delta(z.flip(0), event_dim=1))
        pyro.sample("x", dist.Normal(s, 1.0).to_event(1), obs=torch.zeros(2))

    bn = trace_model(model)
    assert edges(bn) == {("z[1]", "x[0]"), ("z[0]", "x[1]")}


@pytest.mark.parametrize("op", ["round", "compare", "index"])
def test_non_differentiable_dependency_still_gives_an_edge(op):
    def model():
        a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if op == "round":
            mean = torch.round(a)
        elif op == "compare":
            mean = (a > 0).float()
        else:
            mean = torch.tensor([1.0, -1.0, 3.0])[(a > 0).long()]
        pyro.sample("b", dist.Normal(mean, 1.0).to_event(1), obs=torch.zeros(2))

    bn = trace_model(model)
    # no gradient ever flows, so every element of a is a parent of every element of b
    assert edges(bn) == {(f"a[{i}]", f"b[{j}]") for i in range(2) for j in range(2)}


def test_change_point_reaches_every_element_on_both_sides():
    T = 40

    def model(x=None):
        tau = pyro.sample("tau", dist.Uniform(0.0, float(T)))
        r1 = pyro.sample("r1", dist.LogNormal(0.0, 1.0))
        r2 = pyro.sample("r2", dist.LogNormal(0.0, 1.0))
        rate = torch.where(torch.arange(T) < tau, r1, r2)
        with pyro.plate("t", T):
            pyro.sample("x", dist.Normal(rate, 1.0), obs=x)

    bn = trace_model(model, x=torch.zeros(T))
    # x[t] depends on r1 for some tau > t (every t) and on r2 for some tau <= t (t >= 1, as tau > 0)
    expected = {(p, f"x[{t}]") for t in range(T) for p in ("tau", "r1")}
    expected |= {("r2", f"x[{t}]") for t in range(1, T)}
    assert edges(bn) == expected


def test_mixed_differentiable_and_rounded_path_is_all_to_all():
    def model():
        a = pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("b", dist.Normal(a + torch.round(3 * a.flip(0)), 1.0).to_event(1), obs=torch.zeros(3))
        pyro.sample("c", dist.Normal(2 * a, 1.0).to_event(1), obs=torch.zeros(3))

    bn = trace_model(model)
    expected = {(f"a[{i}]", f"b[{j}]") for i in range(3) for j in range(3)}
    expected |= {(f"a[{i}]", f"c[{i}]") for i in range(3)}
    assert edges(bn) == expected


def test_nested_plates_broadcast_elementwise():
    def model():
        with pyro.plate("cols", 3, dim=-1):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("rows", 2, dim=-2):
                pyro.sample("z", dist.Normal(mu, 1.0))

    bn = trace_model(model)
    assert bn.sites["z"].shape == (2, 3)
    assert edges(bn) == {(f"mu[{j}]", f"z[{i},{j}]") for i in range(2) for j in range(3)}


def test_custom_autograd_function_is_traced():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(Square.apply(z), 1.0).to_event(1), obs=torch.zeros(3))

    assert edges(trace_model(model)) == {(f"z[{i}]", f"x[{i}]") for i in range(3)}


def test_masked_out_observation_and_auxiliary_sites_are_ignored():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("aux", dist.Normal(z, 1.0), infer={"is_auxiliary": True})
        with pyro.poutine.mask(mask=False):
            pyro.sample("ignored", dist.Normal(z, 1.0), obs=torch.tensor(0.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.0))

    bn = trace_model(model)
    assert list(bn.sites) == ["z", "x"] and edges(bn) == {("z", "x")}


def test_python_control_flow_on_a_value_gives_an_edge():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        loc = 1.0 if float(z) > 0 else -1.0
        pyro.sample("x", dist.Normal(loc + w, 1.0), obs=torch.tensor(0.0))

    bn = trace_model(model)
    assert edges(bn) == {("z", "x"), ("w", "x")}


def test_observed_parent_of_a_latent():
    def model(x0=None, x1=None):
        x0 = pyro.sample("x0", dist.Normal(0.0, 1.0), obs=x0)
        z = pyro.sample("z", dist.Normal(x0, 1.0))
        pyro.sample("x1", dist.Normal(z, 1.0), obs=x1)

    bn = trace_model(model, observed=["x0", "x1"])  # called without values: drawn from the prior
    assert edges(bn) == {("x0", "z"), ("z", "x1")}
    assert bn.observed_sites == ["x0", "x1"] and bn.latent_sites == ["z"]


def test_default_observed_are_sites_with_obs():
    bn = trace_model(hierarchical_model(2), torch.zeros(2))
    assert bn.observed_sites == ["x"]
    bn = trace_model(hierarchical_model(2), observed=["x"])
    assert bn.observed_sites == ["x"] and bn.latent_sites == ["mu", "tau", "z"]


def test_simplex_site_indexes_unconstrained_coordinates():
    def model():
        with pyro.plate("groups", 2):
            theta = pyro.sample("theta", dist.Dirichlet(torch.ones(3)))
            pyro.sample("x", dist.Normal(theta, 1.0).to_event(1), obs=torch.zeros(2, 3))

    bn = trace_model(model)
    info = bn.sites["theta"]
    assert info.shape == (2, 3) and info.node_shape == (2, 2) and info.block
    assert bn.latent_nodes == ["theta[0,0]", "theta[0,1]", "theta[1,0]", "theta[1,1]"]
    expected = {(f"theta[{g},{k}]", f"x[{g},{i}]") for g in range(2) for k in range(2) for i in range(3)}
    expected |= {(f"theta[{g},0]", f"theta[{g},1]") for g in range(2)}
    assert edges(bn) == expected


def test_granularity_site():
    bn = trace_model(hierarchical_model(2), torch.zeros(2), granularity="site")
    expected = {(p, f"z[{i}]") for p in ("mu", "tau") for i in range(2)}
    expected |= {(f"z[{i}]", f"x[{j}]") for i in range(2) for j in range(2)}
    expected |= {("z[0]", "z[1]"), ("x[0]", "x[1]")}
    assert edges(bn) == expected
    assert all(info.block for info in bn.sites.values())


def test_extra_dependencies():
    bn = trace_model(chain_model, dependencies={"x": ["z1"], "z3": "z1"})
    assert edges(bn) == {("z1", "z2"), ("z2", "z3"), ("z3", "x"), ("z1", "x"), ("z1", "z3")}
    with pytest.raises(ModelStructureError, match="nowhere"):
        trace_model(chain_model, dependencies={"x": ["nowhere"]})
    with pytest.raises(ModelStructureError, match="cycle"):
        trace_model(chain_model, dependencies={"z1": ["z3"]})


# ----------------------------------------------------------------------------- large sites
def test_large_plate_uses_compressed_jacobians_exactly():
    N = 3 * LARGE_OUTPUT
    bn = trace_model(hierarchical_model(N), torch.zeros(N))
    assert edges(bn) == hierarchical_edges(N)


def test_large_convolution_band_is_exact():
    model, expected = convolution_model(2 * LARGE_OUTPUT + 7)
    bn = trace_model(model)
    assert edges(bn) == expected


def test_large_dense_triangular_jacobian_falls_back_exactly():
    n = LARGE_OUTPUT + 22

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.cumsum(0), 1.0).to_event(1), obs=torch.zeros(n))

    bn = trace_model(model)
    assert edges(bn) == {(f"z[{j}]", f"x[{i}]") for i in range(n) for j in range(i + 1)}


def test_hmm_500_traces():
    T = 500
    bn = trace_model(hmm_model(T), x=torch.zeros(T))
    assert len(bn) == 2 * T and bn.num_edges == 2 * T - 1
    assert ("z_498", "z_499") in bn.graph.edges and ("z_499", "x_499") in bn.graph.edges


# ----------------------------------------------------------------------------- behaviour
def test_rng_state_untouched_and_reproducible():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = trace_model(convolution_model(5)[0])
    assert torch.equal(torch.rand(3), expected)
    second = trace_model(convolution_model(5)[0])
    assert first.to_dict() == second.to_dict()


# ----------------------------------------------------------------------------- errors
def test_discrete_latent_is_refused():
    def model():
        coin = pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(coin, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ModelStructureError, match="coin"):
        trace_model(model)


def test_discrete_observed_sites_are_fine():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("k", dist.Bernoulli(logits=z).to_event(1), obs=torch.ones(2))
        pyro.sample("c", dist.Categorical(logits=torch.stack([z, -z])).to_event(0), obs=torch.tensor(1))

    bn = trace_model(model)
    assert edges(bn) >= {("z[0]", "k[0]"), ("z[1]", "k[1]")}
    assert ("z[1]", "k[0]") not in edges(bn)
    assert {("z[0]", "c"), ("z[1]", "c")} <= edges(bn)


def test_dynamic_structure_is_refused():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        for i in range(int(z.abs() * 1000) % 7):
            pyro.sample(f"extra_{i}", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ModelStructureError, match="extra_"):
        trace_model(model)


def branch_model(sign, threshold=0.0):
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if sign * z > threshold:
            pyro.sample("w", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.0))

    return model


@pytest.mark.parametrize("sign", [-1, 1])  # `if z < 0` and `if z > 0`
def test_branch_taken_half_the_time_is_refused_for_every_seed(sign):
    for seed in range(8):
        with pytest.raises(ModelStructureError, match="'w'"):
            trace_model(branch_model(sign), seed=seed)


def test_rare_branch_is_found_in_the_prior_tails():
    # P(z > 2.5) = 0.006: 16 plain prior draws would miss it about 9 times in 10
    for seed in range(4):
        with pytest.raises(ModelStructureError, match="'w'"):
            trace_model(branch_model(1, threshold=2.5), seed=seed)


def count_calls(model):
    def counted(*args, **kwargs):
        counted.calls += 1
        return model(*args, **kwargs)

    counted.calls = 0
    return counted


@pytest.mark.parametrize("num_probes", [1, 3, 5])
def test_structure_runs_only_when_values_reach_python(num_probes):
    def escaping():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = 1.0 if float(z) > 0 else -1.0
        pyro.sample("x", dist.Normal(loc, 1.0), obs=torch.tensor(0.0))

    model = count_calls(escaping)
    trace_model(model, num_probes=num_probes)
    assert model.calls == 1 + trace_module.structure_runs(num_probes) >= 17
    assert trace_module.structure_runs(num_probes + 10) > trace_module.structure_runs(num_probes)
    model = count_calls(chain_model)  # no escape and no gradients to read: one run
    trace_model(model, num_probes=num_probes)
    assert model.calls == 1


def test_model_failing_only_in_the_tails_is_still_traced():
    raised = []

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if float(z.abs()) > 3.0:  # P = 0.003 under the prior: (nearly) only tail pushes get here
            raised.append(float(z))
            raise ValueError("only in the tails")
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.0))

    assert edges(trace_model(model)) == {("z", "x")}
    assert raised  # the failing tail runs were repeated at plain prior draws


def test_tail_plan_gives_every_site_both_tails_every_four_runs():
    n_sites = 50
    sides = [[plan.next()[0] for _ in range(n_sites)] for plan in map(lambda k: probe_module.TailPlan(k, 0), range(8))]
    for block in (sides[:4], sides[4:]):
        for site in range(n_sites):
            assert sorted(run[site] for run in block) == [-1, 0, 0, 1]
    assert sides[:4] != sides[4:]  # the combinations of the sites' tails change between blocks


@pytest.mark.parametrize(
    "fn",
    [dist.Normal(torch.zeros(3), 1.0), dist.Gamma(2.0, 1.0).expand([3]), dist.Dirichlet(2 * torch.ones(3)),
     dist.LogNormal(0.0, 1.0).expand([2]).to_event(1), dist.Poisson(3.0).expand([3])],
)
def test_tail_draws_keep_shape_and_support(fn):
    pyro.set_rng_seed(0)
    plan = probe_module.TailPlan(0, 0)
    draws = [probe_module.tail_draw(fn, side, plan.next()[1]) for side in (-1, 1) * 20]
    ref = fn.sample()
    assert all(d.shape == ref.shape and bool(fn.support.check(d).all()) for d in draws)
    plain = [fn.sample() for _ in range(40)]
    least_likely = [min(float(fn.log_prob(d).sum()) for d in ds) for ds in (draws, plain)]
    assert least_likely[0] < least_likely[1]  # reaches further into the tails


def test_dynamic_shape_is_refused():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(8), 1.0).to_event(1))
        positive = z[z > 0]
        pyro.sample("w", dist.Normal(positive, 1.0).to_event(1))

    with pytest.raises(ModelStructureError, match="'w'"):
        trace_model(model)


def test_missing_observed_site_is_refused():
    with pytest.raises(ModelStructureError, match="nope"):
        trace_model(chain_model, observed=["x", "nope"])


def test_model_without_latents_is_refused():
    def model():
        pyro.sample("only_x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ModelStructureError, match="only_x"):
        trace_model(model)


def test_model_that_raises_is_wrapped():
    def model():
        pyro.sample("before_crash", dist.Normal(0.0, 1.0))
        raise RuntimeError("boom")

    with pytest.raises(ModelStructureError, match="before_crash.*boom"):
        trace_model(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        trace_model(chain_model, granularity="node")
    with pytest.raises(ValueError, match="num_probes"):
        trace_model(chain_model, num_probes=0)


# ----------------------------------------------------------------------------- obs=data idiom
def test_observed_candidates_of_a_data_none_model():
    def model(data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 10):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)

    assert trace_module.find_observed_candidates(model) == {"x": "data"}
    assert trace_module.find_observed_candidates(model, torch.zeros(10)) == {}  # data given


def test_observed_candidates_of_two_data_arguments():
    def model(x=None, y=None, scale=1.0):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("rows", 5):
            x = pyro.sample("x_obs", dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=x)
            pyro.sample("y_obs", dist.Normal(x @ w, scale), obs=y)

    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    found = trace_module.find_observed_candidates(model)
    assert torch.equal(torch.rand(2), expected)  # the global RNG state is restored
    assert found == {"x_obs": "x", "y_obs": "y"}
    assert trace_module.find_observed_candidates(model, y=torch.zeros(5)) == {"x_obs": "x"}


def test_observed_candidates_of_a_python_loop_indexing_its_data():
    # x[t] of a scalar draw raises (skipped); the scalar draws stacked into (6,) fit x[t]
    assert trace_module.find_observed_candidates(hmm_model(3)) == {f"x_{t}": "x" for t in range(3)}
    assert trace_module.find_observed_candidates(chain_model) == {}  # no data argument


def test_observed_candidates_of_a_pyro_module():
    from pyro.nn import PyroModule

    class Model(PyroModule):
        def forward(self, data=None):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            return pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    assert trace_module.find_observed_candidates(Model()) == {"obs": "data"}
