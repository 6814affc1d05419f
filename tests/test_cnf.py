"""Tests for the structured continuous normalizing flow (``pyro_struct.flows.cnf.StructuredCNF``)."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_struct.flows.base import transitive_closure
from pyro_struct.flows.cnf import StructuredCNF
from tests.flow_properties import (
    check_all,
    check_jacobian_structure,
    check_log_prob_consistency,
    check_logdet,
    check_round_trip,
    chain_adjacency,
    random_dag_adjacency,
)

__all__: list[str] = []

TIGHT = dict(rtol=1e-8, atol=1e-8)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _energize(flow: StructuredCNF, scale: float = 3.0, seed: int = 0) -> StructuredCNF:
    """Make the dynamics clearly non-linear and time-dependent (the default init is near-identity),
    so that structural and log-det checks are not passed by a flow that barely moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flow.net.layers:
            layer.weight.mul_(scale)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        if flow.time_gating == "gate_and_bias":
            for p in flow.time_bias:
                p.copy_(torch.randn(p.shape, generator=g))
        if flow.time_gating == "paper":
            for p in flow.outer_bias:
                p.copy_(torch.randn(p.shape, generator=g))
            flow.eta_out.weight.copy_(0.5 * torch.randn(flow.eta_out.weight.shape, generator=g))
        if flow.aux is not None:  # r(a | z, x) away from N(0, I), so the bound is not trivially tight
            for layer in flow.aux.layers:
                layer.weight.copy_(0.5 * torch.randn(layer.weight.shape, generator=g) * layer.mask)
        if flow.base is not None:  # the base layer starts as the identity; give it a shift and a scale
            for layer in flow.base.conditioners[0].layers:
                layer.weight.copy_(0.5 * torch.randn(layer.weight.shape, generator=g) * layer.mask)
                layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=g))  # roots move too
    return flow


def _flow(A, context_dim=0, seed=0, **kw) -> StructuredCNF:
    torch.manual_seed(seed)
    # a field that moves from the start; the ODE alone unless a test asks for the base layer
    opts = dict(hidden_sizes=(16, 16), init_scale=1.0, base_layer=None, **TIGHT)
    opts.update(kw)
    return _energize(StructuredCNF(A, context_dim=context_dim, **opts), seed=seed)


# ------------------------------------------------------------------ shared suite
@pytest.mark.parametrize("context_dim", [0, 2])
def test_shared_suite_dopri5(context_dim):
    A = random_dag_adjacency(5, context_dim, p=0.4, seed=1)
    flow = _flow(A, context_dim)
    # the flow must actually transform: a near-identity map would pass everything trivially
    eps = torch.randn(20, 5)
    x = torch.randn(20, context_dim) if context_dim else None
    z, logdet = flow.forward(eps, x)
    assert logdet.abs().mean() > 0.05 and (z - eps).abs().mean() > 0.1
    # adaptive dopri5 with our detached first step: structural zeros are exact, not just small
    check_all(flow, logdet_atol=1e-6, roundtrip_atol=1e-6, jac_atol=0.0)


def test_shared_suite_fixed_step_rk4():
    A = chain_adjacency(4, context_dim=2)
    A[3, 5] = True
    flow = _flow(A, context_dim=2, method="rk4", options={"step_size": 0.01})  # rk4 is invertible to O(h^4)
    check_all(flow, logdet_atol=1e-6, roundtrip_atol=1e-6, jac_atol=0.0)


def test_jacobian_structure_follows_paths_not_edges():
    # z0 -> z1 -> z2 with the context feeding z0 only: z2 must depend on x through the path,
    # and on nothing outside the closure
    A = chain_adjacency(3, context_dim=1)
    flow = _flow(A, context_dim=1)
    check_jacobian_structure(flow, atol=0.0)
    inp = torch.cat([torch.randn(3), torch.randn(1)])
    J = torch.autograd.functional.jacobian(lambda v: flow.forward(v[:3], v[3:])[0], inp)
    allowed = transitive_closure(flow.adjacency)
    assert (J[allowed].abs() > 1e-6).all(), "a path in H should give a non-zero sensitivity"


