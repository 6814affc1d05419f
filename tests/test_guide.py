"""Tests of StructuredGuide, Posterior and amortize: shapes, densities, Pyro integration, save/load, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.optim import Adam

import pyro_struct as ps
from pyro_struct.guide import StructuredGuide, amortize
from pyro_struct.models import LinearGaussianNetwork, arithmetic_circuit


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def constrained_model(x=None):
    """Positive (LogNormal, Gamma), unit-interval (Beta) and simplex (Dirichlet) latents."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    rate = pyro.sample("rate", dist.Gamma(torch.full((2,), 2.0), 2.0).to_event(1))
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    loc = p * rate.sum(-1) + (w * torch.tensor([1.0, -1.0, 0.5])).sum(-1)
    pyro.sample("x", dist.Normal(loc, scale), obs=x)


def circuit_guide(**options):
    return StructuredGuide(arithmetic_circuit(), observed=["x0", "x1"], hidden_sizes=(16, 16), **options)


# ------------------------------------------------------------------ the decorator
@pytest.mark.slow
def test_circuit_decorator_fit_and_posterior():
    model = amortize(observed=["x0", "x1"], hidden_sizes=(32, 32))(arithmetic_circuit())
    # the decorated function still runs as the model
    x0, x1 = model()
    assert x0.shape == () and x1.shape == ()
    history = model.fit(num_steps=150, batch_size=64, lr=5e-3, progress=False, seed=0)
    assert len(history) == 150 and all(math.isfinite(h) for h in history)
    first, last = sum(history[:30]) / 30, sum(history[-30:]) / 30
    assert last < first - 0.5, (first, last)
    post = model.posterior(x0=0.3, x1=5.2)
    samples = post.sample(1000)
    assert set(samples) == {"z0", "z1", "z2", "z3", "z4", "z5"}
    assert all(v.shape == (1000,) for v in samples.values())
    log_q = post.log_prob(samples)
    assert log_q.shape == (1000,) and torch.isfinite(log_q).all()
    # x0 ~ N(z3, 0.1): the amortised posterior has learnt that z3 follows x0
    assert model.posterior(x0=-8.0, x1=5.2).mean["z3"] < post.mean["z3"] - 2.0
    assert model.guide is model.guide
    assert model.structure.adjacency.shape == (6, 8)


def test_amortize_forms():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    bare = amortize(model)
    assert isinstance(bare, ps.guide.AmortizedModel) and bare.__name__ == "model"
    assert bare.guide.observed_sites == []  # no obs= when traced without data
    configured = amortize(observed="x", flow="straf")(model)
    assert configured.guide.observed_sites == ["x"] and configured.guide.latent_sites == ["z"]
    with pytest.raises(ValueError, match="unknown flow"):
        amortize(flow="nope")
    with pytest.raises(ValueError, match="unknown structure"):
        amortize(structure="nope")


