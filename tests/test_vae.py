"""Structured VAEs: learning a decoder and the guide from data (fit(data=...), SVI), the IWAE bound, evaluation, errors."""


import networkx as nx
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_struct as ps
from pyro_struct import evaluate
from pyro_struct.layout import robust_moments
from pyro_struct.likelihood import elbo, iwae, log_weights, negative_elbo_on_data, negative_iwae, point_data, point_simulator
from pyro_struct.models import LinearGaussianNetwork


N_TRAIN, N_TEST = 2000, 200


def _true_data(n: int, seed: int) -> torch.Tensor:
    """A 2-d latent pushed through a fixed non-linear map into 5 dimensions, plus noise 0.1."""
    g = torch.Generator().manual_seed(seed)
    W = torch.tensor([[1.5, -1.0, 0.5, 2.0, 0.0], [0.5, 1.0, -1.5, 0.0, 1.0]])
    z = torch.randn(n, 2, generator=g)
    return torch.tanh(z @ W) + 0.3 * (z @ W) + 0.1 * torch.randn(n, 5, generator=g)


def _decoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 5))


def plate_vae(decoder):
    """The VAE on a data plate: z_i ~ N(0, I_2), x_i ~ N(decoder(z_i), 0.1 I_5)."""

    def model(x=None, N=4):
        pyro.module("decoder", decoder)
        with pyro.plate("data", N if x is None else x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.1).to_event(1), obs=x)

    return model


def point_vae(decoder):
    """The same VAE written for one data point (no plate): a flat guide's data point is one run."""

    def model(x=None):
        pyro.module("decoder", decoder)
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z), 0.1).to_event(1), obs=x)

    return model


@pytest.fixture(autouse=True)
def _clear_params():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _weights(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_fit_elbo_on_data_learns_the_decoder_of_a_plate_vae():
    decoder = _decoder()
    model = plate_vae(decoder)
    guide = ps.StructuredGuide(model, plates="auto", observed=["x"], hidden_sizes=(16,))
    x, x_test = _true_data(N_TRAIN, 0), _true_data(N_TEST, 1)
    before, error_before = _weights(decoder), evaluate.reconstruction_error(model, guide, {"x": x_test}, num_samples=20)
    nll_before = evaluate.nll(model, guide, {"x": x_test}, num_samples=50)
    result = guide.fit(objective="elbo", data={"x": x}, num_steps=400, batch_size=100, lr=1e-2, seed=0, progress=False)
    first, last = sum(result[:20]) / 20, sum(result[-20:]) / 20
    assert last < first - 50, (first, last)  # the negative ELBO per data point fell
    assert (_weights(decoder) - before).abs().max() > 0.1  # the decoder's parameters moved
    error_after = evaluate.reconstruction_error(model, guide, {"x": x_test}, num_samples=20)
    assert error_after < 0.3 * error_before, (error_before, error_after)
    assert evaluate.nll(model, guide, {"x": x_test}, num_samples=50) < nll_before - 50  # held-out likelihood


def test_fit_iwae_on_the_flat_path_with_a_grf_encoder():
    decoder = _decoder(1)
    model = point_vae(decoder)
    guide = ps.StructuredGuide(model, flow="grf", observed=["x"])
    x = _true_data(500, 2)
    before = _weights(decoder)
    nll_before = evaluate.nll(model, guide, {"x": x[:100]}, num_samples=32)
    result = guide.fit(objective="iwae", data={"x": x}, num_particles=4, num_steps=150, batch_size=64, seed=0, progress=False)
    assert all(torch.isfinite(torch.tensor(result)))
    assert (_weights(decoder) - before).abs().max() > 0.05
    assert evaluate.nll(model, guide, {"x": x[:100]}, num_samples=32) < nll_before - 50


def test_svi_trains_the_decoder_and_the_plate_guide_together():
    """Plain Pyro SVI over the full plate of 2,000 points with the shared-weight plate guide."""
    decoder = _decoder(2)
    model = plate_vae(decoder)
    guide = ps.StructuredGuide(model, plates="auto", observed=["x"], hidden_sizes=(16,))
    x = _true_data(N_TRAIN, 3)
    guide.set_observed_standardization({"x": x})  # statistics from the data, not from the untrained decoder
    before = _weights(decoder)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) / N_TRAIN for _ in range(150)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 30
    assert (_weights(decoder) - before).abs().max() > 0.05


