"""Covariates as context (issue #11 item 4): named tensor model arguments condition the guide."""

import pytest
import pyro
import pyro.distributions as dist
import torch

import pyro_struct as ps
from pyro_struct.covariates import CovariateValue, with_arguments

D, SIG = 2, 0.5  # weights; noise sd of `regression`


def regression(X, y=None):
    """Bayesian linear regression with known noise: w ~ N(0, I), y = X w + N(0, SIG^2)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, SIG), obs=y)


# ------------------------------------------------------------------------- structure
def test_covariate_is_an_observed_non_random_node_with_traced_edges():
    X = torch.randn(4, D)
    guide = ps.StructuredGuide(regression, covariates=["X"], model_args=(X,), observed=["y"])
    info = guide.bn.sites["X"]
    assert info.covariate and info.observed and info.shape == (4, D)
    assert guide.bn.graph.nodes["X[2,1]"]["covariate"]
    # element-level edges: row i of X feeds y[i] only
    edges = {e for e in guide.bn.graph.edges if e[0].startswith("X")}
    assert edges == {(f"X[{i},{j}]", f"y[{i}]") for i in range(4) for j in range(D)}
    # the inverse conditions w on the covariate: it is part of the flow's context
    assert guide.context_dim == 4 * D + 4
    assert set(guide.inverse.observed) >= {f"X[{i},{j}]" for i in range(4) for j in range(D)}


def test_zero_entries_of_the_traced_design_do_not_hide_edges():
    X = torch.zeros(3, D)
    guide = ps.StructuredGuide(regression, covariates="X", model_args=(X,), observed=["y"])
    assert {(f"w[{j}]", f"y[{i}]") for i in range(3) for j in range(D)} <= set(guide.bn.graph.edges)


def test_covariate_value_distribution():
    v = torch.tensor([[0.0, -2.0], [3.0, 1.0]])
    d = CovariateValue(v)
    s = d.sample((100,))
    assert s.shape == (100, 2, 2)
    assert (torch.sign(s[:, v != 0]) == torch.sign(v[v != 0])).all()  # signs kept, zeros jittered
    assert (s[:, 0, 0] != 0).all()
    assert torch.equal(CovariateValue(v, jitter=False).sample(), v)
    assert torch.equal(d.log_prob(v), torch.zeros(2, 2))


def test_with_arguments_replaces_a_positional_argument_by_name():
    X0, X1 = torch.zeros(2, D), torch.ones(2, D)
    args, kwargs = with_arguments(regression, (X0,), {}, {"X": X1})
    assert args[0] is X1 and kwargs == {}


# ----------------------------------------------------------------------------- errors
def test_unknown_covariate_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'Z'.*does not take"):
        ps.StructuredGuide(regression, covariates=["Z"], model_args=(torch.randn(3, D),), observed=["y"])


def test_non_tensor_covariate_is_an_error():
    with pytest.raises(TypeError, match="covariate 'X' must be a tensor"):
        ps.StructuredGuide(regression, covariates=["X"], model_args=([[0.0, 1.0]],), observed=["y"])


def test_missing_covariate_value_at_compile_is_an_error():
    with pytest.raises(ValueError, match="covariate 'X' has no value"):
        ps.StructuredGuide(regression, covariates=["X"], observed=["y"])


def test_wrong_or_missing_covariate_at_posterior_names_it_and_the_shape():
    guide = ps.StructuredGuide(regression, covariates=["X"], model_args=(torch.randn(3, D),), observed=["y"])
    with pytest.raises(ValueError, match=r"covariate 'X' has shape \(4, 2\).*expects shape \(3, 2\)"):
        guide.posterior(X=torch.randn(4, D), y=torch.randn(3))
    with pytest.raises(ValueError, match=r"missing covariate 'X'.*\(3, 2\)"):
        guide.posterior(y=torch.randn(3))
    with pytest.raises(ValueError, match=r"guide call: covariate 'X' has shape \(3, 5\)"):
        guide(torch.randn(3, 5), torch.randn(3))


def test_plate_guide_reports_the_plate_dimension_in_the_expected_shape():
    guide = ps.StructuredGuide(regression, covariates=["X"], model_args=(torch.randn(4, D),), observed=["y"], plates="auto")
    assert guide.plate_note is None
    assert "X[0,0]" in guide.plate_layout.member_observed_labels  # rows of X are member inputs
    with pytest.raises(ValueError, match=r"covariate 'X' has shape \(6, 3\).*\('N', 2\)"):
        guide.posterior(X=torch.randn(6, 3), y=torch.randn(6))
    # any N is accepted
    assert guide.posterior(X=torch.randn(9, D), y=torch.randn(9)).sample(3)["w"].shape == (3, D)


# --------------------------------------------------------------------- conditioning
def test_fixed_design_training_uses_the_traced_covariate():
    X = torch.randn(3, D)
    guide = ps.StructuredGuide(regression, covariates=["X"], model_args=(X,), observed=["y"])
    sims = guide.simulator().simulate(5)
    assert torch.equal(sims["X"], X.expand(5, 3, D))
    # the covariate is not a random variable: its log density is not part of log p
    assert torch.allclose(guide.simulator().log_joint(dict(sims)), sims.log_joint)


# designs whose exact posteriors differ (KL(p_a || p_b) = 3.5 nats at y below): a guide that
# ignores X answers both with one q, so its KL to one of them stays large
XA = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
XB = torch.tensor([[0.0, -1.0], [1.0, 0.0], [-1.0, 1.0]])
YAB = torch.tensor([1.5, -1.0, 0.5])


def unit_noise_regression(X, y=None):
    """``regression`` with noise sd 1 (posteriors that a short amortised training reaches)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def exact_unit(X, y):
    cov = torch.linalg.inv(torch.eye(D) + X.T @ X)
    return dist.MultivariateNormal(cov @ X.T @ y, cov)


