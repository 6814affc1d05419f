"""The model zoo: its NUTS references stay in sync with the registry, and a short default fit agrees with NUTS."""

import functools
import math

import pyro
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from benchmarks.zoo import compare, passes, run_model
from tests.zoo import MODELS, coordinate_names, flatten_latents, get
from tests.zoo.references import load_references

REFS = load_references()

# quick models the default fit meets the loose tolerances on (measured at 600 steps, seed 0, with the
# robust default: dirichlet_beta 0.02 sd / sd ratio 1.04, logistic_regression 0.067 / 0.87, eight schools
# non-centred 0.22 / 1.16, which raised TrainingError at step 75 before it), and one it does not yet
# (linear_regression: its amortised sigma misses, its importance-resampled answer does not). Fixed steps, not a time budget: 30 s of wall-clock at load 11 gave
# only 70 steps, so a budget would test the machine's load. (At 300 steps logistic_regression was 0.81 sd
# off: the robust objective's forward warm-up and ramp take the first 200 steps.)
SHORT = ["dirichlet_beta", "logistic_regression", "eight_schools_noncentered"]
KNOWN_MISS = ["linear_regression"]
SHORT_STEPS = 600  # about 8-17 CPU-seconds each
LOOSE_MEAN_ERROR, LOOSE_SD_RATIO = 0.5, (0.5, 2.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_references_cover_every_model_latent_coordinate_and_observation(name):
    m = MODELS[name]
    assert name in REFS["models"], f"no NUTS reference for {name!r}: run python -m tests.zoo.references --models {name}"
    entry = REFS["models"][name]
    assert entry["latents"] == list(m.latents)
    assert list(entry["coordinates"]) == coordinate_names(m.latent_shapes())
    # the fixed data set is still what the registry builds (seeded generators, classic data)
    assert sorted(entry["observations"]) == sorted(m.observations)
    for site, value in m.observations.items():
        assert torch.allclose(torch.as_tensor(value, dtype=torch.float32), torch.tensor(entry["observations"][site]),
                              atol=1e-5), site
    # a usable reference: converged chains, enough effective draws, positive sds where not constant
    for coord, c in entry["coordinates"].items():
        assert math.isfinite(c["mean"]) and math.isfinite(c["sd"]), coord
        if c["r_hat"] is not None:
            assert c["sd"] > 0 and c["r_hat"] < 1.05 and c["ess"] > 200, (coord, c)


def test_references_have_no_stale_models():
    assert sorted(REFS["models"]) == sorted(MODELS)


def test_flatten_latents_names_and_orders_coordinates():
    draws = {"a": torch.arange(6.0).reshape(2, 3), "L": torch.arange(8.0).reshape(2, 2, 2), "s": torch.tensor([1.0, 2.0])}
    shapes = {"a": (3,), "L": (2, 2), "s": ()}
    flat = flatten_latents(draws, shapes)
    assert list(flat) == ["a[0]", "a[1]", "a[2]", "L[0,0]", "L[0,1]", "L[1,0]", "L[1,1]", "s"]
    assert flat["L[1,0]"].tolist() == [2.0, 6.0] and flat["a[2]"].tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="draws of 'a' have shape"):
        flatten_latents({**draws, "a": torch.zeros(2, 4)}, shapes)
    with pytest.raises(KeyError, match="no zoo model 'nope'"):
        get("nope")


def test_compare_scores_exact_draws_near_zero_and_shifted_draws_by_their_shift():
    ref = {"coordinates": {"x": {"mean": 1.0, "sd": 2.0, "r_hat": 1.0, "ess": 1e4},
                           "c": {"mean": 1.0, "sd": 0.0, "r_hat": None, "ess": None}}}
    g = torch.Generator().manual_seed(0)
    x = 1.0 + 2.0 * torch.randn(20000, generator=g)
    shapes = {"x": (), "c": ()}
    good = compare({"x": x, "c": torch.ones(20000)}, shapes, ref)
    assert good["mean_error"] < 0.03 and abs(good["sd_ratio"] - 1) < 0.03 and passes(good)
    assert good["coordinates"] == 1  # the constant coordinate is skipped
    bad = compare({"x": 0.5 * x + 0.5 + 0.6, "c": torch.ones(20000)}, shapes, ref)  # sd halved, mean + 0.3 sd
    assert bad["mean_error"] == pytest.approx(0.3, abs=0.03) and bad["sd_ratio"] == pytest.approx(0.5, abs=0.02)
    assert not passes(bad)
    nan = compare({"x": torch.full((10,), math.nan), "c": torch.ones(10)}, shapes, ref)
    assert nan["nonfinite"] == 1 and not passes(nan)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHORT + [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="the default fit misses sigma's posterior here (issue #14 item 1); remove once it passes"))
    for n in KNOWN_MISS])