def _reconstruction(decoder, guide, x):
    """Squared error summed over coordinates, mean over points, of the decoder at the posterior means."""
    with torch.no_grad():
        z = guide.posterior(x=x).sample(64)["z"].mean(0)
        return float(((decoder(z) - x) ** 2).sum(-1).mean())


def test_subsampled_svi_trains_the_decoder_and_the_plate_guide_together():
    """Plain Pyro SVI on a subsampled plate of 2,000 points (B = 100): O(B) steps, the VAE of issue 12."""
    decoder = _decoder(4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0], subsample_size=100) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.1).to_event(1), obs=x[ind])

    x, x_test = _true_data(N_TRAIN, 5), _true_data(N_TEST, 6)
    guide = ps.StructuredGuide(model, plates="auto", observed=["x"], hidden_sizes=(16,), model_args=(x,))
    guide.set_observed_standardization({"x": x})
    before, error_before = _weights(decoder), _reconstruction(decoder, guide, x_test)
    pyro.set_rng_seed(0)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) / N_TRAIN for _ in range(400)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 30, (losses[:3], losses[-3:])  # the ELBO improved
    assert (_weights(decoder) - before).abs().max() > 0.05  # the decoder's parameters moved
    error_after = _reconstruction(decoder, guide, x_test)
    assert error_after < 0.5 * error_before, (error_before, error_after)  # held-out reconstructions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iwae_bound_is_at_least_the_elbo_on_the_same_draws(seed):
    decoder = _decoder(seed)
    model = plate_vae(decoder)
    guide = ps.StructuredGuide(model, plates="auto", observed=["x"], hidden_sizes=(8,))
    points = point_data(guide, {"x": _true_data(30, seed)}).values
    simulator = point_simulator(guide)
    torch.manual_seed(seed)
    with torch.no_grad():
        log_w = log_weights(guide, simulator, points, 16)
    assert log_w.shape == (16, 30)
    assert (iwae(log_w) >= elbo(log_w) - 1e-5).all()
    assert (iwae(log_w) > elbo(log_w)).any()
    assert torch.allclose(iwae(log_w[:1]), elbo(log_w[:1]))
    # the training losses: with K = 1 and the same draws the two objectives agree
    torch.manual_seed(seed)
    a = negative_iwae(guide, simulator, points, 1)
    torch.manual_seed(seed)
    b = negative_elbo_on_data(guide, simulator, points, 1)
    assert torch.allclose(a, b)


def test_structured_decoder_traces_to_its_graph_and_scores_like_its_conditionals():
    net = LinearGaussianNetwork.random(7, seed=3)
    g = nx.relabel_nodes(net.graph, net.site_names)
    decoder = ps.StructuredDecoder(g, latent=net.latent_sites, observed=net.observed_sites, hidden_sizes=(8,))

    def model(**obs):
        return decoder(obs)

    bn = ps.trace_model(model, observed=net.observed_sites)
    assert set(bn.site_graph().edges) == set(g.edges)
    # the masked network: node i's conditional does not move when a non-parent changes
    values = {v: torch.randn(()) for v in decoder.order}
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace()
    for v in decoder.order:
        changed = {u: (t + 5.0 if u not in set(g.predecessors(v)) and u != v else t) for u, t in values.items()}
        tr2 = pyro.poutine.trace(pyro.poutine.condition(model, data=changed)).get_trace()
        assert torch.allclose(tr.nodes[v]["fn"].loc, tr2.nodes[v]["fn"].loc)
        assert torch.allclose(tr.nodes[v]["fn"].scale, tr2.nodes[v]["fn"].scale)


def test_nll_estimates_the_exact_marginal_of_a_linear_gaussian_network():
    net = LinearGaussianNetwork.random(6, seed=1)
    guide = ps.StructuredGuide(net.model, observed=net.observed_sites)
    guide.fit(num_steps=300, batch_size=128, seed=0, progress=False)
    obs = net.sample_observations(20, torch.Generator().manual_seed(0))
    x = torch.stack([obs[s] for s in net.observed_sites], -1).double()
    obs_idx = [net.order.index(n) for n in net.observed]
    exact = torch.distributions.MultivariateNormal(net.joint_mean[obs_idx], net.joint_cov[obs_idx][:, obs_idx])
    ll = evaluate.log_likelihood(net.model, guide, obs, num_samples=500)
    assert ll.shape == (20,)
    # importance sampling with 500 draws of a trained guide: within 0.05 nats of the truth per point
    assert (ll.double() - exact.log_prob(x)).abs().max() < 0.05


