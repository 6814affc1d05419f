"""Subsampled data plates: the plate guide samples the plate's indices, the model replays them, the
guide's log density is scaled as Pyro scales the plate, and SVI reaches the exact posterior."""

import pyro
import pytest
import torch

from benchmarks.subsample import hierarchical_subsampled
from pyro_struct import StructuredGuide
from pyro_struct.errors import ModelStructureError

N, B = 2000, 100


def subsampled_model(batch=B):
    """mu ~ N(0, 1), z_i ~ N(mu, 1), x_i ~ N(z_i, 1) in a plate subsampled to ``batch`` (the benchmark's model)."""
    return hierarchical_subsampled(batch)


@pytest.fixture
def data():
    torch.manual_seed(0)
    return 0.5 + 2 ** 0.5 * torch.randn(N)


def _guide(model, data):
    pyro.clear_param_store()
    return StructuredGuide(model, plates="auto", model_args=(data,), observed=["x"], hidden_sizes=(16,))


def test_the_model_replays_the_indices_the_guide_chose(data):
    model = subsampled_model()
    guide = _guide(model, data)

    for _ in range(3):
        gt = pyro.poutine.trace(guide).get_trace(data)
        mt = pyro.poutine.trace(pyro.poutine.replay(model, trace=gt)).get_trace(data)
        ind = gt.nodes["data"]["value"]
        assert ind.shape == (B,) and len(set(ind.tolist())) == B
        assert torch.equal(mt.nodes["data"]["value"], ind)
        assert torch.equal(mt.nodes["x"]["value"], data[ind])  # the model scored the members the guide conditioned on
        assert torch.equal(mt.nodes["z"]["value"], gt.nodes["z"]["value"])
        # Pyro's plate scale on the local sites of both traces; the global is unscaled
        assert gt.nodes["z"]["scale"] == pytest.approx(N / B) and mt.nodes["z"]["scale"] == pytest.approx(N / B)
        assert gt.nodes["mu"]["scale"] == 1.0
    # two calls draw different subsamples
    a = pyro.poutine.trace(guide).get_trace(data).nodes["data"]["value"]
    b = pyro.poutine.trace(guide).get_trace(data).nodes["data"]["value"]
    assert not torch.equal(a, b)


def test_the_guides_log_density_weights_the_members_by_n_over_b(data):
    guide = _guide(subsampled_model(), data)
    gt = pyro.poutine.trace(guide).get_trace(data)
    aux = next(k for k in gt.nodes if k.endswith("_latent"))
    flat = gt.nodes[aux]["value"]
    ind = gt.nodes["data"]["value"]
    amortizer = guide._amortizer
    context, _ = guide.condition({"x": data[ind]}, "test", True)
    sub = amortizer.subsampled(context, N)
    assert sub.member_scale == pytest.approx(N / B)
    with torch.no_grad():
        lp = {w: float(amortizer.flat_log_prob(flat, sub._replace(member_scale=w))) for w in (0.0, 1.0, N / B)}
        # the sampling-time density (cached on the aux site) is the scaled one
        assert float(gt.nodes[aux]["fn"].log_prob(flat)) == pytest.approx(lp[N / B], rel=1e-4, abs=1e-3)
    # log q = log q(globals) + (N / B) * sum over the subsample of log q(member | globals)
    assert lp[N / B] == pytest.approx(lp[0.0] + (N / B) * (lp[1.0] - lp[0.0]), rel=1e-4, abs=1e-2)
    # the summary's log N is the plate's full size, not the subsample's
    assert not torch.allclose(sub.pooled, context.pooled)


def test_subsampled_svi_reaches_the_exact_posterior_of_the_global(data):
    pyro.set_rng_seed(0)
    model = subsampled_model()
    guide = _guide(model, data)
    svi = pyro.infer.SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995}), pyro.infer.Trace_ELBO())
    for _ in range(800):
        svi.step(data)
    prec = 1 + N / 2  # x_i ~ N(mu, 2) marginally
    mean, sd = float(data.sum() / 2 / prec), prec ** -0.5
    with torch.no_grad():
        s = guide.posterior(x=data).sample(4000)["mu"]
    assert abs(float(s.mean()) - mean) < 0.5 * sd
    assert 0.7 < float(s.std()) / sd < 1.35


def test_a_per_coordinate_guide_refuses_a_subsampled_latent_plate_naming_it(data):
    model = subsampled_model()
    pyro.clear_param_store()
    guide = StructuredGuide(model, model_args=(data,), observed=["x"])
    with pytest.raises(ModelStructureError, match="subsampled plate 'data'.*plates='auto'"):
        pyro.poutine.trace(guide).get_trace(data)
