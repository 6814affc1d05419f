"""Time chains: detection, the filtering inverse and its template, the shared-weight chain flow and chain guides."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_struct as ps
from pyro_struct.amortizer import ChainAmortizer, FlatAmortizer
from pyro_struct.chains import chain_elimination, chain_inverse, detect_chain, expand_chain_inverse, truncate_chain
from pyro_struct.flows.chain import ChainFlow, decayed_scan
from pyro_struct.inversion import ordered_inverse
from pyro_struct.models.hmm import hmm, hmm_posterior
from pyro_struct.models.state_space import ar1_state_space as ar_model  # AR(1) chain, globals rho and s; z_0 has no global parent

from .test_inversion import violations

def second_order(T=6):
    def model():
        zs = []
        for t in range(T):
            loc = 0.5 * zs[-2] if t >= 2 else torch.tensor(0.0)
            zs.append(pyro.sample(f"z_{t}", dist.Normal(loc, 1.0)))
            pyro.sample(f"x_{t}", dist.Normal(zs[-1], 0.5))

    return model


def observed(T):
    return [f"x_{t}" for t in range(T)]


def test_hmm_filtering_inverse_is_natural_top_mode():
    """For an HMM the chain's filtering order gives exactly NaMI's (minimal) top-mode inverse."""
    bn = ps.trace_model(hmm(6), observed=observed(6))
    chain, why = detect_chain(bn)
    assert why is None and chain.length == 6 and chain.latent_stems == ["z_"] and chain.observed_stems == ["x_"]
    inv = ordered_inverse(bn, chain_elimination(chain))
    top = ps.faithful_inverse(bn, mode="top")
    assert inv.order == top.order and all(set(inv.parents(v)) == set(top.parents(v)) for v in inv.order)
    assert violations(bn, inv) == []


def test_filtering_inverse_with_globals_is_faithful_and_matches_its_expansion():
    bn = ps.trace_model(ar_model(6), observed=observed(6))
    chain, _ = detect_chain(bn)
    assert chain.global_latents == ["rho", "s"]
    inv = ordered_inverse(bn, chain_elimination(chain))
    assert violations(bn, inv, minimal=False) == []
    assert inv.order[:2] == ["rho", "s"]  # the globals are sampled first
    template = chain_inverse(inv, chain)
    assert template.neighbour.tolist() == [[True]] and template.step_globals.tolist() == [[True, True]]
    assert template.global_pooled.tolist() == [True, True] and template.max_lag == 5
    expanded = expand_chain_inverse(template, 6)
    latents = set(bn.latent_nodes)
    for v in inv.order:  # latent parents exactly; observed parents: the summary's superset
        assert {p for p in expanded[v] if p in latents} == {p for p in inv.parents(v) if p in latents}, v
        assert set(inv.parents(v)) <= set(expanded[v]), v
    assert set(expanded["z_2"]) - latents == {"x_0", "x_1", "x_2"}  # h_2 stands for exactly x_0..x_2 here


@pytest.mark.parametrize("steps", [3, 4])
def test_truncated_chain_has_the_same_template(steps):
    """Step t's neighbourhood at its elimination involves steps <= t + 1 only: a few steps give the template."""
    bn = ps.trace_model(ar_model(9), observed=observed(9))
    chain, _ = detect_chain(bn)
    full = chain_inverse(ordered_inverse(bn, chain_elimination(chain)), chain)
    small_bn = truncate_chain(bn, chain, steps)
    small_chain, _ = detect_chain(small_bn)
    small = chain_inverse(ordered_inverse(small_bn, chain_elimination(small_chain)), small_chain)
    for name in ("within", "neighbour", "step_globals", "step_observed", "step_summary", "boundary_within",
                 "boundary_globals", "boundary_summary", "global_adjacency", "global_pooled"):
        assert torch.equal(getattr(full, name), getattr(small, name)), name


def test_chains_that_do_not_match_are_reported_with_their_sites():
    bn = ps.trace_model(second_order(6), observed=observed(6))
    chain, why = detect_chain(bn)
    assert chain is None and "'z_2'" in why and "'z_0'" in why and "first-order" in why
    with pytest.warns(UserWarning, match="z_2.*first-order.*one flow coordinate per time step"):
        guide = ps.StructuredGuide(second_order(6), observed=observed(6), chains="auto", hidden_sizes=(8,))
    assert isinstance(guide._amortizer, FlatAmortizer) and guide.chain_note is not None

    def unlike():  # z_3 is a vector where the other steps are scalars
        for t in range(5):
            z = pyro.sample(f"z_{t}", dist.Normal(torch.zeros(2 if t == 3 else ()), 1.0).to_event(1 if t == 3 else 0))
            pyro.sample(f"x_{t}", dist.Normal(z.sum(), 0.5))

    _, why = detect_chain(ps.trace_model(unlike, observed=observed(5)))
    assert "'z_0'" in why and "'z_3'" in why