# ------------------------------------------------------------------- bad input
def test_data_errors_name_the_site():
    model = plate_vae(_decoder())
    guide = ps.StructuredGuide(model, plates="auto", observed=["x"], hidden_sizes=(8,))
    with pytest.raises(ValueError, match="data\\['x'\\] has shape \\(100, 4\\).*'x'"):
        guide.fit(objective="elbo", data={"x": torch.randn(100, 4)}, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="'y' is not an observed site"):
        guide.fit(objective="elbo", data={"y": torch.randn(100, 5)}, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        guide.fit(objective="elbo", data={"x": torch.full((10, 5), float("nan"))}, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="iwae.*learns from data"):
        guide.fit(objective="iwae", num_steps=1, progress=False)
    with pytest.raises(ValueError, match="'skl' trains on simulations"):
        guide.fit(objective="skl", data={"x": torch.randn(10, 5)}, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="num_particles"):
        guide.fit(objective="iwae", data={"x": torch.randn(10, 5)}, num_particles=0, num_steps=1, progress=False)
    flat = ps.StructuredGuide(point_vae(_decoder()), observed=["x"])
    with pytest.raises(ValueError, match="data\\['x'\\] has shape \\(10, 5, 1\\).*\\(N, 5,\\)"):
        flat.fit(objective="elbo", data={"x": torch.randn(10, 5, 1)}, num_steps=1, progress=False)


@pytest.mark.parametrize("objective", ["skl", "fkl", "elbo"])
def test_simulation_objectives_warn_that_a_learnable_model_stays_fixed(objective):
    guide = ps.StructuredGuide(point_vae(_decoder()), observed=["x"])
    with pytest.warns(UserWarning, match="decoder.*not learned.*data="):
        guide.fit(objective=objective, num_steps=2, batch_size=8, progress=False)


def test_data_with_global_latents_is_refused_naming_them():
    def model(x=None, N=4):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N if x is None else x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = ps.StructuredGuide(model, plates="auto", observed=["x"])
    with pytest.raises(ValueError, match="\\['mu'\\] are outside plate 'data'"):
        guide.fit(objective="elbo", data={"x": torch.randn(10)}, num_steps=1, progress=False)


def test_data_checkpoints_resume_the_model_parameters(tmp_path):
    decoder = _decoder(4)
    model = point_vae(decoder)
    guide = ps.StructuredGuide(model, observed=["x"])
    x = _true_data(200, 5)
    path = tmp_path / "vae.pt"
    guide.fit(objective="elbo", data={"x": x}, num_steps=20, batch_size=50, checkpoint=path, checkpoint_every=10, progress=False)
    trained = _weights(decoder)
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
    guide.fit(objective="elbo", data={"x": x}, num_steps=20, batch_size=50, checkpoint=path, resume=True, progress=False)
    assert torch.equal(_weights(decoder), trained)  # restored from the checkpoint; no step left to run


def test_standardisation_comes_from_the_data_or_the_prior_as_chosen():
    x = _true_data(300, 6) * 3.0 + 2.0
    plate = ps.StructuredGuide(plate_vae(_decoder()), plates="auto", observed=["x"], hidden_sizes=(8,))
    plate.fit(objective="elbo", data={"x": x}, num_steps=0, progress=False)
    # (the standardisation's location and scale: the median and the central 95% range over 2 x 1.96)
    loc, scale = robust_moments(x)
    assert torch.allclose(plate.plate_layout.member_obs_loc, loc, atol=1e-4)
    assert torch.allclose(plate.plate_layout.member_obs_scale, scale, atol=1e-4)
    assert torch.equal(plate.plate_layout.member_scale, torch.ones(2))  # latents left unstandardised
    flat = ps.StructuredGuide(point_vae(_decoder()), observed=["x"])
    flat.fit(objective="elbo", data={"x": x}, num_steps=0, standardize="prior", progress=False)
    assert not torch.allclose(flat.observed_layout.loc, x.mean(0), atol=0.5)  # from simulations, not the data
    assert (flat.latent_layout.scale - 1).abs().max() < 0.2  # the prior's latents are N(0, 1)
    assert (flat.latent_layout.scale != 1).all()
    none = ps.StructuredGuide(point_vae(_decoder()), observed=["x"])
    none.fit(objective="elbo", data={"x": x}, num_steps=0, standardize=None, progress=False)
    assert torch.equal(none.observed_layout.loc, torch.zeros(5)) and not bool(none.standardized)
    with pytest.raises(ValueError, match="standardize must be one of"):
        none.fit(objective="elbo", data={"x": x}, num_steps=0, standardize="simulations", progress=False)