# ------------------------------------------------------------- constrained sites
def test_constrained_supports_and_jacobians():
    guide = StructuredGuide(constrained_model, observed=["x"], hidden_sizes=(16, 16))
    guide.fit(num_steps=5, batch_size=32, progress=False)
    post = guide.posterior(x=torch.tensor([0.5, 1.5, 3.0]))
    samples, log_q = post.sample_and_log_prob(400)
    assert samples["scale"].shape == (400, 3) and samples["rate"].shape == (400, 3, 2)
    assert samples["p"].shape == (400, 3) and samples["w"].shape == (400, 3, 3)
    assert (samples["scale"] > 0).all() and (samples["rate"] > 0).all()
    assert ((samples["p"] > 0) & (samples["p"] < 1)).all()
    assert (samples["w"] > 0).all() and torch.allclose(samples["w"].sum(-1), torch.ones(400, 3), atol=1e-5)
    # log_prob of the samples matches the density reported while sampling
    assert torch.allclose(post.log_prob(samples), log_q, atol=1e-3, rtol=1e-4)

    # independent computation: log q(z) = log q_u(u) - log|dz/du|, with the bijections written
    # out by hand (exp for positive, sigmoid for the unit interval) and the simplex's Jacobian
    # from autograd on the stick-breaking map restricted to the first K-1 coordinates
    u = post.sample_unconstrained(7)  # (7, 3, 1 + 2 + 1 + 2), trace order
    assert u.shape == (7, 3, 6)
    log_q_u = guide._flat_log_prob(u, post.context)
    u_scale, u_rate, u_p, u_w = u[..., 0], u[..., 1:3], u[..., 3], u[..., 4:6]
    stick = torch.distributions.transforms.StickBreakingTransform()
    values = {"scale": u_scale.exp(), "rate": u_rate.exp(), "p": torch.sigmoid(u_p), "w": stick(u_w)}
    log_jac = u_scale + u_rate.sum(-1) + (torch.sigmoid(u_p) * torch.sigmoid(-u_p)).log()
    simplex_jac = torch.zeros(7, 3)
    for i in range(7):
        for b in range(3):
            J = torch.autograd.functional.jacobian(lambda v: stick(v)[:2], u_w[i, b])
            simplex_jac[i, b] = torch.linalg.slogdet(J)[1]
    expected = log_q_u - log_jac - simplex_jac
    assert torch.allclose(post.log_prob(values), expected, atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------ Pyro integration
def data_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def test_svi_trace_elbo_and_predictive():
    data = 2.0 + 0.5 * torch.randn(20)
    guide = StructuredGuide(data_model, model_args=(data,), hidden_sizes=(16, 16))
    assert guide.observed_sites == ["obs"] and guide.latent_sites == ["loc", "scale"]
    svi = SVI(data_model, guide, Adam({"lr": 0.02}), Trace_ELBO(num_particles=4, vectorize_particles=True))
    losses = [svi.step(data) for _ in range(150)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 10
    samples = Predictive(data_model, guide=guide, num_samples=64)(data)
    assert samples["loc"].shape[0] == 64 and samples["loc"].numel() == 64
    assert samples["scale"].numel() == 64 and (samples["scale"] > 0).all()
    assert samples["obs"].shape == (64, 20)
    # SVI fitted this data set: the posterior of loc concentrates near the sample mean
    assert abs(samples["loc"].mean().item() - data.mean().item()) < 0.5
    # the parallel path (a plate around the guide) gives the same shapes
    parallel = Predictive(data_model, guide=guide, num_samples=32, parallel=True)(data)
    assert parallel["loc"].numel() == 32 and parallel["obs"].shape == (32, 20)


def test_guide_call_log_density_matches_posterior():
    guide = circuit_guide()
    guide.fit(num_steps=3, batch_size=16, progress=False)
    tr = pyro.poutine.trace(guide).get_trace(x0=torch.tensor(0.3), x1=torch.tensor(5.2))
    tr.compute_log_prob()
    total = sum(site["log_prob"] for site in tr.nodes.values() if site["type"] == "sample")
    values = {name: tr.nodes[name]["value"] for name in guide.latent_sites}
    expected = guide.posterior(x0=0.3, x1=5.2).log_prob(values)
    assert torch.allclose(total, expected, atol=1e-4)


# ---------------------------------------------------------------------- batching
def test_batched_posterior_equals_separate_calls():
    lg = LinearGaussianNetwork.random(6, seed=2)
    guide = StructuredGuide(lg.model, observed=lg.observed_sites, hidden_sizes=(16, 16))
    guide.fit(num_steps=20, batch_size=64, progress=False)
    obs = lg.sample_observations(100, torch.Generator().manual_seed(1))
    batched = guide.posterior(**obs)
    assert batched.batch_shape == (100,)
    torch.manual_seed(5)
    together = batched.sample(20, common_noise=True)
    values = {k: v + 0.1 for k, v in together.items()}
    log_q = batched.log_prob(values)
    assert log_q.shape == (20, 100)
    for i in range(100):
        single = guide.posterior(**{k: v[i] for k, v in obs.items()})
        torch.manual_seed(5)
        alone = single.sample(20)
        for name in lg.latent_sites:
            assert torch.allclose(together[name][:, i], alone[name], atol=1e-5), (name, i)
        assert torch.allclose(single.log_prob({k: v[:, i] for k, v in values.items()}), log_q[:, i], atol=1e-4)
    # default noise is independent across the batch: equal observations get different draws
    same = guide.posterior(**{k: v[:1].expand(4) for k, v in obs.items()}).sample(3)
    assert not torch.allclose(same[lg.latent_sites[0]][:, 0], same[lg.latent_sites[0]][:, 1])


def test_posterior_moments_and_dict_form():
    guide = circuit_guide()
    guide.fit(num_steps=2, batch_size=16, progress=False)
    post = guide.posterior({"x0": torch.tensor([0.3, 1.0]), "x1": 5.2})
    assert post.batch_shape == (2,)
    assert set(post.mean) == set(guide.latent_sites)
    assert post.mean["z0"].shape == (2,) and (post.std["z0"] > 0).all()
    assert post.mean is post.mean  # cached
    assert post.sample_unconstrained(3).shape == (3, 2, 6)


# --------------------------------------------------------------------- save/load
def test_save_load_roundtrip(tmp_path):
    guide = StructuredGuide(constrained_model, observed=["x"], hidden_sizes=(16, 16))
    guide.fit(num_steps=10, batch_size=32, progress=False)
    path = tmp_path / "sub" / "guide.pt"
    guide.save(path)
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    loaded = StructuredGuide.load(path, constrained_model)
    assert loaded.history == guide.history
    assert torch.equal(loaded.observed_layout.loc, guide.observed_layout.loc) and torch.equal(loaded.latent_layout.scale, guide.latent_layout.scale)
    x = torch.tensor([0.2, 2.0])
    torch.manual_seed(3)
    a = guide.posterior(x=x).sample(50)
    torch.manual_seed(3)
    b = loaded.posterior(x=x).sample(50)
    for name in a:
        assert torch.equal(a[name], b[name])


def test_load_against_a_different_model_raises(tmp_path):
    guide = circuit_guide()
    path = tmp_path / "circuit.pt"
    guide.save(path)

    def other(x0=None, x1=None):
        z0 = pyro.sample("z0", dist.Normal(0.0, 1.0))
        pyro.sample("x0", dist.Normal(z0, 1.0), obs=x0)
        pyro.sample("x1", dist.Normal(z0, 1.0), obs=x1)

    with pytest.raises(ValueError, match="sites"):
        StructuredGuide.load(path, other)

    def rewired(x0=None, x1=None):  # same sites and shapes, z5 no longer depends on z3
        z0 = pyro.sample("z0", dist.Laplace(5.0, 1.0))
        z1 = pyro.sample("z1", dist.Laplace(-2.0, 1.0))
        pyro.sample("z2", dist.Normal(torch.tanh(z0 + z1 - 2.8), 0.1))
        z3 = pyro.sample("z3", dist.Normal(z0 * z1, 0.1))
        z4 = pyro.sample("z4", dist.Normal(7.0, 2.0))
        z5 = pyro.sample("z5", dist.Normal(torch.tanh(z4), 0.1))
        pyro.sample("x0", dist.Normal(z3, 0.1), obs=x0)
        pyro.sample("x1", dist.Normal(z5, 0.1), obs=x1)

    with pytest.raises(ValueError, match="edges"):
        StructuredGuide.load(path, rewired)
    (tmp_path / "junk.pt").write_bytes(b"not a guide")
    with pytest.raises(ValueError, match="not a pyro_struct guide"):
        StructuredGuide.load(tmp_path / "junk.pt", arithmetic_circuit())


# ------------------------------------------------------------------------ errors
def test_posterior_errors_name_the_site():
    guide = circuit_guide()
    with pytest.raises(ValueError, match="missing observation for site 'x1'"):
        guide.posterior(x0=0.3)
    data_guide = StructuredGuide(data_model, model_args=(torch.zeros(20),), hidden_sizes=(8,))
    with pytest.raises(ValueError, match="site 'obs' has shape \\(5, 19\\) but the guide was compiled for shape \\(20,\\)"):
        data_guide.posterior(obs=torch.zeros(5, 19))
    assert data_guide.posterior(obs=torch.zeros(5, 20)).sample(2)["loc"].shape == (2, 5)
    with pytest.raises(ValueError, match="'y' is not an observed site"):
        guide.posterior(x0=0.3, x1=5.2, y=1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        guide.posterior(x0=torch.zeros(3), x1=torch.zeros(4))
    with pytest.raises(ValueError, match="missing value for latent site"):
        guide.posterior(x0=0.3, x1=5.2).log_prob({"z0": torch.zeros(2)})
    with pytest.raises(ValueError, match="n must be a positive int"):
        guide.posterior(x0=0.3, x1=5.2).sample(0)


def test_guide_call_errors():
    guide = circuit_guide()
    with pytest.raises(ValueError, match="observed site 'x0' got no observed value"):
        guide()
    data = torch.randn(20)
    data_guide = StructuredGuide(data_model, model_args=(data,))
    with pytest.raises(ValueError, match="'obs' has shape \\(10,\\) but the guide was compiled for shape \\(20,\\)"):
        data_guide(torch.randn(10))


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown flow 'maf'"):
        StructuredGuide(arithmetic_circuit(), flow="maf")
    with pytest.raises(ValueError, match="unknown structure 'sparse'"):
        StructuredGuide(arithmetic_circuit(), structure="sparse")
    with pytest.raises(ValueError, match="straf"):
        StructuredGuide(arithmetic_circuit(), observed=["x0", "x1"], not_an_option=3)
    with pytest.raises(ValueError, match="x9"):
        StructuredGuide(arithmetic_circuit(), observed=["x0", "x9"])

    def discrete(x=None):
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    with pytest.raises(ps.ModelStructureError, match="'k'"):
        StructuredGuide(discrete, observed=["x"])