def _random_chain_flow(seed=0):
    torch.manual_seed(seed)
    # k = 2 step latents, g = 1 global, cg = 1 global observation, ko = 1
    As = torch.tensor([[0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0]]).bool()
    Ab = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]]).bool()
    flow = ChainFlow(As, torch.tensor([True, False]), Ab, torch.tensor([True, True]), torch.tensor([[False, True]]),
                     torch.tensor([True]), obs_dim=1, hidden_sizes=(16,), num_layers=1, rnn_hidden=4)
    # (one layer: the Jacobian shows the direct dependencies; the last layers start at zero, so perturb)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_chain_flow_density_round_trip_and_step_jacobian():
    flow, T = _random_chain_flow(), 7
    obs, gctx = torch.randn(3, T, 1), torch.randn(3, 1)
    y_g, y_s, log_q = flow.rsample_and_log_prob(gctx, obs, n=4)
    assert y_g.shape == (4, 3, 1) and y_s.shape == (4, 3, T, 2) and log_q.shape == (4, 3)
    assert torch.allclose(flow.log_prob(y_g, y_s, gctx, obs), log_q, atol=1e-4)
    e_g, e_s, _ = flow.inverse(y_g, y_s, gctx, obs)
    z_g, z_s, _ = flow(e_g, e_s, gctx, obs)
    assert torch.allclose(z_s, y_s, atol=1e-4) and torch.allclose(z_g, y_g, atol=1e-4)
    yg, ys, o = y_g[0, 0].detach(), y_s[0, 0].detach(), obs[0]

    def noise_of_steps(flat):
        return flow.inverse(yg, flat.view(T, 2), gctx[0], o)[1].reshape(-1)

    J = torch.autograd.functional.jacobian(noise_of_steps, ys.reshape(-1)).view(T, 2, T, 2)
    step_dep = (J != 0).any(-1).any(1)  # eps_t on z_s
    allowed = torch.eye(T, dtype=torch.bool) | torch.eye(T, dtype=torch.bool).roll(1, 1).triu()
    assert torch.equal(step_dep, allowed)  # z_t's noise sees z_t and z_{t+1} only
    assert all(J[t, 0, t, 1] == 0 and J[t, 1, t, 0] != 0 for t in range(T))  # within a step: 1 <- 0 only
    Jo = torch.autograd.functional.jacobian(lambda v: flow.inverse(yg, ys, gctx[0], v.view(T, 1))[1].reshape(-1), o.reshape(-1))
    Jo = (Jo.view(T, 2, T) != 0)
    assert torch.equal(Jo[:, 0], torch.ones(T, T, dtype=torch.bool).tril())  # h_t: observations 0..t
    assert not Jo[: T - 1, 1].any() and Jo[T - 1, 1].all()  # coordinate 1 sees the summary at the last step only


def test_decayed_scan_is_the_recurrence():
    u, lam = torch.randn(2, 11, 3, 2), torch.tensor([0.3, 0.9])
    h, ref = decayed_scan(u, lam), torch.zeros_like(u)
    ref[:, 0] = u[:, 0]
    for t in range(1, 11):
        ref[:, t] = lam * ref[:, t - 1] + u[:, t]
    assert torch.allclose(h, ref, atol=1e-6)


def test_parameter_count_does_not_depend_on_the_length():
    counts = []
    for T in (5, 60):
        guide = ps.StructuredGuide(ar_model(T), observed=observed(T), chains="auto", hidden_sizes=(16,))
        assert isinstance(guide._amortizer, ChainAmortizer)
        counts.append(sum(p.numel() for p in guide.parameters()))
    assert counts[0] == counts[1]


def exact_kl(guide, x: torch.Tensor, num_samples: int = 1000) -> float:
    """``KL(p(z | x) || q)`` by Monte Carlo over exact posterior draws (q's density is exact)."""
    p, T = hmm_posterior(x), x.shape[-1]
    s = p.sample((num_samples,))
    with torch.no_grad():
        log_q = guide.posterior({f"x_{t}": x[t] for t in range(T)}).log_prob({f"z_{t}": s[:, t].float() for t in range(T)})
    return float((p.log_prob(s) - log_q.double()).mean())


