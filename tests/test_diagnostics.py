"""Trust diagnostics: PSIS importance weights and log-evidence, simulation-based calibration,
refinement and the prior-predictive check, on linear-Gaussian networks with closed-form posteriors."""

import json
import math
import warnings

import pytest
import torch

import pyro_struct as ps
from pyro_struct import StructuredGuide
from pyro_struct.cli import main as cli_main
from pyro_struct.diagnostics import importance, pareto_k, prior_predictive_check, refine
from pyro_struct.models import LinearGaussianNetwork

from benchmarks.diagnostics import exact_log_evidence


# ------------------------------------------------------------------------------ fixtures
class ExactPosterior:
    """The closed-form posterior of a linear-Gaussian network (covariance scaled by ``scale**2``),
    with the members of :class:`~pyro_struct.Posterior` the diagnostics use."""

    def __init__(self, guide, net, observations, scale=1.0):
        self.guide, self.net = guide, net
        self.observations = dict(observations)
        mean, cov = net.exact_posterior(observations)
        self.batch_shape = mean.shape[:-1]
        self._q = torch.distributions.MultivariateNormal(mean, covariance_matrix=scale**2 * cov)

    def sample_and_log_prob(self, n=1):
        z = self._q.sample((n,))
        log_q = self._q.log_prob(z).to(torch.get_default_dtype())
        z = z.to(torch.get_default_dtype())
        return {s: z[..., i] for i, s in enumerate(self.net.latent_sites)}, log_q

    def sample(self, n=1):
        return self.sample_and_log_prob(n)[0]


class ExactGuide(StructuredGuide):
    """A structured guide whose posterior is the exact one (its flow is never used)."""

    def __init__(self, net, scale=1.0):
        super().__init__(net.model)
        self.net, self.scale = net, scale
        self.history = [0.0]  # "trained": no untrained-guide warning

    def posterior(self, *args, **observations):
        obs = dict(args[0]) if args else {}
        obs.update(observations)
        return ExactPosterior(self, self.net, obs, self.scale)


@pytest.fixture(scope="module")
def net():
    return LinearGaussianNetwork.random(6, seed=1)


@pytest.fixture(scope="module")
def obs(net):
    return net.sample_observations(4, torch.Generator().manual_seed(5))


def _trained(net, steps, seed=0):
    torch.manual_seed(seed)
    guide = StructuredGuide(net.model)
    if steps:
        guide.fit(num_steps=steps, batch_size=128, progress=False, seed=seed)
    return guide


@pytest.fixture(scope="module")
def trained(net):
    return _trained(net, 100)


@pytest.fixture(scope="module")
def undertrained(net):
    return _trained(net, 12)


def _exact_reverse_kl(net, post, obs, n=4000):
    """``KL(q || p(z | x))`` per observation, with the exact posterior density."""
    z, log_q = post.sample_and_log_prob(n)
    return (log_q.double() - net.posterior_log_prob(obs, net.stack_latents(z))).mean(0)


# ------------------------------------------------------------------------------ PSIS
@pytest.mark.parametrize("shape", [0.3, 0.8, 1.5])
def test_pareto_k_recovers_the_tail_shape_of_pareto_distributed_weights(shape):
    # w = exp(shape * Exp(1)) is Pareto with tail index 1 / shape: a generalised Pareto tail of shape `shape`
    g = torch.Generator().manual_seed(0)
    log_w = shape * torch.empty(20000, 3, dtype=torch.float64).exponential_(generator=g)
    k = pareto_k(log_w)
    assert k.shape == (3,)
    assert torch.allclose(k, torch.full_like(k, shape), atol=0.12), k


def test_log_evidence_of_a_trained_guide_matches_the_exact_marginal_likelihood(net, obs, trained):
    exact = exact_log_evidence(net, obs)
    w = trained.posterior(obs).importance(4000)
    assert w.log_evidence.shape == (4,)
    assert torch.allclose(w.log_evidence.double(), exact, atol=0.03), (w.log_evidence, exact)
    # the self-normalised weights sum to one per observation; the ESS is at most the sample size
    assert torch.allclose(torch.logsumexp(w.log_weights, 0), torch.zeros(4), atol=1e-5)
    assert ((w.ess > 0) & (w.ess <= 4000 + 1e-3)).all()
    # with the exact posterior every weight equals p(x): the estimate is exact up to rounding
    exact_w = importance(ExactPosterior(trained, net, obs), 500)
    assert torch.allclose(exact_w.log_evidence.double(), exact, atol=2e-3)
    assert (exact_w.ess > 499).all()