@pytest.mark.parametrize("hidden_sizes", [(), (16,), (16, 16), (8, 12, 8)])
def test_exact_divergence_matches_autograd_trace(hidden_sizes):
    A = random_dag_adjacency(6, 3, p=0.5, seed=2)
    flow = _flow(A, context_dim=3, skip=True, activation="softplus", hidden_sizes=hidden_sizes)
    with torch.no_grad():
        flow.net.skip.weight.copy_(torch.randn_like(flow.net.skip.weight))
    # the enumerated diagonal paths are exactly those of the mask product
    P = flow.net.layers[0].mask.double()[:, :6]
    for layer in flow.net.layers[1:]:
        P = layer.mask.double() @ P
    assert flow._diag_paths.shape[1] == int(torch.diagonal(P).sum())
    z, x = torch.randn(4, 6), torch.randn(4, 3)
    div = flow.divergence_at(z, x, 0.37)
    for b in range(4):
        J = torch.autograd.functional.jacobian(lambda v: flow.velocity(v, x[b], 0.37), z[b])
        assert torch.allclose(div[b], torch.trace(J), atol=1e-12)
        # and the velocity itself obeys the mask with the diagonal
        assert (J[~flow.velocity_adjacency[:, :6]] == 0).all()


# ------------------------------------------------------------- why the diagonal
def test_without_diagonal_divergence_is_identically_zero():
    A = random_dag_adjacency(5, 2, p=0.5, seed=3)
    flow = _flow(A, context_dim=2, include_diagonal=False, method="rk4", options={"step_size": 0.05})
    z, x = 3 * torch.randn(50, 5), torch.randn(50, 2)
    for t in (0.0, 0.5, 1.0):
        assert (flow.divergence_at(z, x, t) == 0).all()
        # not an artefact of our divergence code: autograd sees a zero Jacobian diagonal too
        J = torch.autograd.functional.jacobian(lambda v: flow.velocity(v, x[0], t), z[0])
        assert (torch.diagonal(J) == 0).all()
    eps = torch.randn(5)
    _, logdet = flow.forward(eps, x[0])
    assert logdet == 0
    # the whole map is volume-preserving: its Jacobian is unit lower-triangular
    J = torch.autograd.functional.jacobian(lambda e: flow.forward(e, x[0])[0], eps)
    assert torch.allclose(torch.diagonal(J), torch.ones(5), atol=1e-12)
    assert torch.linalg.slogdet(J)[1].abs() < 1e-12
    # the same weights with the diagonal do change volume
    flow_diag = _flow(A, context_dim=2, include_diagonal=True, method="rk4", options={"step_size": 0.05})
    assert flow_diag.forward(eps, x[0])[1].abs() > 1e-3


# ---------------------------------------------------------------- Hutchinson
def test_hutchinson_divergence_is_unbiased():
    A = random_dag_adjacency(6, 2, p=0.5, seed=4)
    flow = _flow(A, context_dim=2)
    z, x = torch.randn(6), torch.randn(2)
    exact = flow.divergence_at(z, x, 0.4)
    n = 20000
    g = torch.Generator().manual_seed(0)
    for kind in ("rademacher", "gaussian"):
        if kind == "rademacher":
            probe = torch.randint(0, 2, (n, 6), generator=g).double() * 2 - 1
        else:
            probe = torch.randn(n, 6, generator=g)
        est = flow.divergence_at(z.expand(n, 6), x.expand(n, 2), 0.4, probe=probe)
        assert est.std() > 1e-3, "the estimator should be noisy (off-diagonal Jacobian entries exist)"
        assert (est.mean() - exact).abs() < 5 * est.std() / math.sqrt(n), kind


