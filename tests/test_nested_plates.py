"""Nested plates (groups with members inside each group): the template inverse, its tracing at a few groups x members, the nested plate flow's structure, and an exact-KL guide over G and M."""

import random
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_struct import StructuredGuide, faithful_inverse, trace_model
from pyro_struct.amortizer import NestedPlateAmortizer
from pyro_struct.flows.nested import NestedPlatedStrAF
from pyro_struct.models.hierarchical import nested_hierarchical as hierarchical, nested_hierarchical_posterior
from pyro_struct.plates import PlateCouplingError, expand_nested_plate_inverse, nested_plate_inverse, nested_plates
from pyro_struct.trace.template import TEMPLATE_MEMBERS, trace_plate_template

from .test_plates import parents


def random_nested_model(seed: int):
    """Globals; groups with group latents and (maybe) a group observation; members inside each group
    with member latents (maybe none) and observations; random sparse dependencies (means broadcast
    against the plates, so the model runs at any size)."""
    rng = random.Random(seed)
    nt, nh, nk, nch, nko = rng.randint(1, 2), rng.randint(1, 2), rng.randint(0, 2), rng.randint(0, 1), rng.randint(1, 2)

    def pick(k, p):
        return [i for i in range(k) if rng.random() < p]

    tpar = [pick(k, 0.5) for k in range(nt)]
    hpar = [(pick(nt, 0.6), pick(j, 0.5)) for j in range(nh)]
    wpar = [(pick(nt, 0.3), sorted({rng.randrange(nh)} | set(pick(nh, 0.4)))) for _ in range(nch)]
    zpar = [(pick(nt, 0.3), pick(nh, 0.7), pick(i, 0.5)) for i in range(nk)]
    xpar = [(pick(nt, 0.2), pick(nh, 0.5), sorted(({rng.randrange(nk)} if nk else set()) | set(pick(nk, 0.4))) if nk else [])
            for _ in range(nko)]
    for o in range(nko):  # every observation sees something latent inside the plates
        if not xpar[o][1] and not xpar[o][2]:
            xpar[o][1].append(rng.randrange(nh))

    def model(G=3, M=2):
        zero = torch.tensor(0.0)
        t = []
        for k in range(nt):
            t.append(pyro.sample(f"t{k}", dist.Normal(sum((t[p] for p in tpar[k]), zero), 1.0)))
        with pyro.plate("groups", G, dim=-2):
            h = []
            for j, (tp, hp) in enumerate(hpar):
                mean = sum((t[p] for p in tp), zero) + sum((0.5 * h[p] for p in hp), zero)
                h.append(pyro.sample(f"h{j}", dist.Normal(mean, 1.0)))
            for o, (tp, hp) in enumerate(wpar):
                pyro.sample(f"w{o}", dist.Normal(sum((t[p] for p in tp), zero) + sum((h[p] for p in hp), zero), 1.0))
            with pyro.plate("members", M, dim=-1):
                z = []
                for i, (tp, hp, zp) in enumerate(zpar):
                    mean = sum((t[p] for p in tp), zero) + sum((h[p] for p in hp), zero) + sum((0.5 * z[p] for p in zp), zero)
                    z.append(pyro.sample(f"z{i}", dist.Normal(mean, 1.0)))
                for o, (tp, hp, zp) in enumerate(xpar):
                    mean = sum((t[p] for p in tp), zero) + sum((h[p] for p in hp), zero) + sum((z[p] for p in zp), zero)
                    pyro.sample(f"x{o}", dist.Normal(mean, 1.0))

    return model, [f"w{o}" for o in range(nch)] + [f"x{o}" for o in range(nko)]


def expanded(template, G, M):
    return {v: sorted(p) for v, p in expand_nested_plate_inverse(template, G, M).items()}