def kl_to_exact(guide, p, X, y, n=4000):
    """Monte-Carlo ``KL(p || q(. | X, y))`` against an exact Gaussian ``p`` (its density is exact)."""
    z = p.sample((n,))
    with torch.no_grad():
        return float((p.log_prob(z) - guide.posterior(X=X, y=y).log_prob({"w": z})).mean())


def _check_two_designs(guide, Xa, Xb, y, own_tol, cross_min):
    pa, pb = exact_unit(Xa, y), exact_unit(Xb, y)
    assert float(torch.distributions.kl_divergence(pa, pb)) > cross_min
    own = (kl_to_exact(guide, pa, Xa, y), kl_to_exact(guide, pb, Xb, y))
    cross = (kl_to_exact(guide, pa, Xb, y), kl_to_exact(guide, pb, Xa, y))
    assert max(own) < own_tol, (own, cross)
    # a guide that ignores X gives one q for both designs: each exact posterior is then as far from
    # the q of its own design as from the other's (cross - own = 0)
    assert min(c - o for c, o in zip(cross, own)) > cross_min - own_tol, (own, cross)


def test_guide_trained_over_random_designs_gives_each_design_its_exact_posterior():
    torch.manual_seed(0)
    guide = ps.StructuredGuide(unit_noise_regression, covariates=["X"], model_args=(torch.randn(3, D),), observed=["y"])
    guide.fit(num_steps=1000, batch_size=128, objective="fkl", progress=False, seed=0,
              simulate_with={"X": lambda rng: torch.randn(3, D, generator=rng)})
    _check_two_designs(guide, XA, XB, YAB, own_tol=0.5, cross_min=1.5)
    # a guide call reads the design from its arguments: same conditioning as posterior(X=..., y=...)
    torch.manual_seed(1)
    call = torch.stack([guide(XB, YAB)["w"].detach() for _ in range(1000)])
    direct = guide.posterior(X=XB, y=YAB).sample(4000)["w"]
    assert torch.allclose(call.mean(0), direct.mean(0), atol=0.1)
    assert not torch.allclose(call.mean(0), guide.posterior(X=XA, y=YAB).sample(4000)["w"].mean(0), atol=0.5)
    # importance weights use the model at the posterior's design: log p(y | X) is exact in closed form
    for X in (XA, XB):
        evidence = dist.MultivariateNormal(torch.zeros(3), X @ X.T + torch.eye(3)).log_prob(YAB)
        assert abs(float(guide.posterior(X=X, y=YAB).importance(4000).log_evidence) - float(evidence)) < 0.05