def test_pareto_k_is_small_for_a_trained_guide_and_large_with_a_warning_for_an_untrained_one(net, obs, trained):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained guide warns about nothing
        w = trained.posterior(obs).importance(2000)
    assert (w.pareto_k < 0.7).all(), w.pareto_k
    # an untrained guide is the flow's standard-normal base: far wider than this network's posterior
    wide = LinearGaussianNetwork.random(8, seed=2)
    untrained = _trained(wide, 0)
    with pytest.warns(UserWarning) as record:
        w0 = untrained.posterior(wide.sample_observations(4, torch.Generator().manual_seed(5))).importance(2000)
    assert (w0.pareto_k > 0.7).all(), w0.pareto_k
    messages = " ".join(str(r.message) for r in record)
    assert "guide.history is empty" in messages
    assert "observation (0,)" in messages and "refine" in messages


def test_resampled_moments_are_closer_to_the_exact_posterior_than_the_raw_guide(net, obs, undertrained):
    torch.manual_seed(1)
    post = undertrained.posterior(obs)
    mean, cov = net.exact_posterior(obs)
    sd = cov.diagonal().sqrt()
    raw = net.stack_latents(post.sample(4000)).double()
    w = post.importance(4000, warn=False)
    resampled = net.stack_latents(w.resample(4000)).double()
    assert resampled.shape == raw.shape == (4000, 4, 3)
    raw_err = ((raw.mean(0) - mean) / sd).abs().mean()
    res_err = ((resampled.mean(0) - mean) / sd).abs().mean()
    assert res_err < 0.5 * raw_err, (raw_err, res_err)
    raw_sd_err = (raw.std(0) / sd).log().abs().mean()
    res_sd_err = (resampled.std(0) / sd).log().abs().mean()
    assert res_sd_err < raw_sd_err, (raw_sd_err, res_sd_err)
    # the weighted mean agrees with the resampled one
    weighted = net.stack_latents(w.mean).double()
    assert ((weighted - mean) / sd).abs().mean() < 0.5 * raw_err


# ------------------------------------------------------------------------------ refine
def test_refine_reduces_the_exact_kl_and_leaves_the_guide_unchanged(net, obs, undertrained):
    torch.manual_seed(2)
    before_state = {k: v.clone() for k, v in undertrained.state_dict().items()}
    post = undertrained.posterior(obs)
    refined = post.refine(60)
    record = refined.refinement
    assert record.num_steps == 60 and len(record.history) == 60 and record.seconds > 0 and not record.kept_amortized
    assert record.elbo_before.shape == record.elbo_after.shape == (4,)
    assert (record.elbo_after > record.elbo_before).all(), record
    kl_before = _exact_reverse_kl(net, post, obs)
    kl_after = _exact_reverse_kl(net, refined, obs)
    assert (kl_after < 0.7 * kl_before).all(), (kl_before, kl_after)
    # the ELBO gain is the KL drop (log p(x) is common to both)
    assert torch.allclose(record.kl_reduction.double(), kl_before - kl_after, rtol=0.0, atol=0.05 + 0.25 * float(kl_before.max()))
    for k, v in undertrained.state_dict().items():
        assert torch.equal(v, before_state[k]), f"refine changed the guide's {k}"
    assert refined.guide is not undertrained


def test_refine_keeps_the_amortised_parameters_when_the_elbo_falls(obs, trained):
    torch.manual_seed(4)
    post = trained.posterior(obs)
    with pytest.warns(UserWarning, match="amortised posterior is returned unchanged"):
        refined = post.refine(5, lr=3.0, estimator="reparam")  # a step size that wrecks the flow
    assert refined.refinement.kept_amortized
    for (name, a), b in zip(trained.flow.state_dict().items(), refined.guide.flow.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="estimator must be one of"):
        post.refine(5, estimator="score")


def _exact_forward_kl(net, post, obs, n=4000):
    """``KL(p(z | x) || q)`` per observation, from exact posterior draws."""
    mean, cov = net.exact_posterior(obs)
    z = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((n,))
    values = {s: z[..., i].to(torch.get_default_dtype()) for i, s in enumerate(net.latent_sites)}
    return (net.posterior_log_prob(obs, z) - post.log_prob(values).double()).mean(0)