def test_hutchinson_logdet_agrees_with_exact_in_expectation():
    A = random_dag_adjacency(5, 2, p=0.5, seed=5)
    exact = _flow(A, context_dim=2, rtol=1e-6, atol=1e-6)
    hutch = _flow(A, context_dim=2, rtol=1e-6, atol=1e-6, divergence="hutchinson")
    hutch.load_state_dict(exact.state_dict())
    eps, x = torch.randn(5), torch.randn(2)
    n = 4000
    z_e, ld_e = exact.forward(eps, x)
    z_h, ld_h = hutch.forward(eps.expand(n, 5), x)  # one probe per batch element
    assert torch.allclose(z_h, z_e.expand(n, 5), atol=1e-4), "the divergence estimator must not change the path"
    assert ld_h.std() > 1e-3
    assert (ld_h.mean() - ld_e).abs() < 5 * ld_h.std() / math.sqrt(n)


# ----------------------------------------------------------------------- NFE
def test_nfe_counted_and_exposed_for_both_directions():
    A = random_dag_adjacency(4, 1, p=0.5, seed=6)
    flow = _flow(A, context_dim=1, rtol=1e-5, atol=1e-5)
    flow.reset_nfe()
    x = torch.randn(8, 1)
    z, _ = flow.forward(torch.randn(8, 4), x)
    nf = flow.last_stats["forward"]["nfe"]
    assert flow.num_passes == nf == flow.last_stats["forward"]["evaluations"]
    flow.inverse(z, x)
    ni = flow.last_stats["inverse"]["evaluations"]
    assert nf > 0 and ni > 0
    assert flow.nfe == {"forward": nf, "inverse": ni, "backward": 0}
    flow.forward(torch.randn(8, 4), x)
    assert flow.nfe["forward"] == nf + flow.last_stats["forward"]["evaluations"]
    # tighter tolerances need more evaluations
    tight = _flow(A, context_dim=1, rtol=1e-10, atol=1e-10)
    tight.forward(torch.randn(8, 4), x)
    assert tight.last_stats["forward"]["evaluations"] > nf
    tight.reset_nfe()
    assert tight.num_passes is None and tight.last_stats == {}


def test_nfe_of_fixed_step_solver_is_exact():
    # rk4 (3/8 rule) makes 4 evaluations per step: T / step_size steps in each direction
    flow = _flow(chain_adjacency(3), method="rk4", options={"step_size": 0.1}, T=1.5)
    z, _ = flow.forward(torch.randn(2, 3))
    flow.inverse(z)
    assert flow.last_stats == {"forward": {"evaluations": 60, "nfe": 60}, "inverse": {"evaluations": 60, "nfe": 60}}


# ------------------------------------------------------------------- adjoint
@pytest.mark.parametrize("base_layer", [None, "affine"])
def test_adjoint_gradients_match_backprop(base_layer):
    A = random_dag_adjacency(4, 2, p=0.6, seed=7)
    direct = _flow(A, context_dim=2, rtol=1e-10, atol=1e-10, base_layer=base_layer)
    adj = _flow(A, context_dim=2, rtol=1e-10, atol=1e-10, adjoint=True, base_layer=base_layer)
    adj.load_state_dict(direct.state_dict())
    z, x = torch.randn(6, 4), torch.randn(6, 2)
    grads = []
    for flow in (direct, adj):
        xr = x.clone().requires_grad_(True)
        loss = -flow.log_prob(z, xr).mean()
        params = list(flow.parameters())
        grads.append(torch.autograd.grad(loss, params + [xr]))
    for g_direct, g_adj in zip(*grads):
        assert torch.allclose(g_direct, g_adj, atol=1e-6, rtol=1e-5)
    assert adj.nfe["backward"] > 0 and direct.nfe["backward"] == 0