# ------------------------------------------------------------------ the template inverse
def test_nested_template_inverse_expands_to_the_inverse_of_the_expanded_network():
    compared = 0
    for seed in range(30):
        model, observed = random_nested_model(seed)
        bn = trace_model(model, 2, 2, observed=observed)
        assert nested_plates(bn) == ("groups", "members")
        try:
            template = nested_plate_inverse(faithful_inverse(bn), "groups", "members")
        except PlateCouplingError:
            continue
        compared += 1
        for G, M in ((3, 2), (2, 3), (4, 3)):
            direct = parents(faithful_inverse(trace_model(model, G, M, observed=observed)))
            assert expanded(template, G, M) == direct, (seed, G, M)
    # the property is checked on most random nested networks, not vacuously
    assert compared >= 20


def test_the_small_nested_template_expands_to_the_inverse_of_every_member():
    compared = 0
    for seed in range(12):
        model, observed = random_nested_model(seed)
        small, why = trace_plate_template(model, (), {"G": 6, "M": 5}, observed=observed)
        assert why is None and small.sizes == {"groups": 6, "members": 5}, (seed, why)
        assert small.bn.sites["x0"].shape == (TEMPLATE_MEMBERS, TEMPLATE_MEMBERS) and small.shapes["x0"] == (6, 5)
        try:
            template = nested_plate_inverse(faithful_inverse(small.bn), "groups", "members")
        except PlateCouplingError:
            continue
        compared += 1
        assert expanded(template, 6, 5) == parents(faithful_inverse(trace_model(model, 6, 5, observed=observed))), seed
    assert compared >= 8


def test_the_hierarchical_template_is_the_amortised_factorisation():
    template = nested_plate_inverse(faithful_inverse(trace_model(hierarchical, 3, 3, observed=["x"])), "groups", "obs")
    # q(mu | x) prod_g q(theta_g | mu, x_g.)
    assert template.global_parents == {"mu": ([], [], ["x[0,0]"])}
    assert template.group_parents == {"theta[0,0]": (["mu"], [], ["x[0,0]"])}
    assert template.member_order == [] and template.sizes == (3, 3)


def coupled_groups(G=30, M=40):
    """Group g's observations also read group g - 1's latent: invisible with four groups."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        with pyro.plate("obs", M, dim=-1):
            lag = theta.roll(1, -2) if theta.shape[-2] > 10 else torch.zeros_like(theta)
            pyro.sample("x", dist.Normal(theta + lag, 1.0))


def coupled_members(G=30, M=40):
    """Member m's observation also reads member m - 1's latent (of the same group) at full size."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        with pyro.plate("obs", M, dim=-1):
            z = pyro.sample("z", dist.Normal(theta, 0.5))
            lag = z.roll(1, -1) if z.shape[-1] > 10 else torch.zeros_like(z)
            pyro.sample("x", dist.Normal(z + lag, 1.0))


def test_nested_couplings_invisible_in_the_template_are_detected_at_full_size():
    for model in (coupled_groups, coupled_members):
        small, why = trace_plate_template(model, (), {}, observed=["x"])
        assert small is None and "couples members" in why, why
    small, why = trace_plate_template(hierarchical, (), {"G": 30, "M": 40}, observed=["x"])
    assert why is None and small.sizes == {"groups": 30, "obs": 40}