def test_forward_refinement_covers_the_posterior_and_raises_the_ess(net, obs, undertrained):
    torch.manual_seed(6)
    before_state = {k: v.clone() for k, v in undertrained.state_dict().items()}
    post = undertrained.posterior(obs)
    refined = post.refine(60, estimator="forward", num_particles=256, lr=1e-2)
    record = refined.refinement
    assert record.estimator == "forward" and not record.kept_amortized and len(record.history) == 60
    assert record.ess_before.shape == record.ess_after.shape == (4,)
    assert record.ess_after.sum() > record.ess_before.sum(), record
    fkl_before, fkl_after = _exact_forward_kl(net, post, obs), _exact_forward_kl(net, refined, obs)
    assert (fkl_after < 0.25 * fkl_before).all() and (record.ess_after > 0.8).all(), (fkl_before, fkl_after, record)
    assert record.pareto_k_before.shape == record.pareto_k_after.shape == (4,) and (record.pareto_k_after < 0.7).all()
    for k, v in undertrained.state_dict().items():
        assert torch.equal(v, before_state[k]), f"refine changed the guide's {k}"


def test_a_forward_refinement_is_judged_by_its_weights():
    from pyro_struct.diagnostics.refinement import _worse

    def scores(elbo, ess, k):
        return torch.tensor([elbo]), torch.tensor([ess]), torch.tensor([k])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a higher ESS with a tail past 0.7 is worse; a lower k past 0.7 is better whatever the ESS
        assert _worse(scores(0.0, 0.5, 0.5), scores(0.0, 0.9, 0.8), "forward", 1e-2)
        assert not _worse(scores(0.0, 0.5, 1.2), scores(0.0, 0.1, 0.9), "forward", 1e-2)
        # both tails reliable: the ESS decides, and the ELBO does not matter
        assert _worse(scores(5.0, 0.6, 0.2), scores(9.0, 0.4, 0.1), "forward", 1e-2)
        assert not _worse(scores(9.0, 0.4, 0.3), scores(5.0, 0.6, 0.5), "forward", 1e-2)
        # the reverse KL is judged by its ELBO alone
        assert _worse(scores(9.0, 0.4, 0.3), scores(5.0, 0.9, 0.1), "stl", 1e-2)
    with pytest.warns(UserWarning, match="Pareto-k"):
        _worse(scores(0.0, 0.5, 0.5), scores(0.0, 0.9, 0.8), "forward", 1e-2)


# ------------------------------------------------------------------------------ calibration
def test_calibration_coverage_is_nominal_for_the_exact_posterior_and_off_for_a_too_narrow_one(net):
    torch.manual_seed(3)
    N = 400
    exact = ps.calibration(ExactGuide(net), num_simulations=N, num_samples=99)
    assert exact.ranks.shape == (N, 3) and exact.labels == net.latent_sites
    cov = exact.coverage()
    assert {0.5, 0.9} <= set(cov)
    for level, c in cov.items():
        se = math.sqrt(level * (1 - level) / N)
        assert ((c - level).abs() < 4 * se).all(), (level, c)
    assert (exact.uniformity() > 1e-3).all()

    narrow = ps.calibration(ExactGuide(net, scale=0.5), num_simulations=N, num_samples=99)
    c90 = narrow.coverage([0.9])[0.9]
    assert (c90 < 0.75).all(), c90  # sd x 0.5: a 90% interval covers about 59%
    assert (narrow.uniformity() < 1e-6).all()
    rows = narrow.summary_rows("site")
    assert [r["site"] for r in rows] == net.latent_sites
    assert all(r["uniformity_p"] < 1e-6 and r["z_sd"] > 1.5 for r in rows)