# --------------------------------------------------------------------- end time
def test_same_end_time_in_both_directions():
    # an autonomous field: integrating to T=2 is integrating to T=1 twice
    A = random_dag_adjacency(4, 0, p=0.6, seed=8)
    one = _flow(A, time_gating="none", T=1.0)
    two = _flow(A, time_gating="none", T=2.0)
    two.load_state_dict(one.state_dict())
    eps = torch.randn(3, 4)
    z1, ld1 = one.forward(eps)
    z11, ld11 = one.forward(z1)
    z2, ld2 = two.forward(eps)
    assert (z2 - z1).abs().max() > 1e-2
    assert torch.allclose(z2, z11, atol=1e-7) and torch.allclose(ld2, ld1 + ld11, atol=1e-7)
    back, ldi = two.inverse(z2)
    assert torch.allclose(back, eps, atol=1e-7) and torch.allclose(ldi, -ld2, atol=1e-7)


# ----------------------------------------------------------- shapes and inputs
def test_context_broadcasting_and_batch_shapes():
    A = random_dag_adjacency(3, 2, p=0.6, seed=9)
    flow = _flow(A, context_dim=2, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 2)
    z, lq = flow.rsample_and_log_prob(x, n=4)
    assert z.shape == (4, 5, 3) and lq.shape == (4, 5)
    # one context for a whole batch of latents
    lp = flow.log_prob(z, x[0])
    assert lp.shape == (4, 5)
    lp_expanded = flow.log_prob(z, x[0].expand(4, 5, 2))
    assert torch.allclose(lp, lp_expanded, atol=1e-8)


def test_float32_follows_parameters():
    torch.set_default_dtype(torch.float32)
    flow = StructuredCNF(chain_adjacency(3, 1), context_dim=1, hidden_sizes=(8, 8))
    z, lq = flow.rsample_and_log_prob(torch.randn(2, 1), n=3)
    assert z.dtype == torch.float32 and lq.dtype == torch.float32 and torch.isfinite(lq).all()
    with pytest.raises(ValueError, match="dtype"):
        flow.forward(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64))


def test_bad_arguments_raise_clear_errors():
    A = chain_adjacency(3)
    with pytest.raises(ValueError, match="activation"):
        StructuredCNF(A, activation="relu")
    with pytest.raises(ValueError, match="T"):
        StructuredCNF(A, T=0.0)
    with pytest.raises(ValueError, match="divergence"):
        StructuredCNF(A, divergence="trace")
    with pytest.raises(ValueError, match="method"):
        StructuredCNF(A, method="rk45")
    with pytest.raises(ValueError, match="time_gating"):
        StructuredCNF(A, time_gating="concat")
    flow = StructuredCNF(A)
    with pytest.raises(ValueError, match="last dimension 3"):
        flow.forward(torch.randn(2, 4))


def test_structure_reduces_effective_parameters():
    d = 8
    sparse = chain_adjacency(d)
    dense = torch.tril(torch.ones(d, d, dtype=torch.bool), -1)
    f_sparse = StructuredCNF(sparse, hidden_sizes=(32, 32), velocity_mask="structure", base_layer=None)
    f_dense = StructuredCNF(dense, hidden_sizes=(32, 32), velocity_mask="structure", base_layer=None)
    assert f_sparse.num_dense_parameters() == f_dense.num_dense_parameters()
    assert f_sparse.num_effective_parameters() < f_dense.num_effective_parameters() < f_dense.num_dense_parameters()
    # the default field mask is H's closure: a chain's closure is the dense order, so the field saves
    # nothing there; the default base layer is masked with H itself, and saves what H leaves out
    def field(A, **kw):
        return StructuredCNF(A, hidden_sizes=(32, 32), **kw).num_effective_parameters()

    assert field(sparse, base_layer=None) == field(dense, base_layer=None)
    assert field(sparse) - field(sparse, base_layer=None) < field(dense) - field(dense, base_layer=None)