# ------------------------------------------------------------------ the flow's structure
def rich(G=3, M=4, w=None, x=None):
    """Global mu; per group theta_g and an observation w_g; per member z_gm and x_gm."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        pyro.sample("w", dist.Normal(theta, 1.0), obs=w)
        with pyro.plate("obs", M, dim=-1):
            z = pyro.sample("z", dist.Normal(theta, 0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.fixture(scope="module")
def rich_guide():
    torch.manual_seed(0)
    guide = StructuredGuide(rich, observed=["w", "x"], plates="auto", hidden_sizes=(8,), pool_dim=3, pool_hidden=(8,))
    with torch.no_grad():  # away from the zero-initialised output layers, so every allowed path is live
        for p in guide.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return guide


def _inverse_jacobian(flow, G=3, M=4):
    """d(eps_globals, eps_groups, eps_members) / d(y..., group obs, member obs), flattened per level."""
    torch.manual_seed(1)
    t, h, k = flow.num_globals, flow.group_dim, flow.member_dim
    shapes = [(t,), (G, h), (G, M, k), (G, flow.group_obs_dim), (G, M, flow.member_obs_dim)]
    inputs = [torch.randn(s) for s in shapes]

    def f(*xs):
        e_t, e_h, e_m, _ = flow.inverse(xs[0], xs[1], xs[2], None, xs[3], xs[4])
        return e_t, e_h, e_m

    return torch.autograd.functional.jacobian(f, tuple(inputs)), inputs


def test_a_groups_latents_depend_on_other_groups_only_through_the_globals(rich_guide):
    flow = rich_guide.flow
    assert isinstance(flow, NestedPlatedStrAF) and isinstance(rich_guide._amortizer, NestedPlateAmortizer)
    (J_t, J_h, J_m), _ = _inverse_jacobian(flow)
    G, M = 3, 4
    nz = [[j != 0 for j in row] for row in (J_t, J_h, J_m)]
    # J_h[i]: (G, h, *input shape); inputs: y_t, y_h, y_m, w, x
    h_on_yh, h_on_ym, h_on_w, h_on_x = nz[1][1], nz[1][2], nz[1][3], nz[1][4]
    for g in range(G):
        for g2 in range(G):
            same = g == g2
            assert h_on_yh[g, :, g2].any() == same
            assert h_on_w[g, :, g2].any() == same
            assert h_on_x[g, :, g2].any() == same and (not same or h_on_x[g, :, g2].reshape(M, -1).any(-1).all())
    assert not h_on_ym.any()  # a group's latents never depend on member latents
    # members: their own member's observation, their own group's latent, nothing of other members
    m_on_yh, m_on_ym, m_on_x = nz[2][1], nz[2][2], nz[2][4]
    for g in range(G):
        for m in range(M):
            assert m_on_yh[g, m, :, g].any() and not m_on_yh[g, m, :, [i for i in range(G) if i != g]].any()
            others = torch.ones(G, M, dtype=torch.bool)
            others[g, m] = False
            assert m_on_x[g, m, :, g, m].any() and not m_on_x[g, m, :][:, others].any()
            assert not m_on_ym[g, m, :][:, others].any()
    # the global pools every group and member, and depends on no latent of theirs
    t_on_yh, t_on_ym, t_on_w, t_on_x = nz[0][1], nz[0][2], nz[0][3], nz[0][4]
    assert not t_on_yh.any() and not t_on_ym.any()
    assert t_on_w.reshape(G, -1).any(-1).all() and t_on_x.reshape(G, M, -1).any(-1).all()


def test_the_nested_flow_inverts_and_its_log_det_is_the_jacobians(rich_guide):
    flow = rich_guide.flow
    torch.manual_seed(2)
    G, M = 2, 3
    w, x = torch.randn(G, 1), torch.randn(G, M, 1)
    pooled = flow.global_context(None, w, x)
    y_t, y_h, y_m = torch.randn(1), torch.randn(G, 1), torch.randn(G, M, 1)
    e_t, e_h, e_m, logdet = flow.inverse(y_t, y_h, y_m, None, w, x, pooled)
    back = flow.forward(e_t, e_h, e_m, None, w, x)
    for a, b in zip(back[:3], (y_t, y_h, y_m)):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(back[3], -logdet, atol=1e-4)
    sizes = (1, G, G * M)

    def flat_inverse(v):
        parts = torch.split(v, sizes)
        out = flow.inverse(parts[0], parts[1].reshape(G, 1), parts[2].reshape(G, M, 1), None, w, x)
        return torch.cat([o.reshape(-1) for o in out[:3]])

    J = torch.autograd.functional.jacobian(flat_inverse, torch.cat([y_t, y_h.reshape(-1), y_m.reshape(-1)]))
    assert torch.allclose(torch.linalg.slogdet(J)[1], logdet, atol=1e-4)


def test_the_pyro_guide_call_scores_like_the_posterior_at_another_size(rich_guide):
    w, x = torch.randn(5, 1), torch.randn(5, 7)
    tr = poutine.trace(rich_guide).get_trace(5, 7, w, x)
    assert tr.nodes["theta"]["value"].shape == (5, 1) and tr.nodes["z"]["value"].shape == (5, 7)
    tr.compute_log_prob()
    total = sum(site["log_prob_sum"] for site in tr.nodes.values() if site["type"] == "sample")
    values = {k: tr.nodes[k]["value"] for k in ("mu", "theta", "z")}
    assert torch.allclose(total, rich_guide.posterior(w=w, x=x).log_prob(values), atol=1e-4)


def test_ragged_or_misshapen_observations_are_errors_naming_the_site(rich_guide):
    with pytest.raises(ValueError, match="plate 'groups' have different sizes"):
        rich_guide.posterior(w=torch.zeros(4, 1), x=torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"site 'x' has shape \(5,\) but the guide expects shape \('G', 'M'\)"):
        rich_guide.posterior(w=torch.zeros(5, 1), x=torch.zeros(5))


def subsampled(G=6, M=4, B=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, subsample_size=B, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        with pyro.plate("obs", M, dim=-1):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=torch.zeros(3 if B else G, M))


def test_a_subsampled_nested_plate_is_an_error_naming_the_plates():
    guide = StructuredGuide(subsampled, observed=["x"], plates="auto", hidden_sizes=(8,))
    assert isinstance(guide.flow, NestedPlatedStrAF)
    with pytest.raises(ValueError, match="nested plate guide \\(plates 'groups'/'obs'\\) does not subsample"):
        guide(6, 4, 3)


# ------------------------------------------------------------------ the guide
def exact_kl_per_coordinate(guide, G: int, M: int, num_samples: int = 2000) -> float:
    """``KL(p || q) / (G + 1)`` at data simulated from the prior with ``G`` groups of ``M`` members."""
    x = poutine.trace(hierarchical).get_trace(G, M).nodes["x"]["value"]
    p = nested_hierarchical_posterior(x)
    s = p.sample((num_samples,))
    with torch.no_grad():
        log_q = guide.posterior(x=x).log_prob({"mu": s[:, 0].float(), "theta": s[:, 1:, None].float()}).double()
    return float((p.log_prob(s) - log_q).mean()) / (G + 1)


@pytest.fixture(scope="module")
def trained():
    """The hierarchical guide traced at (G, M) = (5, 10), trained over G in [4, 8] and M in [5, 12]."""
    pyro.set_rng_seed(0)
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", hidden_sizes=(16, 16))
    guide.fit(num_steps=200, batch_size=64, progress=False, simulate_with={"G": (4, 8), "M": (5, 12)}, seed=0)
    return guide


def test_trained_over_sizes_the_nested_guide_is_exact_at_other_sizes(trained):
    torch.manual_seed(1)
    # the traced size, then sizes of the training range other than the traced one
    kls = {(G, M): exact_kl_per_coordinate(trained, G, M) for G, M in ((5, 10), (4, 5), (8, 12), (7, 6))}
    print("exact KL per latent coordinate:", {k: round(v, 4) for k, v in kls.items()},
          "outside the training range, (20, 30):", round(exact_kl_per_coordinate(trained, 20, 30, 500), 4))
    for size, kl in kls.items():
        assert kl < 0.04, (size, kl)


def test_the_nested_guide_answers_any_number_of_groups_and_members(trained):
    assert trained.latent_dim == 6 and trained.context_dim == 50
    post = trained.posterior(x=torch.randn(7, 3))
    s = post.sample(4)
    assert s["mu"].shape == (4,) and s["theta"].shape == (4, 7, 1)
    batch = trained.posterior(x=torch.randn(2, 9, 6)).sample(3)
    assert batch["theta"].shape == (3, 2, 9, 1)


def test_parameter_count_does_not_depend_on_the_number_of_groups_or_members():
    counts = []
    for G, M in ((5, 10), (50, 100)):
        guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"G": G, "M": M}, hidden_sizes=(8,))
        assert isinstance(guide.flow, NestedPlatedStrAF)
        counts.append(sum(p.numel() for p in guide.flow.parameters()))
    assert counts[0] == counts[1]
    assert "shrunk to 4 of its 50 members" in guide.plate_trace_note and "shrunk to 4 of its 100 members" in guide.plate_trace_note


def test_side_by_side_plates_fall_back_with_a_warning():
    def siblings(N=5, K=6):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("a", N):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=torch.zeros(N))
        with pyro.plate("b", K):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.zeros(K))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide = StructuredGuide(siblings, plates="auto", hidden_sizes=(8,))
        assert guide.plate_layout is None and "side-by-side plates ['a', 'b']" in guide.plate_note
    assert sum("side-by-side" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("flow", ["grf", "cnf"])
def test_every_flow_family_builds_the_nested_stages(flow):
    from pyro_struct.compile import flow_class

    guide = StructuredGuide(rich, observed=["w", "x"], plates="auto", flow=flow, hidden_sizes=(8,))
    assert isinstance(guide.flow, NestedPlatedStrAF) and guide.flow.inner.family is flow_class(flow)
    torch.manual_seed(0)
    context, batch = guide.condition({"w": torch.randn(2, 1), "x": torch.randn(2, 5)})
    with torch.no_grad():
        values, log_q = guide.rsample_q(context, 3, batch)
        assert values["z"].shape == (3, 2, 5)
        assert torch.allclose(log_q, guide.log_q(values, context, torch.Size([3])), atol=1e-3)


def test_a_nested_guide_shows_its_plates_saves_loads_and_refuses_data_points(rich_guide, tmp_path):
    text = str(rich_guide.structure)
    assert "'groups' (groups) with 'obs' (members) nested" in text and "3 x 4 template" in text
    rich_guide.save(tmp_path / "g.pt")
    loaded = StructuredGuide.load(tmp_path / "g.pt", rich)
    w, x = torch.randn(4, 1), torch.randn(4, 6)
    values = rich_guide.posterior(w=w, x=x).sample(3)
    with torch.no_grad():
        assert torch.allclose(rich_guide.posterior(w=w, x=x).log_prob(values), loaded.posterior(w=w, x=x).log_prob(values), atol=1e-5)
    with pytest.raises(ValueError, match="nested plates 'groups'/'obs' are not supported there"):
        loaded.fit(num_steps=1, objective="elbo", data={"w": w, "x": x}, progress=False)
    from pyro.infer import SVI, Trace_ELBO

    svi = SVI(rich, loaded, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(4, 6, w, x)))


def no_globals(G=5, M=6, x=None):
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", M, dim=-1):
            z = pyro.sample("z", dist.Normal(theta, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def no_group_latents(G=5, M=6, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        with pyro.plate("obs", M, dim=-1):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_random_nested_models_compile_to_the_nested_flow_and_score_their_samples():
    cases = [random_nested_model(seed) for seed in range(6)] + [(no_globals, ["x"]), (no_group_latents, ["x"])]
    for model, observed in cases:
        guide = StructuredGuide(model, observed=observed, plates="auto", model_kwargs={"G": 6, "M": 5}, hidden_sizes=(8,))
        assert isinstance(guide.flow, NestedPlatedStrAF), guide.plate_note
        # another size than the traced one, and a batch of two data sets
        trace = poutine.trace(model).get_trace(G=3, M=7)
        obs = {k: torch.stack([trace.nodes[k]["value"]] * 2) for k in observed}
        context, batch = guide.condition(obs)
        values, log_q = guide.rsample_q(context, 4, batch)
        assert all(v.shape[:3] == (4, 2, 3) for k, v in values.items() if guide.bn.sites[k].plates)
        assert torch.allclose(log_q, guide.log_q(values, context, torch.Size([4, 2])), atol=1e-4)