def test_plate_guide_trained_over_designs_of_any_size():
    torch.manual_seed(0)
    # traced at 12 members: the template path (4 rows of the design) with the full-size check
    guide = ps.StructuredGuide(unit_noise_regression, covariates=["X"], model_args=(torch.randn(12, D),), observed=["y"],
                               plates="auto")
    assert guide.plate_note is None and guide.plate_trace_note.startswith("traced with plate 'data' shrunk to 4")

    def design(rng):  # N in [3, 12]: rows of X are plate members
        return torch.randn(int(torch.randint(3, 13, (), generator=rng)), D, generator=rng)

    guide.fit(num_steps=1000, batch_size=64, objective="fkl", progress=False, seed=0, simulate_with={"X": design})
    _check_two_designs(guide, XA, XB, YAB, own_tol=0.5, cross_min=1.5)
    Xa, Xb = torch.cat([XA, XA, -XB]), torch.cat([XB, -XB, XA])
    y = torch.cat([YAB, -YAB, YAB])
    _check_two_designs(guide, Xa, Xb, y, own_tol=0.3, cross_min=1.0)
    # importance weights at a size and design other than the traced ones: the closed-form evidence
    evidence = dist.MultivariateNormal(torch.zeros(9), Xa @ Xa.T + torch.eye(9)).log_prob(y)
    assert abs(float(guide.posterior(X=Xa, y=y).importance(4000).log_evidence) - float(evidence)) < 0.05


def test_a_design_is_traced_as_a_plate_template_with_the_structure_of_the_full_trace():
    # a regression with 4 rows is traced member by member, one with 5,000 through the 4-member
    # template (its design's rows cut with the plate): the same plate flow, compiled in a fraction
    full = ps.StructuredGuide(regression, covariates=["X"], model_args=(torch.randn(4, D),), observed=["y"], plates="auto")
    big = ps.StructuredGuide(regression, covariates=["X"], model_args=(torch.randn(5000, D),), observed=["y"], plates="auto")
    assert full.plate_trace_note is None and "shrunk to 4 of its 5000 members" in big.plate_trace_note
    assert big.bn.sites["X"].covariate and big.site_shapes["X"] == (5000, D)
    assert full.flow.member_flow is None and big.flow.member_flow is None  # (w and s are globals)
    assert torch.equal(full.flow.global_flow.adjacency, big.flow.global_flow.adjacency)
    assert torch.equal(full.flow.pooled, big.flow.pooled)
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in big.parameters())
    # the design's rows reach the members' conditioners: the posterior of w moves with X at fixed y
    y = torch.randn(5000)
    means = [big.posterior(X=X, y=y).sample(200)["w"].mean(0) for X in (torch.randn(5000, D), torch.randn(5000, D))]
    assert not torch.allclose(means[0], means[1])


def test_save_load_and_amortize_keep_the_covariates(tmp_path):
    X = torch.randn(3, D)
    guide = ps.StructuredGuide(regression, covariates=["X"], model_args=(X,), observed=["y"])
    guide.save(tmp_path / "g.pt")
    loaded = ps.StructuredGuide.load(tmp_path / "g.pt", regression, model_args=(X,))
    assert loaded.covariates == ("X",) and loaded.bn.sites["X"].covariate
    w, X2, y = torch.randn(5, D), torch.randn(3, D), torch.randn(3)
    assert torch.allclose(guide.posterior(X=X2, y=y).log_prob({"w": w}), loaded.posterior(X=X2, y=y).log_prob({"w": w}))
    model = ps.amortize(regression, covariates=["X"], model_args=(X,), observed=["y"])
    assert model.guide.covariates == ("X",) and model.guide.context_dim == 3 * D + 3