# -------------------------------------------------------------- augmentation
@pytest.mark.parametrize("time_gating", ["paper", "gate_and_bias"])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_shared_suite_augmented(time_gating, context_dim):
    A = random_dag_adjacency(4, context_dim, p=0.5, seed=11)
    flow = _flow(A, context_dim, augment=2, time_gating=time_gating, hidden_sizes=(12, 12))
    assert flow.state_dim == 12 and flow.dim == 4
    y, _ = flow.forward_state(torch.randn(6, 12), torch.randn(6, context_dim) if context_dim else None)
    assert y[:, 4:].std() > 0.1  # the augmenting dimensions move (the suite would pass a frozen a)
    check_all(flow, logdet_atol=1e-6, roundtrip_atol=1e-6, jac_atol=0.0)


def test_augmented_velocity_mask_is_block_expanded():
    # latent i's block (z_i, a_i.) sees exactly what z_i sees; z_i sees its own a_i. and vice versa
    A = chain_adjacency(3, context_dim=1)
    A[2, 0] = True
    aug = 2
    flow = _flow(A, context_dim=1, augment=aug, velocity_mask="structure")
    D = flow.state_dim
    allowed = torch.zeros(D, D + 1, dtype=torch.bool)
    owner = [0, 1, 2] + [i for i in range(3) for _ in range(aug)]
    for u in range(D):
        for v in range(D):
            allowed[u, v] = owner[u] == owner[v] or bool(A[owner[u], owner[v]])
        allowed[u, D] = bool(A[owner[u], 3])
    assert torch.equal(flow.state_adjacency, allowed)
    y, x = torch.randn(D), torch.randn(1)
    J = torch.autograd.functional.jacobian(lambda v: flow.velocity(v[:D], v[D:], 0.3), torch.cat([y, x]))
    assert (J[~allowed] == 0).all(), "the velocity depends on an input its mask forbids"
    for i in range(3):
        own = [3 + i * aug + k for k in range(aug)]
        assert (J[i, own].abs() > 0).all() and (J[own, i].abs() > 0).all(), f"latent {i} and its augmenting dims"


def _log_marginal_by_quadrature(flow, z: torch.Tensor) -> torch.Tensor:
    """``log q(z) = log ∫ q(z, a) da`` for a 1-latent, 1-augment flow, on a grid over ``a``."""
    grid = torch.linspace(-12.0, 12.0, 401)
    y = torch.stack([z[:, None].expand(-1, len(grid)), grid.expand(len(z), -1)], -1)
    log_joint = flow.state_log_prob(y)
    return torch.logsumexp(log_joint, -1) + math.log(float(grid[1] - grid[0]))


