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
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        if flow.time_gating == "gate_and_bias":
            for p in flow.time_bias:
                p.copy_(torch.randn(p.shape, generator=g))
    return flow


def _flow(A, context_dim=0, seed=0, **kw) -> StructuredCNF:
    torch.manual_seed(seed)
    opts = dict(hidden_sizes=(16, 16), **TIGHT)
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
    flow = _flow(A, context_dim=2, method="rk4", options={"step_size": 0.05})
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
def test_adjoint_gradients_match_backprop():
    A = random_dag_adjacency(4, 2, p=0.6, seed=7)
    direct = _flow(A, context_dim=2, rtol=1e-10, atol=1e-10)
    adj = _flow(A, context_dim=2, rtol=1e-10, atol=1e-10, adjoint=True)
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
    f_sparse = StructuredCNF(sparse, hidden_sizes=(32, 32))
    f_dense = StructuredCNF(dense, hidden_sizes=(32, 32))
    assert f_sparse.num_dense_parameters() == f_dense.num_dense_parameters()
    assert f_sparse.num_effective_parameters() < f_dense.num_effective_parameters() < f_dense.num_dense_parameters()
