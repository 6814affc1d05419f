"""Shared-weight plate guides: the plate flow's density and structure, data sets of any size, simulate_with, fallbacks."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct import StructuredGuide
from pyro_struct.amortizer import FlatAmortizer, PlateAmortizer
from pyro_struct.flows import GraphicalResidualFlow as GRF, StrAF, StructuredCNF
from pyro_struct.flows.plated import PlatedStrAF

TAU = 0.5


def hierarchical(N=4, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu, TAU))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def globals_only(N=4, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def exact_hierarchical(x: torch.Tensor) -> torch.distributions.MultivariateNormal:
    """The exact posterior of ``(mu, z_1..N)`` given ``x`` (linear-Gaussian: from the joint precision)."""
    n = x.shape[-1]
    P = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    P[0, 0] = 1 + n / TAU**2
    P[0, 1:] = P[1:, 0] = -1 / TAU**2
    P[1:, 1:] = torch.eye(n, dtype=torch.float64) * (1 / TAU**2 + 1)
    b = torch.cat([torch.zeros(1, dtype=torch.float64), x.double()])
    cov = torch.linalg.inv(P)
    return torch.distributions.MultivariateNormal(cov @ b, covariance_matrix=0.5 * (cov + cov.T))


def exact_kl(guide, x: torch.Tensor, num_samples: int = 2000) -> float:
    """``KL(p(mu, z | x) || q)`` in nats, by Monte Carlo over exact posterior draws (q's density is exact)."""
    p = exact_hierarchical(x)
    s = p.sample((num_samples,))
    with torch.no_grad():
        log_q = guide.posterior(x=x).log_prob({"mu": s[:, 0].float(), "z": s[:, 1:].float()}).double()
    return float((p.log_prob(s) - log_q).mean())


# every flow family's plate flow, with options small enough for property tests
FAMILIES = {
    "straf": (StrAF, {"hidden_sizes": (16,), "num_layers": 2}),
    "grf": (GRF, {"hidden_sizes": (16,), "num_layers": 2, "inverse_tol": 1e-6}),
    "cnf": (StructuredCNF, {"hidden_sizes": (16,), "rtol": 1e-6, "atol": 1e-6}),
}


def random_plated_flow(seed=0, family="straf"):
    torch.manual_seed(seed)
    # two globals (g1 <- g0), two member latents (m1 <- m0), two member observations;
    # g0 pools obs 0 only, g1 pools both; one global observation feeds g1 and m0
    Ag = torch.tensor([[False, False, False], [True, False, True]])
    P = torch.tensor([[True, False], [True, True]])
    Am = torch.zeros(2, 2 + 2 + 1 + 2, dtype=torch.bool)
    Am[0, [2, 4, 5]] = True  # m0 <- g0, global obs, own obs 0
    Am[1, [0, 3, 6]] = True  # m1 <- m0, g1, own obs 1
    cls, options = FAMILIES[family]
    flow = PlatedStrAF(Ag, P, Am, member_obs_dim=2, family=cls, **options)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.fixture(scope="module")
def trained():
    """The hierarchical model's plate guide trained over N in [10, 200] (one fit shared by the tests)."""
    pyro.set_rng_seed(0)
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", hidden_sizes=(16, 16))
    guide.fit(num_steps=300, batch_size=64, progress=False, simulate_with={"N": (10, 200)}, seed=0)
    return guide


# ------------------------------------------------------------------ the flow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plated_flow_density_matches_its_samples_and_inverts(family):
    flow = random_plated_flow(0, family)
    assert isinstance(flow.global_flow, FAMILIES[family][0]) and isinstance(flow.member_flow, FAMILIES[family][0])
    g_ctx, m_obs = torch.randn(3, 1), torch.randn(3, 9, 2)
    y_g, y_m, log_q = flow.rsample_and_log_prob(g_ctx, m_obs, n=4)
    assert y_g.shape == (4, 3, 2) and y_m.shape == (4, 3, 9, 2) and log_q.shape == (4, 3)
    assert torch.allclose(flow.log_prob(y_g, y_m, g_ctx, m_obs), log_q, atol=1e-4)
    eps_g, eps_m = torch.randn(3, 2), torch.randn(3, 9, 2)
    yg, ym, _ = flow(eps_g, eps_m, g_ctx, m_obs)
    back_g, back_m, _ = flow.inverse(yg, ym, g_ctx, m_obs)
    assert torch.allclose(back_g, eps_g, atol=1e-4) and torch.allclose(back_m, eps_m, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_members_do_not_depend_on_other_members_and_globals_pool_only_their_parents(family):
    flow = random_plated_flow(1, family)
    g_ctx = torch.randn(1)
    n = 5
    # sampling: member i's latents depend on no other member's noise
    eps_m = torch.randn(n, 2)
    J = torch.autograd.functional.jacobian(lambda e: flow(torch.randn(2).detach() * 0, e, g_ctx, torch.ones(n, 2))[1], eps_m)
    J = J.abs().sum((1, 3))  # (member out, member in)
    assert torch.all(J[~torch.eye(n, dtype=torch.bool)] == 0) and torch.all(J.diagonal() > 0)
    # density: member i's noise depends on no other member's latents or observations, given the globals
    y_g, y_m, m_obs = torch.randn(2), torch.randn(n, 2), torch.randn(n, 2)
    for arg in (1, 3):
        args = [y_g, y_m, g_ctx, m_obs]

        def f(t, arg=arg):
            a = list(args)
            a[arg] = t
            return flow.inverse(*a)[1]

        J = torch.autograd.functional.jacobian(f, args[arg]).abs().sum((1, 3))
        assert torch.all(J[~torch.eye(n, dtype=torch.bool)] == 0)
    # global 0 pools observation coordinate 0 only
    Jg = torch.autograd.functional.jacobian(lambda o: flow.inverse(y_g, y_m, g_ctx, o)[0], m_obs)
    assert torch.all(Jg[0, :, 1] == 0) and Jg[0, :, 0].abs().sum() > 0 and Jg[1, :, 1].abs().sum() > 0


@pytest.mark.parametrize("flow", sorted(FAMILIES))
def test_parameter_count_does_not_depend_on_the_plate_size(flow):
    counts = []
    for n in (100, 10_000):
        guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": n}, flow=flow)
        assert isinstance(guide._amortizer, PlateAmortizer)
        assert isinstance(guide.flow.member_flow, FAMILIES[flow][0])
        counts.append((sum(p.numel() for p in guide.parameters()), guide.flow.num_effective_parameters()))
    assert counts[0] == counts[1]


# ------------------------------------------------------------------ the guide
def test_trained_over_sizes_the_guide_is_exact_at_every_size(trained):
    gen = torch.Generator().manual_seed(1)
    kls = {}
    for n in (10, 50, 200, 1000):
        mu = torch.randn((), generator=gen)
        x = mu + TAU * torch.randn(n, generator=gen) + torch.randn(n, generator=gen)
        kls[n] = exact_kl(trained, x, 2000 if n <= 200 else 500)
    print("exact KL per latent coordinate:", {n: round(k / (n + 1), 5) for n, k in kls.items()})
    # an untrained (prior-matched) guide is nats per coordinate off at N = 200
    for n in (10, 50, 200):
        assert kls[n] / (n + 1) < 0.02, (n, kls[n])
    assert kls[1000] / 1001 < 0.05


def test_a_grf_plate_guide_trained_over_sizes_is_exact_at_sizes_it_was_not_traced_with():
    # the GRF's stages are separate flows, so each member's residual blocks contract on their own:
    # training over N in [10, 50] reaches the exact posterior at sizes other than the traced 4
    pyro.set_rng_seed(0)
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", flow="grf", hidden_sizes=(16,))
    assert isinstance(guide.flow.member_flow, GRF) and guide.plate_note is None
    before = exact_kl(guide, torch.randn(20), 500)
    guide.fit(num_steps=150, batch_size=64, progress=False, simulate_with={"N": (10, 50)}, seed=0)
    gen = torch.Generator().manual_seed(2)
    for n in (10, 40):
        mu = torch.randn((), generator=gen)
        x = mu + TAU * torch.randn(n, generator=gen) + torch.randn(n, generator=gen)
        kl = exact_kl(guide, x, 1000)
        assert kl / (n + 1) < 0.02 < before / 21, (n, kl, before)


def test_posterior_answers_any_size_and_batches_of_equal_size(trained):
    post = trained.posterior(x=torch.randn(37))
    s = post.sample(6)
    assert s["mu"].shape == (6,) and s["z"].shape == (6, 37)
    assert post.log_prob(s).shape == (6,)
    xs = torch.randn(3, 21)
    batch = trained.posterior(x=xs)
    s = batch.sample(5)
    assert s["z"].shape == (5, 3, 21)
    lp = batch.log_prob(s)
    for i in range(3):
        one = trained.posterior(x=xs[i]).log_prob({"mu": s["mu"][:, i], "z": s["z"][:, i]})
        assert torch.allclose(lp[:, i], one, atol=1e-4)
    # the log density of its own samples matches the one returned while sampling
    values, log_q = batch.sample_and_log_prob(4)
    assert torch.allclose(batch.log_prob(values), log_q, atol=1e-3)
    with pytest.raises(ValueError, match="'z'"):
        batch.log_prob({"mu": s["mu"], "z": torch.zeros(5, 3, 22)})
    with pytest.raises(ValueError, match="'x'.*N members"):
        trained.posterior(x=torch.tensor(1.0))  # no plate dimension


def test_saved_plate_guide_loads_and_answers_the_same(trained, tmp_path):
    trained.save(tmp_path / "g.pt")
    loaded = StructuredGuide.load(tmp_path / "g.pt", hierarchical)
    x = torch.randn(15)
    values = trained.posterior(x=x).sample(3)
    with torch.no_grad():
        assert torch.allclose(trained.posterior(x=x).log_prob(values), loaded.posterior(x=x).log_prob(values), atol=1e-5)


def test_a_model_with_global_latents_only_learns_over_sizes():
    pyro.set_rng_seed(0)
    guide = StructuredGuide(globals_only, observed=["x"], plates="auto", hidden_sizes=(16,))
    assert guide.flow.member_flow is None
    guide.fit(num_steps=400, batch_size=64, progress=False, simulate_with={"N": [20, 60, 150]}, seed=0, objective="fkl")
    for n in (20, 150):
        x = 0.7 + torch.randn(n)
        p = torch.distributions.Normal(x.sum() / (n + 1), (1 / (n + 1)) ** 0.5)
        s = p.sample((2000,))
        with torch.no_grad():
            kl = (p.log_prob(s) - guide.posterior(x=x).log_prob({"mu": s})).mean()
        assert kl < 0.05, (n, float(kl))


# ------------------------------------------------------------------ errors and fallbacks
def test_simulate_with_an_unknown_argument_is_an_error_naming_it():
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto")
    with pytest.raises(ValueError, match="'M'.*does not take"):
        guide.fit(num_steps=1, progress=False, simulate_with={"M": (10, 20)})
    with pytest.raises(ValueError, match=r"simulate_with\['N'\]"):
        guide.fit(num_steps=1, progress=False, simulate_with={"N": (20, 10)})
    with pytest.raises(ValueError, match="num_simulations"):
        guide.fit(num_steps=1, progress=False, simulate_with={"N": [10]}, num_simulations=100)


def test_simulate_with_draws_every_kind_of_spec():
    from pyro_struct.training.fit import check_simulate_with, draw_arguments

    spec = check_simulate_with(hierarchical, {"N": (3, 5)})
    rng = torch.Generator().manual_seed(0)
    assert {draw_arguments(spec, rng)["N"] for _ in range(60)} == {3, 4, 5}
    assert {draw_arguments({"N": [7, 9]}, rng)["N"] for _ in range(40)} == {7, 9}
    assert draw_arguments({"N": lambda g: 11}, rng) == {"N": 11}


def non_exchangeable(N=4, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    first = (torch.arange(N) == 0).float()
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu * first, 1.0))  # only member 0 depends on mu
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_non_exchangeable_plate_falls_back_with_a_warning_naming_it():
    with pytest.warns(UserWarning, match="plate 'data'"):
        guide = StructuredGuide(non_exchangeable, observed=["x"], plates="auto")
    assert isinstance(guide._amortizer, FlatAmortizer)
    assert "'data'" in guide.structure.plate_note
    post = guide.posterior(x=torch.zeros(4))
    assert post.sample(2)["z"].shape == (2, 4)
    # without plates="auto" nothing is attempted and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StructuredGuide(non_exchangeable, observed=["x"]).plate_note is None


def test_plate_option_is_checked():
    with pytest.raises(ValueError, match="plates"):
        StructuredGuide(hierarchical, observed=["x"], plates="yes")


def test_the_pyro_guide_call_answers_a_plate_size_other_than_the_traced_one():
    import pyro.poutine as poutine
    from pyro.infer import SVI, Trace_ELBO

    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto")  # traced with N = 4
    x = torch.randn(30)
    tr = poutine.trace(guide).get_trace(30, x)
    assert tr.nodes["z"]["value"].shape == (30,)
    # the guide trace's density (auxiliary flow sample + Jacobian deltas) is the posterior's
    tr.compute_log_prob()
    total = sum(site["log_prob_sum"] for site in tr.nodes.values() if site["type"] == "sample")
    values = {k: tr.nodes[k]["value"] for k in ("mu", "z")}
    assert torch.allclose(total, guide.posterior(x=x).log_prob(values), atol=1e-4)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(30, x)))