def test_augmented_density_bounds_bracket_the_exact_marginal():
    # d = 1, augment = 1, no context: the marginal q(z) is a 1-D integral we can do numerically
    flow = _flow(torch.zeros(1, 1, dtype=torch.bool), augment=1, time_gating="paper", hidden_sizes=(8, 8),
                 rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a broad r(a | z) = N(0, e^2): a poor fit to q(a | z), a safe importance proposal
        for layer in flow.aux.layers:
            layer.weight.zero_()
        flow.aux.layers[-1].bias.copy_(torch.tensor([0.0, 1.0]))
        torch.manual_seed(0)
        z, ell = flow.rsample_and_log_prob(None, 40)
        z = z[:, 0]
        exact = _log_marginal_by_quadrature(flow, z)
        # sampling: E_q[ell] - E_q[log q(z)] = E KL(q(a|z) || r(a|z)) >= 0, and clearly so for this r
        gap_sample = (ell - exact).mean()
        assert gap_sample > 0.1, f"sampling bound gap {gap_sample.item()}"
        # density: E_r[ell] <= log q(z) (ELBO over a) for every z, and E_r[exp(ell)] = q(z) exactly
        K, zs = 2000, z[:6]
        draws = flow.log_prob(zs.unsqueeze(-1).expand(K, 6, 1).contiguous())  # (K, 6), aux_samples = 1
        elbo = draws.mean(0)
        assert (elbo < exact[:6]).all() and (exact[:6] - elbo).mean() > 0.1
        w = torch.exp(draws - exact[:6])  # importance weights over q(z): mean 1 when the density is right
        assert ((w.mean(0) - 1).abs() < 5 * w.std(0) / math.sqrt(K)).all(), f"E_r[q(z,a)/r(a|z)] / q(z) = {w.mean(0)}"
        # aux_samples = K: the importance-weighted bound log mean_k exp(ell_k), within the same noise
        flow.aux_samples = K
        iw = flow.log_prob(zs.unsqueeze(-1))
        assert ((iw - exact[:6]).abs() < 5 * w.std(0) / math.sqrt(K) + 1e-3).all(), f"IW error {iw - exact[:6]}"
        assert (iw > elbo).all()


def test_augment_zero_is_the_exact_flow_and_errors_name_the_argument():
    A = chain_adjacency(3, context_dim=1)
    flow = _flow(A, context_dim=1)
    assert flow.augment == 0 and flow.state_dim == 3 and flow.aux is None
    with pytest.raises(ValueError, match="augment=0"):
        flow.auxiliary_sample(torch.randn(3), torch.randn(1))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="augment"):
            StructuredCNF(A, context_dim=1, augment=bad)
    with pytest.raises(ValueError, match="aux_samples"):
        StructuredCNF(A, context_dim=1, augment=1, aux_samples=0)
    with pytest.raises(ValueError, match="tolerance_schedule"):
        StructuredCNF(A, context_dim=1, tolerance_schedule=(1e-2,))
    with pytest.raises(ValueError, match="init_scale"):
        StructuredCNF(A, context_dim=1, init_scale=-1.0)
    aug = StructuredCNF(A, context_dim=1, augment=2)
    with pytest.raises(ValueError, match="e must have last dimension 9"):
        aug.forward_state(torch.randn(2, 3), torch.randn(2, 1))


# --------------------------------------------------------------- paper gating
def test_paper_gating_matches_eq3_written_out():
    A = random_dag_adjacency(4, 2, p=0.6, seed=12)
    flow = _flow(A, context_dim=2, time_gating="paper", hidden_sizes=(10, 9))
    layers = flow.net.layers
    assert all(layer.bias is None for layer in layers)
    t = torch.tensor(0.42)
    eta1, eta2 = flow._eta(t)
    assert [e.shape[0] for e in eta1] == [e.shape[0] for e in eta2] == [layer.out_features for layer in layers]
    # eq. 3 directly: h = tanh((W . M) h * eta1(t)) + b * eta2(t), the last layer without tanh
    z, x = torch.randn(7, 4), torch.randn(7, 2)
    h = torch.cat([z, x], -1)
    for k, layer in enumerate(layers):
        a = (h @ (layer.weight * layer.mask).T) * eta1[k]
        h = (a if k == len(layers) - 1 else torch.tanh(a)) + flow.outer_bias[k] * eta2[k]
    assert torch.allclose(flow.velocity(z, x, t), h, atol=1e-12)
    # the gates are functions of t: another time gives another field
    assert not torch.allclose(flow.velocity(z, x, 0.9), h)


def test_paper_gates_start_at_one_and_init_scale_zero_is_the_identity():
    A = random_dag_adjacency(4, 1, p=0.6, seed=13)
    torch.manual_seed(0)
    flow = StructuredCNF(A, context_dim=1, time_gating="paper", init_scale=0.0, hidden_sizes=(8,))
    eta1, eta2 = flow._eta(torch.tensor(0.7))
    assert all(torch.equal(e, torch.ones_like(e)) for e in eta1 + eta2)
    eps, x = torch.randn(5, 4), torch.randn(5, 1)
    assert (flow.velocity(eps, x, 0.3) == 0).all()
    z, logdet = flow.forward(eps, x)
    assert torch.allclose(z, eps, atol=1e-14) and (logdet == 0).all()
    # a negligible field gets the whole interval as its first step: one for the estimate, one dopri5 step
    assert flow.last_stats["forward"]["nfe"] <= 8