def test_linear_gaussian_hmm_exact_kl_at_the_traced_and_another_length():
    torch.manual_seed(0)
    guide = ps.StructuredGuide(hmm(10), chains="auto", hidden_sizes=(32,), num_layers=1, rnn_hidden=8)
    assert "x_0..x_t of z_t" in guide.chain_summarised
    x10 = torch.randn(10)
    before = exact_kl(guide, x10)
    guide.fit(num_steps=150, batch_size=64, objective="fkl", progress=False, seed=0, lr=5e-3)
    for T in (10, 25):  # 25: a length it never saw
        tr = pyro.poutine.trace(hmm(T)).get_trace()
        x = torch.stack([tr.nodes[f"x_{t}"]["value"] for t in range(T)])
        kl = exact_kl(guide, x)
        assert kl / T < 0.03 < before / 10, (T, kl, before)
    samples = guide.posterior({f"x_{t}": x[t] for t in range(25)}).sample(5)
    assert sorted(samples, key=lambda k: int(k[2:])) == [f"z_{t}" for t in range(25)] and samples["z_24"].shape == (5,)


def test_chain_guide_with_globals_runs_as_a_pyro_guide():
    guide = ps.StructuredGuide(ar_model(8), observed=observed(8), chains="auto", hidden_sizes=(16,), rnn_hidden=4)
    guide.fit(num_steps=2, batch_size=16, objective="skl", progress=False, seed=0)
    x = torch.randn(8)
    svi = pyro.infer.SVI(ar_model(8), guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = svi.step(x)
    assert torch.isfinite(torch.tensor(loss))
    post = guide.posterior({f"x_{t}": x[t] for t in range(8)})
    s, log_q = post.sample_and_log_prob(7)
    assert s["s"].shape == (7,) and (s["s"] > 0).all() and s["z_7"].shape == (7,)
    assert torch.allclose(post.log_prob(s), log_q, atol=1e-3)


def test_chain_guide_saves_and_loads(tmp_path):
    guide = ps.StructuredGuide(hmm(6), chains="auto", hidden_sizes=(8,), rnn_hidden=4)
    guide.fit(num_steps=3, batch_size=16, objective="fkl", progress=False, seed=0)
    guide.save(tmp_path / "g.pt")
    loaded = ps.StructuredGuide.load(tmp_path / "g.pt", hmm(6))
    assert isinstance(loaded._amortizer, ChainAmortizer)
    obs = {f"x_{t}": torch.tensor(0.3 * t) for t in range(6)}
    z = guide.posterior(obs).sample(4)
    assert torch.allclose(guide.posterior(obs).log_prob(z), loaded.posterior(obs).log_prob(z))


@pytest.mark.parametrize("flow", ["grf", "cnf"])
def test_other_families_build_the_chain_flow(flow):
    """GRF and CNF step flows: the same three flows of that family; samples score consistently at another length."""
    guides = [ps.StructuredGuide(hmm(T), flow=flow, chains="auto", hidden_sizes=(16,)) for T in (5, 9)]
    assert all(isinstance(g._amortizer, ChainAmortizer) for g in guides)
    assert len({sum(p.numel() for p in g.parameters()) for g in guides}) == 1
    post = guides[0].posterior({f"x_{t}": torch.tensor(0.1 * t) for t in range(12)})
    z, log_q = post.sample_and_log_prob(3)
    assert sorted(z) == sorted(f"z_{t}" for t in range(12))
    assert torch.allclose(post.log_prob(z), log_q, atol=1e-3)


def test_hmm_posterior_matches_gaussian_conditioning():
    """The precision-built posterior equals conditioning the joint covariance of (z, x) (a second derivation)."""
    T, a, s, r = 6, 0.9, 0.5, 0.5
    t = torch.arange(T, dtype=torch.float64)
    M = torch.where(t[:, None] >= t[None, :], a ** (t[:, None] - t[None, :]), torch.zeros(()).double())
    D = torch.diag(torch.tensor([1.0] + [s**2] * (T - 1), dtype=torch.float64))
    Szz = M @ D @ M.T
    Sxx = Szz + r**2 * torch.eye(T, dtype=torch.float64)
    x = torch.randn(T, dtype=torch.float64)
    p = hmm_posterior(x)
    assert torch.allclose(p.mean, Szz @ torch.linalg.solve(Sxx, x), atol=1e-10)
    assert torch.allclose(p.covariance_matrix, Szz - Szz @ torch.linalg.solve(Sxx, Szz), atol=1e-10)
