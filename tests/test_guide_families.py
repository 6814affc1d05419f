"""Guide-level properties over every flow family, as Pyro's autoguide tests run over every guide class:
SVI and Predictive, save/load, batched posteriors, constrained supports, log_prob of samples,
median/quantiles, and agreement of the guide call with an AutoContinuous guide's sites and plates."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample

from pyro_struct import StructuredGuide

# small settings per family, so every guide test runs in about a second
FAMILIES = {
    "straf": dict(hidden_sizes=(16,)),
    "grf": dict(hidden_sizes=(16,), num_layers=2),
    "cnf": dict(hidden_sizes=(16,), rtol=1e-3, atol=1e-3),
}


def family_options(flow):
    return dict(FAMILIES[flow])


def model(data):
    """Positive, unit-interval and simplex latents, and a data plate."""
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    shift = p + (w * torch.tensor([1.0, -1.0, 0.5])).sum(-1)
    with pyro.plate("data", data.shape[-1]):
        pyro.sample("obs", dist.Normal(loc + shift, scale), obs=data)


DATA = torch.tensor([0.5, 1.2, 0.9, 1.7])


@pytest.fixture(params=sorted(FAMILIES))
def guide(request):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    g = StructuredGuide(model, flow=request.param, model_args=(DATA,), **family_options(request.param))
    g.fit(num_steps=3, batch_size=16, progress=False)
    return g


def test_svi_and_predictive(guide):
    before = [p.detach().clone() for p in guide.parameters()]
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(DATA) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, guide.parameters()))
    samples = Predictive(model, guide=guide, num_samples=5)(DATA)
    assert samples["scale"].numel() == 5 and (samples["scale"] > 0).all()
    assert samples["w"].shape[-1] == 3 and torch.allclose(samples["w"].sum(-1), torch.ones(()), atol=1e-5)
    assert samples["obs"].shape == (5, 4)


def test_guide_call_matches_an_autocontinuous_guide(guide):
    """Same sample sites, shapes, plates and (non-auxiliary) site types as AutoMultivariateNormal's call."""
    ours = pyro.poutine.trace(guide).get_trace(DATA)
    auto = AutoMultivariateNormal(model)
    theirs = pyro.poutine.trace(auto).get_trace(DATA)

    def sites(tr):
        return {
            name: (tuple(s["value"].shape), s["fn"].event_dim, tuple(f.name for f in s["cond_indep_stack"]))
            for name, s in tr.nodes.items()
            if s["type"] == "sample" and not s["infer"].get("is_auxiliary") and not site_is_subsample(s)
        }

    assert sites(ours) == sites(theirs)
    # and the guide's log density of its sites is the posterior's log_prob of those values
    ours.compute_log_prob()
    total = sum(s["log_prob"] for s in ours.nodes.values() if s["type"] == "sample")
    values = {name: ours.nodes[name]["value"] for name in guide.latent_sites}
    expected = guide.posterior(obs=DATA).log_prob(values)
    assert torch.allclose(total, expected, atol=1e-3)


def test_log_prob_of_samples_and_supports(guide):
    post = guide.posterior(obs=DATA)
    samples, log_q = post.sample_and_log_prob(50)
    assert samples["p"].min() > 0 and samples["p"].max() < 1 and (samples["scale"] > 0).all()
    assert torch.allclose(post.log_prob(samples), log_q, atol=1e-3, rtol=1e-4)
    outside = dict(samples, scale=-samples["scale"])  # a negative scale has zero density
    assert torch.isneginf(post.log_prob(outside)).all()


def test_batched_posterior(guide):
    batch = torch.stack([DATA, DATA + 1, DATA - 1])
    post = guide.posterior(obs=batch)
    assert post.batch_shape == (3,)
    samples = post.sample(7)
    assert samples["loc"].shape == (7, 3) and samples["w"].shape == (7, 3, 3)
    assert post.log_prob(samples).shape == (7, 3)


def test_median_and_quantiles(guide):
    q = guide.quantiles([0.05, 0.5, 0.95], DATA, num_samples=400)
    assert q["loc"].shape == (3,) and q["w"].shape == (3, 3)
    assert (q["loc"][0] <= q["loc"][1]) and (q["loc"][1] <= q["loc"][2])
    median = guide.median(DATA, num_samples=400)
    assert set(median) == set(guide.latent_sites) and median["scale"] > 0
    rows = guide.posterior(obs=DATA).summary(level=0.9, num_samples=400)
    assert [r["name"] for r in rows][:3] == ["loc", "scale", "p"]
    assert all(r["lower"] <= r["mean"] <= r["upper"] for r in rows)


def test_save_load_roundtrip(guide, tmp_path):
    path = tmp_path / "guide.pt"
    guide.save(path)
    loaded = StructuredGuide.load(path, model, model_args=(DATA,))
    samples = guide.posterior(obs=DATA).sample(5)
    assert torch.allclose(loaded.posterior(obs=DATA).log_prob(samples), guide.posterior(obs=DATA).log_prob(samples), atol=1e-5)
    assert loaded.history == guide.history