# --------------------------------------------------------- tolerance schedule
def test_tolerance_schedule_follows_training_progress():
    A = random_dag_adjacency(4, 1, p=0.6, seed=14)
    flow = _flow(A, context_dim=1, rtol=1e-6, atol=1e-7, tolerance_schedule=(1e-2, 1e-3))
    assert flow.current_tolerances() == (1e-6, 1e-7)  # not training
    flow.set_training_progress(0.0)
    assert flow.current_tolerances() == pytest.approx((1e-2, 1e-3))
    flow.set_training_progress(0.4)  # halfway to the tightening point (0.8), log-linearly
    assert flow.current_tolerances() == pytest.approx((1e-4, 1e-5))
    eps, x = torch.randn(16, 4), torch.randn(16, 1)
    flow.forward(eps, x)
    mid = flow.last_stats["forward"]["nfe"]
    flow.set_training_progress(0.9)
    assert flow.current_tolerances() == pytest.approx((1e-6, 1e-7))
    flow.forward(eps, x)
    assert flow.last_stats["forward"]["nfe"] > mid
    flow.set_training_progress(0.0)
    flow.eval()  # evaluation always uses the final tolerances
    assert flow.current_tolerances() == (1e-6, 1e-7)


def test_training_loop_reports_progress_to_the_flow():
    from pyro_struct.training.batches import PoolSource, TensorPool
    from pyro_struct.training.loop import train

    A = chain_adjacency(2, context_dim=0)
    flow = StructuredCNF(A, hidden_sizes=(8,), tolerance_schedule=(1e-2, 1e-2))
    seen = []
    original = flow.set_training_progress

    def spy(p):
        seen.append((p, flow.training))
        original(p)

    flow.set_training_progress = spy
    data = torch.randn(64, 2)
    train(flow, lambda batch: -flow.log_prob(batch.data).mean(), PoolSource(TensorPool(data), 16, validation_fraction=0.0),
          num_steps=4, lr=1e-3, progress=False)
    assert [p for p, _ in seen] == [0.0, 0.25, 0.5, 0.75, None] and all(t for _, t in seen[:-1])
    assert flow.current_tolerances() == (flow.rtol, flow.atol)


# ---------------------------------------------------------- velocity masks
@pytest.mark.parametrize("velocity_mask", ["structure", "context_closure", "closure"])
def test_velocity_masks_between_h_and_its_closure_keep_the_sample_structure(velocity_mask):
    A = chain_adjacency(4, context_dim=1)  # x -> z0 -> z1 -> z2 -> z3: x reaches z3 in four hops
    flow = _flow(A, context_dim=1, velocity_mask=velocity_mask, augment=1)
    C = transitive_closure(A, reflexive=False)
    expected = {"structure": A, "closure": C, "context_closure": torch.cat([A[:, :4], C[:, 4:]], 1)}[velocity_mask]
    eye = torch.cat([torch.eye(4, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.bool)], 1)
    assert torch.equal(flow.velocity_adjacency, expected | eye)
    check_jacobian_structure(flow, atol=0.0)  # z(T) depends on the closure only, whatever the field's mask
    y, x = torch.randn(flow.state_dim), torch.randn(1)
    J = torch.autograd.functional.jacobian(lambda v: flow.velocity(v[:-1], v[-1:], 0.5), torch.cat([y, x]))
    assert (J[3, -1] != 0) == (velocity_mask != "structure"), "only the closures let f_3 see x directly"
    with pytest.raises(ValueError, match="velocity_mask"):
        StructuredCNF(A, context_dim=1, velocity_mask="dense")


