"""Tests of the robust default objective: heavy tails, infinite densities at guide samples, the warm-up across resume."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct.guide import StructuredGuide
from pyro_struct.layout import compress_tails, robust_moments
from pyro_struct.objectives import RobustSymmetrizedKL, compress_log_ratio, forward_kl, get_objective, symmetrized_kl
from pyro_struct.training import TrainingError

SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def eight_schools(y=None):
    """Non-centred eight schools: the HalfCauchy scale whose tail made the plain skl loss infinite."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, SIGMA), obs=y)


def truncated(x=None):
    """``log p = -inf`` for ``z > 1``, written as a naive truncation whose derivative there is
    ``0 / 0 = NaN``: the plain reverse term's gradient is NaN as soon as one guide sample crosses 1."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.factor("below_one", torch.log((1.0 - z) * (z < 1.0)))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


def test_eight_schools_default_fit_trains_and_samples_finite_values():
    # before: "TrainingError: the 'skl' loss is inf at step 75" with these defaults
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(32, 32))
    result = guide.fit(num_steps=150, progress=False, seed=0)
    assert len(result) == 150 and all(math.isfinite(v) for v in result)
    samples = guide.posterior(y=Y).sample(2000)
    assert all(torch.isfinite(v).all() for v in samples.values())
    tau = samples["tau"]
    # NUTS: tau 3.6 +- 3.3, mu 4.4 +- 3.2; a loose check after 150 steps
    assert 0.5 < tau.median() < 8 and 0 < samples["mu"].mean() < 9


def _finite_gradient(guide, objective, sim, sims) -> bool:
    guide.zero_grad(set_to_none=True)
    loss = objective(guide, sim, sims)
    loss.backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    return math.isfinite(float(loss)) and bool(grads) and all(torch.isfinite(g).all() for g in grads)


def test_minus_infinite_log_p_at_guide_samples_gives_a_finite_gradient():
    guide = StructuredGuide(truncated, observed=["x"], hidden_sizes=(8,))
    sim = guide.simulator()
    guide.set_standardization(sim.simulate(512))
    sims = sim.simulate(512)
    assert not torch.isfinite(sims.log_joint).all()  # the model really is -inf there
    plain = RobustSymmetrizedKL(0, 0, log_ratio_bound=None, mask_nonfinite=False)
    assert not _finite_gradient(guide, plain, sim, sims)
    objective = RobustSymmetrizedKL(warmup_steps=0, ramp_steps=0)
    assert _finite_gradient(guide, objective, sim, sims)
    assert objective.last_stats["dropped"] > 0
    # and training on it neither stops nor leaves non-finite parameters
    guide.fit(num_steps=20, batch_size=64, progress=False, seed=1)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_a_step_with_a_non_finite_gradient_is_skipped_and_eleven_in_a_row_stop():
    # a finite loss whose gradient is NaN at chosen steps (sqrt at 0 times a zero derivative), as a
    # density that is finite at a sample but overflows in the backward pass (stochastic volatility)
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,), normalizer="affine")
    bad = {3}
    def spiky(g, simulator, sims):
        loss = forward_kl(g, simulator, sims)
        if len(g.history) in bad:
            loss = loss + torch.sqrt(next(g.parameters()).sum() * 0)
        return loss
    result = guide.fit(num_steps=6, objective=spiky, batch_size=16, progress=False, seed=0)
    assert len(result) == 6 and result.skipped_steps == 1 and "1 skipped" in result.report()
    good = [p.detach().clone() for p in guide.parameters()]
    bad.update(range(6, 40))
    with pytest.raises(TrainingError, match="11 steps in a row"):
        guide.fit(num_steps=40, objective=spiky, batch_size=16, progress=False)
    assert len(guide.history) == 16 and all(torch.equal(p, q) for p, q in zip(guide.parameters(), good))


def test_guide_samples_beyond_exp_range_stay_finite():
    # a guide whose log tau spreads 100 times the prior's: exp overflowed to tau = inf and the
    # plain loss was inf; the constrained values are held finite and the soft clip bounds the loss
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,))
    sim = guide.simulator()
    guide.set_standardization(sim.simulate(256))
    tau = guide.latent_layout.perm.tolist().index(1)  # trace coordinate 1 is log tau
    guide.latent_layout.scale[tau] *= 100
    sims = sim.simulate(512)
    with torch.no_grad():
        z, _ = guide.rsample_q(guide.condition({"y": sims["y"]})[0], 1, torch.Size((512,)))
        assert torch.isfinite(z["tau"]).all() and z["tau"].max() > 1e18
        assert not math.isfinite(float(symmetrized_kl(guide, sim, sims)))
    objective = RobustSymmetrizedKL(warmup_steps=0, ramp_steps=0)
    assert _finite_gradient(guide, objective, sim, sims) and objective.last_stats["compressed"] > 0


def test_warm_up_schedule_follows_the_global_step():
    objective = RobustSymmetrizedKL(warmup_steps=10, ramp_steps=4)
    assert [objective.reverse_weight(s) for s in (0, 9, 10, 11, 12, 13, 100)] == [0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert RobustSymmetrizedKL(0, 0).reverse_weight(0) == 1
    assert get_objective("skl").warmup_steps > 0
    with pytest.raises(ValueError, match="warmup_steps"):
        RobustSymmetrizedKL(warmup_steps=-1)
    with pytest.raises(ValueError, match="log_ratio_bound"):
        RobustSymmetrizedKL(log_ratio_bound=0)


def test_the_clip_bound_doubles_after_the_ramp_and_lets_far_samples_count_later():
    objective = RobustSymmetrizedKL(warmup_steps=10, ramp_steps=4, log_ratio_bound=20.0, bound_doubling_steps=5)
    assert [objective.bound_at(s) for s in (0, 14, 19, 24)] == [20.0, 20.0, 40.0, 80.0]
    assert RobustSymmetrizedKL(bound_doubling_steps=None).bound_at(10**6) == 20.0
    assert RobustSymmetrizedKL(log_ratio_bound=None).bound_at(10**6) is None
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="bound_doubling_steps"):
            RobustSymmetrizedKL(bound_doubling_steps=bad)
    # the same guide and simulations: compressed at the first step, taken at full weight much later
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,))
    sim = guide.simulator()
    guide.set_standardization(sim.simulate(256))
    guide.latent_layout.scale[guide.latent_layout.perm.tolist().index(1)] *= 30  # a too-wide log tau
    sims = sim.simulate(256)
    objective = RobustSymmetrizedKL(warmup_steps=0, ramp_steps=0)
    values = []
    for steps in (0, 40_000):
        guide.history = [0.0] * steps
        torch.manual_seed(0)
        with torch.no_grad():
            values.append(float(objective(guide, sim, sims)))
        values.append(objective.last_stats["compressed"])
    assert values[1] > 0 and values[3] == 0 and values[2] > values[0]
    assert objective.last_stats["log_ratio_bound"] > 1e38


def test_warm_up_is_reproduced_across_resume(tmp_path):
    # the reverse term switches on at step 6 of the global step, whether or not the fit was resumed there
    objective = RobustSymmetrizedKL(warmup_steps=6, ramp_steps=4)
    weights = []
    def recording(guide, simulator, sims):
        loss = objective(guide, simulator, sims)
        weights.append(objective.last_stats["reverse_weight"])
        return loss
    options = dict(batch_size=32, lr_schedule=None, progress=False, objective=recording)
    guides = []
    for _ in range(2):
        torch.manual_seed(0)
        guides.append(StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,)))
    pyro.set_rng_seed(3)
    reference = list(guides[0].fit(num_steps=14, **options))
    reference_weights, weights[:] = list(weights), []
    path = tmp_path / "ck.pt"
    pyro.set_rng_seed(3)
    guides[1].fit(num_steps=4, checkpoint=path, checkpoint_every=2, **options)
    resumed_guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,))
    resumed = resumed_guide.fit(num_steps=14, checkpoint=path, resume=True, **options)
    assert weights[4:] == reference_weights[4:] and reference_weights[:6] == [0] * 6 and reference_weights[-1] == 1
    assert list(resumed) == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_soft_clip_is_the_identity_inside_and_logarithmic_outside():
    s = torch.tensor([-1e30, -25.0, -3.0, 0.0, 19.9, 21.0, 1e30], requires_grad=True)
    c = compress_log_ratio(s, 20.0)
    assert torch.equal(c[2:5], s[2:5].detach())
    assert c[5].item() == pytest.approx(20 + math.log(2)) and c[1].item() == pytest.approx(-20 - math.log1p(5))
    assert c[-1].item() == pytest.approx(20 + math.log1p(1e30 - 20)) and c[0].item() == -c[-1].item()
    c.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[5].item() == pytest.approx(0.5)


def test_context_tails_are_compressed_and_standardisation_is_robust():
    s = torch.tensor([-1e38, -7.0, -5.0, 0.3, 5.0, 6.0, 1e38])
    out = compress_tails(s, 5.0)
    assert torch.equal(out[2:5], s[2:5]) and out[5].item() == pytest.approx(5 + math.asinh(1.0))
    assert torch.isfinite(out).all() and out.abs().max() < 100 and (out.diff() > 0).all()
    # one HalfCauchy-sized outlier in 1,000 normal draws leaves the scale near 1 (the sd would be ~30)
    x = torch.randn(1000, 1)
    x[0] = 1e3
    loc, scale = robust_moments(x)
    assert abs(loc.item()) < 0.15 and 0.85 < scale.item() < 1.15
    assert robust_moments(torch.ones(10, 1))[1].item() == 1.0


def test_a_time_budget_alone_sets_no_step_limit():
    from pyro_struct.training.schedule import DEFAULT_NUM_STEPS, UNBOUNDED_STEPS, resolve_num_steps

    assert resolve_num_steps(None, None) == DEFAULT_NUM_STEPS and resolve_num_steps(None, 5.0) == UNBOUNDED_STEPS
    assert resolve_num_steps(7, 5.0) == 7
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(4,), normalizer="affine")
    result = guide.fit(time_budget=1.0, batch_size=8, progress=False)
    assert result.stopped_by == "time_budget" and result.num_steps > 1


def test_constrained_models_get_a_spline_layer_by_default():
    guide = StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,))
    assert guide.flow.normalizer_name == "spline+affine"
    assert StructuredGuide(truncated, observed=["x"], hidden_sizes=(8,)).flow.normalizer_name == "affine"
    assert StructuredGuide(eight_schools, observed=["y"], hidden_sizes=(8,), num_layers=2).flow.normalizer_name == "affine"


def test_straf_takes_one_normaliser_per_layer():
    from pyro_struct.flows.straf import StrAF

    A = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    torch.manual_seed(0)
    flow = StrAF(A, context_dim=1, normalizer=["spline", "affine"], hidden_sizes=(8,))
    assert flow.num_layers == 2 and flow.normalizer_name == "spline+affine"
    for p in flow.parameters():
        p.data += 0.1 * torch.randn_like(p)
    eps, x = torch.randn(50, 2), torch.randn(50, 1)
    z, logdet = flow(eps, x)
    assert torch.allclose(flow.log_prob(z, x), flow.base_log_prob(eps) - logdet, atol=1e-4)
    with torch.no_grad():  # the level-by-level sampler agrees
        assert torch.allclose(flow(eps, x)[0], z, atol=1e-4)
    with pytest.raises(ValueError, match="one normaliser per layer"):
        StrAF(A, context_dim=1, normalizer=["spline", "affine"], num_layers=3)
    with pytest.raises(ValueError, match="unknown normalizer 'splin'"):
        StrAF(A, context_dim=1, normalizer=["splin"])


def _plated(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("n", 5):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def _nested(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("g", 3, dim=-2):
        a = pyro.sample("a", dist.Normal(mu, 1.0))
        with pyro.plate("m", 4, dim=-1):
            pyro.sample("x", dist.Normal(a, 1.0), obs=x)


def _chain(T=6, y=None):
    z = torch.tensor(0.0)
    for t in pyro.markov(range(T)):
        z = pyro.sample(f"z_{t}", dist.Normal(0.8 * z, 1.0))
        pyro.sample(f"y_{t}", dist.Normal(z, 1.0), obs=None if y is None else y[t])


def _outlier_layouts():
    """(layout, mild observations, the same with one value at 1e30) for the three shared-weight layouts."""
    torch.manual_seed(0)
    x = torch.randn(5)
    plate = StructuredGuide(_plated, observed=["x"], plates="auto", hidden_sizes=(4,)).plate_layout
    xn = torch.randn(3, 4)
    nested = StructuredGuide(_nested, observed=["x"], plates="auto", hidden_sizes=(4,)).plate_layout
    y = {f"y_{t}": torch.randn(()) for t in range(6)}
    chain = StructuredGuide(_chain, observed=list(y), chains="auto", hidden_sizes=(4,), rnn_hidden=2).chain_layout
    out = []
    for layout, obs, site in ((plate, {"x": x}, "x"), (nested, {"x": xn}, "x"), (chain, y, "y_3")):
        far = dict(obs)
        far[site] = obs[site].clone().reshape(-1)
        far[site][0] = 1e30
        far[site] = far[site].reshape(obs[site].shape)
        out.append((layout, obs, far))
    return out


@pytest.mark.parametrize("index", [0, 1, 2], ids=["plate", "nested plate", "chain"])
def test_every_shared_weight_layout_compresses_context_tails(index):
    layout, obs, far = _outlier_layouts()[index]
    layout.set_observed_statistics(obs)
    mild = [t for t in layout.observe(obs) if isinstance(t, torch.Tensor)]
    raw = [t for t in layout.observe(obs, compress=False) if isinstance(t, torch.Tensor)]
    for a, b in zip(mild, raw):  # values within the bound are unchanged
        assert torch.allclose(a, b)
    squashed = [t for t in layout.observe(far) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    assert all(torch.isfinite(t).all() and t.abs().max() < 100 for t in squashed)
    assert max(float(t.abs().max()) for t in layout.observe(far, compress=False)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()) > 1e20


def _funnel(y=None):
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("k", 3):
        z = pyro.sample("z", dist.Normal(0.0, torch.exp(v / 2)))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def _located(y=None):  # the same sites, v moves z's location only
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("k", 3):
        z = pyro.sample("z", dist.Normal(v, 1.0))
        pyro.sample("y", dist.Normal(z, torch.exp(z / 2)), obs=y)  # an observation's scale set by a latent


def test_a_latent_set_scale_gets_a_spline_layer_by_default():
    from pyro_struct.compile import latent_scale_sites
    from pyro_struct.models import LinearGaussianNetwork

    funnel = StructuredGuide(_funnel, observed=["y"], hidden_sizes=(8,))
    assert funnel.bn.sites["z"].scale_parents == ("v",) and latent_scale_sites(funnel.bn) == ["z"]
    assert funnel.flow.normalizer_name == "spline+affine"
    located = StructuredGuide(_located, observed=["y"], hidden_sizes=(8,))
    assert located.bn.sites["z"].scale_parents == () and located.bn.sites["y"].scale_parents == ("z",)
    assert latent_scale_sites(located.bn) == [] and located.flow.normalizer_name == "affine"
    net = LinearGaussianNetwork.random(6, seed=1)
    assert StructuredGuide(net.model).flow.normalizer_name == "affine"
    assert StructuredGuide(_funnel, observed=["y"], hidden_sizes=(8,), normalizer="affine").flow.normalizer_name == "affine"