def test_short_default_fit_agrees_with_nuts(name):
    row = _short_row(name)
    assert row.get("error") is None, row["error"]
    assert row["mean_error"] < LOOSE_MEAN_ERROR, row
    assert LOOSE_SD_RATIO[0] < row["sd_ratio"] < LOOSE_SD_RATIO[1], row


@functools.lru_cache(maxsize=None)
def _short_row(name: str) -> dict:
    """The benchmark's row (amortised, importance-resampled and refined answers) after the short fit."""
    return run_model(get(name), None, REFS["models"][name], num_samples=3000, seed=0, num_steps=SHORT_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHORT + KNOWN_MISS)
def test_importance_resampling_corrects_the_short_fit(name):
    """Where the amortised answer misses (linear_regression's sigma), the guide's draws weighted by
    p(z, x) / q(z | x) are within the loose tolerances, with weights the Pareto-k trusts."""
    row = _short_row(name)
    assert row["is_k"] <= 0.7 and row["is_mean_error"] < LOOSE_MEAN_ERROR, row
    assert LOOSE_SD_RATIO[0] < row["is_sd_ratio"] < LOOSE_SD_RATIO[1], row
    # the semi-amortised answer is never judged worse than the amortised one by its own diagnostics
    assert row["ref_k"] <= max(row["is_k"], 0.7) + 0.15, row


def test_an_untrained_guide_fails_the_loose_tolerances():
    """The short test can fail: the default guide before training is far from NUTS on these models."""
    for name in SHORT:
        m = get(name)
        pyro.set_rng_seed(0)
        guide = m.guide()
        guide.fit(num_steps=0, progress=False)  # standardisation only, no training step
        with torch.no_grad():
            draws = guide.posterior(**m.observations).sample(2000)
        s = compare(draws, m.latent_shapes(), REFS["models"][name])
        assert s["mean_error"] >= LOOSE_MEAN_ERROR or not LOOSE_SD_RATIO[0] < s["sd_ratio"] < LOOSE_SD_RATIO[1], (name, s)


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m.nuts_model is not None])
def test_the_reparametrised_form_nuts_samples_has_the_same_posterior(name):
    """``p_nuts(u, x) = p_model(f(u), x) |det df/du|`` for the map ``f = to_latents`` at prior draws ``u``."""
    m = get(name)
    nuts = m.conditioned(reparametrised=True)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        tr = pyro.poutine.trace(nuts).get_trace(*m.args, **m.kwargs)
        sites = [s for s, n in tr.nodes.items() if n["type"] == "sample" and not n["is_observed"] and not site_is_subsample(n)]
        shapes = {s: tuple(tr.nodes[s]["value"].shape) for s in sites}
        sizes = [math.prod(v) for v in shapes.values()]
        u = torch.cat([tr.nodes[s]["value"].reshape(-1) for s in sites]).double()

        def unflatten(vec):
            parts = torch.split(vec, sizes)
            return {s: p.reshape((1,) + shapes[s]) for (s, p) in zip(sites, parts)}

        def f(vec):
            z = m.to_latents(unflatten(vec))
            return torch.cat([z[s].reshape(-1) for s in m.latents])

        _, logdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(f, u))
        z = m.to_latents(unflatten(u))
        latents = {s: z[s][0].float() for s in m.latents}
        model_lp = pyro.poutine.trace(pyro.poutine.condition(m.conditioned(), data=latents)).get_trace(
            *m.args, **m.kwargs).log_prob_sum()
        assert float(tr.log_prob_sum()) == pytest.approx(float(model_lp) + float(logdet), abs=1e-3 * (1 + abs(float(model_lp))))