def test_full_velocity_mask_is_ffjord_unconstrained_with_an_exact_density():
    A = chain_adjacency(4, context_dim=1)
    flow = _flow(A, context_dim=1, velocity_mask="full")
    assert flow.velocity_adjacency.all()
    z, x = torch.randn(3, 4), torch.randn(3, 1)
    div = flow.divergence_at(z, x, 0.3)
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda v: flow.velocity(v[:4], v[4:], 0.3), torch.cat([z[b], x[b]]))
        assert (J != 0).all(), "every latent's velocity sees every latent and the observation"
        assert torch.allclose(div[b], torch.trace(J[:, :4]), atol=1e-12)
    # the sample then depends on everything, outside H's closure too (z0 on z3)
    J = torch.autograd.functional.jacobian(lambda e: flow.forward(e, x[:1])[0], torch.randn(1, 4))
    assert J[0, 0, 0, 3].abs() > 1e-6
    check_logdet(flow, atol=1e-6)
    check_round_trip(flow, atol=1e-6)
    check_log_prob_consistency(flow)


# ------------------------------------------------------------------ base layer
@pytest.mark.parametrize("augment", [0, 2])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_shared_suite_with_affine_base_layer(augment, context_dim):
    A = random_dag_adjacency(5, context_dim, p=0.4, seed=3)
    flow = _flow(A, context_dim, base_layer="affine", augment=augment, hidden_sizes=(12, 12))
    assert torch.equal(flow.base.adjacency, flow.adjacency)  # masked with H itself
    eps = torch.randn(6, flow.state_dim)
    x = torch.randn(6, context_dim) if context_dim else None
    u, _ = flow.base(eps[:, :5], x)
    assert (u - eps[:, :5]).abs().mean() > 0.1  # the base layer moves (the suite would pass an identity)
    y, logdet = flow.forward_state(eps, x)
    stats = flow.last_stats["forward"]
    assert stats["evaluations"] == stats["nfe"] + flow.base.num_passes + (1 if augment else 0)  # base passes count
    # the state bijection is the base layer followed by the ODE: the same as doing the two by hand
    flow.base, base = None, flow.base
    v = torch.cat([u, eps[:, 5:]], -1)
    y_ode, logdet_ode = flow.forward_state(v, x)
    flow.base = base
    assert torch.allclose(y, y_ode, atol=1e-10)
    assert torch.allclose(logdet, logdet_ode + base(eps[:, :5], x)[1], atol=1e-10)
    check_all(flow, logdet_atol=1e-6, roundtrip_atol=1e-6, jac_atol=0.0)


def test_affine_base_layer_starts_as_the_identity_and_names_a_bad_option():
    A = random_dag_adjacency(4, 1, p=0.6, seed=13)
    torch.manual_seed(0)
    flow = StructuredCNF(A, context_dim=1, init_scale=0.0, hidden_sizes=(8,), base_layer="affine")
    eps, x = torch.randn(5, 4), torch.randn(5, 1)
    z, logdet = flow.forward(eps, x)
    assert torch.allclose(z, eps, atol=1e-14) and logdet.abs().max() < 1e-14
    assert flow.num_effective_parameters() > StructuredCNF(A, context_dim=1, hidden_sizes=(8,), base_layer=None).num_effective_parameters()
    with pytest.raises(ValueError, match="base_layer"):
        StructuredCNF(A, context_dim=1, base_layer="spline")


def test_ffjord_base_layer_is_dense_lower_triangular():
    A = chain_adjacency(4, context_dim=1)
    flow = _flow(A, context_dim=1, velocity_mask="full", base_layer="affine")
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[:, :4] = torch.tril(expected[:, :4], -1)
    assert torch.equal(flow.base.adjacency, expected)
    check_logdet(flow, atol=1e-6)
    check_round_trip(flow, atol=1e-6)
    check_log_prob_consistency(flow)