def test_calibration_summaries_follow_the_inverse_depths_and_the_plot_is_written(net, trained, tmp_path):
    from pyro_struct.dag import levels as latent_levels

    result = ps.calibration(trained, num_simulations=50, num_samples=20)
    levels = latent_levels(torch.as_tensor(trained.inverse.adjacency()).bool())
    expected = {trained.inverse.order[int(i)]: d for d, level in enumerate(levels) for i in level}
    assert result.depths == [expected[label] for label in result.labels]
    by_depth = result.summary_rows("depth")
    assert [r["depth"] for r in by_depth] == sorted(set(expected.values()))
    assert sum(r["coordinates"] for r in by_depth) == 3
    json.dumps(result.to_dict())  # JSON-ready
    path = result.plot(tmp_path / "sbc.png")
    assert (tmp_path / "sbc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("sbc.png")
    lower, upper = result.ecdf_band(torch.linspace(0, 1, 11, dtype=torch.float64))
    assert (lower <= 0).all() and (upper >= 0).all() and (upper - lower).max() < 0.6


# ------------------------------------------------------------------------------ checks and bad input
def test_prior_predictive_check_flags_only_far_values_with_their_distance(net, trained):
    sims = trained.simulator().simulate(2000)
    site = net.observed_sites[0]
    sd = float(sims[site].std())
    hi = float(sims[site].max())
    obs = {s: torch.stack([sims[s][0], sims[s][1]]) for s in net.observed_sites}
    obs[site] = torch.tensor([float(sims[site][0]), hi + 10 * sd])
    notes = prior_predictive_check(trained, obs, num_simulations=2000)
    assert [(n.site, n.observation) for n in notes] == [(site, (1,))]
    assert 8 < notes[0].distance_sd < 12
    assert site in str(notes[0]) and "extrapolates" in str(notes[0])
    with pytest.raises(ValueError, match="'nope' is not an observed site"):
        prior_predictive_check(trained, {"nope": torch.tensor(0.0)})


def test_bad_input_gets_messages_naming_the_argument(net, obs, trained):
    post = trained.posterior(obs)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        post.importance(0)
    with pytest.raises(ValueError, match="num_simulations must be an int >= 10"):
        ps.calibration(trained, num_simulations=5)
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        refine(post, 0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        refine(post, 5, lr=-1.0)
    with pytest.warns(UserWarning, match="never trained"):
        ps.calibration(_trained(net, 0), num_simulations=10, num_samples=5)
    with pytest.raises(ValueError, match="resample: n must be a positive int"):
        post.importance(50, ).resample(0)


def test_cli_check_writes_calibration_plots_and_importance_diagnostics(net, tmp_path, capsys):
    from pathlib import Path

    models = Path(__file__).resolve().parent / "models_for_cli.py"
    guide_path = tmp_path / "guide.pt"
    assert cli_main(["fit", f"{models}:chain", "--observed", "x", "--out", str(guide_path), "--steps", "60",
                     "--no-progress", "--hidden", "16", "--batch-size", "64"]) == 0
    (tmp_path / "obs.json").write_text(json.dumps({"x": [0.5, 40.0]}))
    code = cli_main(["check", str(guide_path), f"{models}:chain", "--obs", str(tmp_path / "obs.json"), "--out",
                     str(tmp_path / "report"), "--simulations", "40", "--samples", "20", "--importance-samples", "200"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "report" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "report" / "check.json").read_text())
    assert len(report["importance"]["pareto_k"]) == 2 and len(report["importance"]["ess"]) == 2
    assert [s["site"] for s in report["calibration"]["sites"]] == ["z1", "z2", "z3"]
    assert "pareto_k=" in out and "x[1]" not in out  # x is scalar: its batch element is an observation
    assert any("x=40" in line and "observation (1,)" in line for line in out.splitlines()), out
    assert cli_main(["check", str(guide_path), f"{models}:chain", "--simulations", "5"]) == 2  # a usage error
    assert "--simulations must be at least 10" in capsys.readouterr().err


def test_fit_runs_the_requested_checks_and_reports_them():
    from pyro_struct import StructuredGuide
    from pyro_struct.models import LinearGaussianNetwork

    net = LinearGaussianNetwork.random(4, seed=3)
    guide = StructuredGuide(net.model, observed=net.observed_sites, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        guide.fit(num_steps=2, progress=False, checks=["nope"])
    assert guide.history == []  # refused before training
    plain = guide.fit(num_steps=5, batch_size=32, progress=False)
    assert plain.checks == {} and "checks run: none" in plain.report()
    result = guide.fit(num_steps=5, batch_size=32, progress=False, checks=("skl", "calibration"))
    assert set(result.checks) == {"skl", "calibration"}
    report = result.report()
    assert "check skl: expected symmetrised KL" in report and "check calibration: SBC over 100" in report
    assert report.startswith("5 steps in")
