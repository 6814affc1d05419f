"""Tests for the graphical residual flow: shared flow properties, Lipschitz bound, solver, gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

from pyro_struct import dag
from pyro_struct.flows.base import transitive_closure
from pyro_struct.flows.grf import GraphicalResidualFlow, default_num_layers, spectral_norm_bound
from tests.flow_properties import (
    chain_adjacency,
    check_all,
    check_jacobian_structure,
    check_log_prob_consistency,
    check_logdet,
    check_round_trip,
    random_dag_adjacency,
)

__all__ = []


def _flow(A, context_dim=0, seed=0, **kwargs) -> GraphicalResidualFlow:
    torch.manual_seed(seed)
    return GraphicalResidualFlow(A, context_dim=context_dim, **kwargs).double()


@torch.no_grad()
def _scale_weights(flow: GraphicalResidualFlow, factor: float) -> None:
    """Blow the raw weights up so that every spectral normalisation is active."""
    for block in flow.blocks:
        for layer in block.layers:
            layer.weight.mul_(factor)


SUITE_CASES = [
    # (d, context_dim, edge probability, seed, num_layers, hidden_sizes)
    (5, 0, 0.4, 0, 1, (16,)),
    (6, 3, 0.4, 1, 2, (16,)),
    (4, 2, 0.6, 2, 3, (12, 12)),
    (7, 2, 0.3, 3, 2, ()),
]


@pytest.mark.parametrize("d, c, p, seed, num_layers, hidden", SUITE_CASES)
def test_shared_property_suite_on_random_dags(d, c, p, seed, num_layers, hidden):
    A = random_dag_adjacency(d, c, p=p, seed=seed)
    flow = _flow(A, c, seed=seed, num_layers=num_layers, hidden_sizes=hidden)
    _scale_weights(flow, 3.0)  # strongly non-linear blocks, every normalisation active
    check_all(flow, logdet_atol=1e-5, roundtrip_atol=1e-6)
    assert flow.last_stats["inverse"]["converged"]


def test_shared_property_suite_on_chain_with_context_and_lipswish_away_from_identity():
    A = chain_adjacency(6, context_dim=2)
    flow = _flow(A, 2, num_layers=3, hidden_sizes=(12,), lipschitz=0.99)
    with torch.no_grad():
        for block in flow.blocks:
            block.activations[0].raw_beta.uniform_(-2.0, 2.0)
    check_all(flow, logdet_atol=1e-5, roundtrip_atol=1e-6)


def test_jacobian_reaches_every_ancestor_within_num_layers():
    # the structural zeros are necessary (suite), and with enough blocks every allowed
    # path is actually used: z_i depends on each ancestor and context column in the closure
    A = chain_adjacency(4, context_dim=1)
    flow = _flow(A, 1, num_layers=4, hidden_sizes=(8,))
    eps, x = torch.randn(4, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: flow.forward(v[:4], v[4:])[0], torch.cat([eps, x]))
    allowed = transitive_closure(flow.adjacency)
    assert (J.abs() > 1e-8).eq(allowed).all(), (J.abs() > 1e-8).int()


def _dependence(flow, d, c):
    """``|dz/d(eps, x)| > 0`` ``(d, d + c)`` at one random point (autograd)."""
    eps, x = torch.randn(d, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: flow.forward(v[:d], v[d:])[0], torch.cat([eps, x]))
    return J.abs() > 1e-10


@pytest.mark.parametrize("d, c, p, seed", [(6, 1, 0.0, 0), (7, 2, 0.0, 3), (7, 2, 0.3, 1), (8, 2, 0.25, 4), (5, 3, 0.6, 2)])
def test_default_blocks_let_every_observation_and_ancestor_reach_every_latent(d, c, p, seed):
    # a chain z0 -> ... -> z_{d-1} (context into z0) plus random extra edges: paths longer than 4 edges,
    # so SIReN-VAE's fixed 4 blocks would leave the deepest latents blind to the observations
    A = random_dag_adjacency(d, c, p=p, seed=seed)
    A[0, d:] = True
    for i in range(1, d):
        A[i, i - 1] = True
    flow = _flow(A, c, seed=seed, hidden_sizes=(8,), block_mask="structure")
    assert flow.num_layers == default_num_layers(A) == min(dag.propagation_depth(A) + 3, 8)
    assert flow.num_layers >= dag.propagation_depth(A)  # (d <= 8: the cap keeps full reach here)
    assert _dependence(flow, d, c).eq(transitive_closure(A)).all()
    # the rule is no looser than needed for reach: on the bare chain, one block fewer than the
    # propagation depth leaves the last latent independent of the observations (structurally zero)
    if p == 0.0:
        short = _flow(A, c, seed=seed, hidden_sizes=(8,), num_layers=d - 1, block_mask="structure")
        assert not _dependence(short, d, c)[d - 1, d:].any()


@pytest.mark.parametrize("d, c, p, seed", [(6, 1, 0.0, 0), (7, 2, 0.3, 1), (5, 3, 0.6, 2)])
def test_closure_blocks_reach_every_ancestor_in_one_block_and_keep_the_flow_structure(d, c, p, seed):
    A = random_dag_adjacency(d, c, p=p, seed=seed)
    A[0, d:] = True
    for i in range(1, d):
        A[i, i - 1] = True
    C = transitive_closure(A)
    # one closure block already has the whole closure's pattern (an H block only H's), never more
    one = _flow(A, c, seed=seed, hidden_sizes=(16,), num_layers=1, block_mask="closure")
    assert _dependence(one, d, c).eq(C).all()
    h_block = _flow(A, c, seed=seed, hidden_sizes=(16,), num_layers=1, block_mask="structure")
    assert _dependence(h_block, d, c).eq(A | torch.eye(d, d + c, dtype=torch.bool)).all()
    # the default (closure) then needs SIReN-VAE's 4 blocks whatever the depth of H, and stays exact
    flow = _flow(A, c, seed=seed, hidden_sizes=(16,))
    assert flow.block_mask == "closure"
    assert flow.num_layers == 4 < default_num_layers(A)
    _scale_weights(flow, 3.0)
    check_all(flow, logdet_atol=1e-5, roundtrip_atol=1e-6)
    assert _dependence(flow, d, c).eq(C).all()


def test_default_blocks_are_four_on_a_complete_dag_and_follow_the_circuit_structure():
    complete = torch.ones(5, 7, dtype=torch.bool)
    complete[:, :5] = torch.tril(complete[:, :5], -1)
    assert GraphicalResidualFlow(complete, context_dim=2, hidden_sizes=(8,)).num_layers == 4
    with pytest.raises(ValueError, match="num_layers"):
        GraphicalResidualFlow(complete, context_dim=2, num_layers=True)


@pytest.mark.parametrize("activation", ["lipswish", "tanh", "elu", "softplus"])
def test_every_activation_gives_exact_logdet_and_inverse(activation):
    A = random_dag_adjacency(5, 2, p=0.5, seed=4)
    flow = _flow(A, 2, num_layers=2, hidden_sizes=(10, 10), activation=activation)
    _scale_weights(flow, 3.0)
    check_jacobian_structure(flow)
    check_logdet(flow, atol=1e-5)
    check_round_trip(flow, atol=1e-6)
    check_log_prob_consistency(flow, atol=1e-6)


@pytest.mark.parametrize("lipschitz", [0.5, 0.9, 0.99])
def test_spectral_norm_of_every_normalised_weight_is_below_coefficient(lipschitz):
    A = random_dag_adjacency(8, 3, p=0.4, seed=5)
    flow = _flow(A, 3, num_layers=2, hidden_sizes=(20, 20), lipschitz=lipschitz)
    _scale_weights(flow, 10.0)
    weights = flow.normalised_weights()
    assert len(weights) == 2 and all(len(ws) == 3 for ws in weights)
    for ws, block in zip(weights, flow.blocks):
        for k, (W, layer) in enumerate(zip(ws, block.layers)):
            sigma = torch.linalg.matrix_norm(W, ord=2)
            assert sigma <= lipschitz, f"layer {k}: spectral norm {sigma} > {lipschitz}"
            # normalisation is active here, and the certified bound is tight: not over-shrunk
            assert sigma > 0.995 * lipschitz, f"layer {k}: spectral norm {sigma} far below {lipschitz}"
            # masked first, then normalised: the structure survives
            mask = layer.mask[:, : W.shape[1]]
            assert (W[~mask] == 0).all()
    # the whole residual map is a contraction in z: ||dg/dz||_2 <= coefficient at random points
    x = torch.randn(3, dtype=torch.float64)
    for block in flow.blocks:
        for _ in range(3):
            z = 2 * torch.randn(8, dtype=torch.float64)
            J = torch.autograd.functional.jacobian(lambda v: block.evaluate(v, x, block.effective_weights())[0], z)
            assert torch.linalg.matrix_norm(J, ord=2) < lipschitz


def test_small_weights_are_left_alone_by_the_normalisation():
    flow = _flow(chain_adjacency(4), num_layers=1, hidden_sizes=(8,), lipschitz=0.9)
    _scale_weights(flow, 1e-3)
    for W, layer in zip(flow.normalised_weights()[0], flow.blocks[0].layers):
        assert torch.equal(W, layer.masked_weight[:, : W.shape[1]])


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (12, 12), (30, 1), (1, 1)])
def test_spectral_norm_bound_is_a_tight_upper_bound(shape):
    torch.manual_seed(6)
    W = torch.randn(*shape, dtype=torch.float64) * 3
    sigma = torch.linalg.matrix_norm(W, ord=2)
    bound = spectral_norm_bound(W)
    assert sigma <= bound <= sigma * 1.001
    # Frobenius norm with zero iterations, and never below sigma with few iterations
    assert torch.isclose(spectral_norm_bound(W, 0), torch.linalg.matrix_norm(W))
    assert spectral_norm_bound(W, 2) >= sigma


def test_spectral_norm_bound_worst_cases():
    # repeated top singular value: the slowest case for Gram iteration, still an upper bound
    I = torch.eye(16, dtype=torch.float64)
    assert 1.0 <= spectral_norm_bound(I) <= 16 ** (1 / 2**9) * 1.0001
    assert spectral_norm_bound(torch.zeros(3, 4, dtype=torch.float64)) == 0
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.ones(3)).double()
    assert spectral_norm_bound(rank_one) >= torch.linalg.matrix_norm(rank_one, ord=2)
    # float32 keeps its bound too
    W = torch.randn(50, 9)
    assert spectral_norm_bound(W) >= torch.linalg.matrix_norm(W.double(), ord=2)


@pytest.mark.parametrize("inverse_gradient", ["triangular", "unrolled"])
def test_log_prob_parameter_gradients_match_central_differences(inverse_gradient):
    A = random_dag_adjacency(5, 2, p=0.5, seed=3)
    flow = _flow(A, 2, seed=1, num_layers=2, hidden_sizes=(12,), inverse_tol=1e-14, inverse_gradient=inverse_gradient)
    assert flow.depth >= 2  # the off-diagonal coupling matters for these gradients
    _scale_weights(flow, 2.0)
    torch.manual_seed(2)
    z = 1.5 * torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    def loss():
        return flow.log_prob(z, x).sum()

    flow.zero_grad()
    loss().backward()
    grad_x = x.grad.clone()
    h = 1e-6
    checked = 0
    for name, p in flow.named_parameters():
        live = torch.nonzero(p.grad.flatten().abs() > 1e-3).flatten()
        assert len(live), f"{name} gets no gradient"
        for i in live[torch.linspace(0, len(live) - 1, 2).long()].tolist():
            with torch.no_grad():
                p.view(-1)[i] += h
                up = loss().item()
                p.view(-1)[i] -= 2 * h
                down = loss().item()
                p.view(-1)[i] += h
            fd = (up - down) / (2 * h)
            assert abs(p.grad.view(-1)[i].item() - fd) <= 1e-5 * abs(fd) + 1e-8, (name, i, p.grad.view(-1)[i].item(), fd)
            checked += 1
    assert checked >= 10
    # and through the context
    for j in range(2):
        with torch.no_grad():
            e = torch.zeros_like(x)
            e[0, j] = h
            fd = (flow.log_prob(z, x + e).sum() - flow.log_prob(z, x - e).sum()).item() / (2 * h)
        assert abs(grad_x[0, j].item() - fd) <= 1e-5 * abs(fd) + 1e-8


def test_both_inverse_gradients_agree_and_pass_the_suite():
    A = chain_adjacency(6, context_dim=2)
    A[5, 2] = A[3, 0] = True
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    grads = []
    for mode in ("triangular", "unrolled"):
        flow = _flow(A, 2, seed=3, num_layers=2, hidden_sizes=(12,), inverse_gradient=mode)
        _scale_weights(flow, 3.0)
        if mode == "unrolled":
            check_all(flow, logdet_atol=1e-5, roundtrip_atol=1e-6)
        z = z0.clone().requires_grad_()
        flow.zero_grad()
        eps, logdet = flow.inverse(z, x)
        (eps.sin().sum() + logdet.sum()).backward()
        grads.append(torch.cat([z.grad.flatten()] + [p.grad.flatten() for p in flow.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_inverse_stats_are_reported_and_newton_beats_fixed_point():
    A = chain_adjacency(10, context_dim=1)
    x = torch.randn(30, 1, dtype=torch.float64)
    stats = {}
    for method in ("newton", "fixed_point"):
        flow = _flow(A, 1, seed=7, num_layers=3, hidden_sizes=(16,), lipschitz=0.99, inverse_method=method)
        _scale_weights(flow, 3.0)
        z = flow.sample(x)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eps, _ = flow.inverse(z, x)
        assert torch.allclose(flow.forward(eps, x)[0], z, atol=1e-8)
        s = flow.last_stats["inverse"]["blocks"]
        assert flow.last_stats["inverse"]["evaluations"] == sum(b["evaluations"] for b in s)
        assert [b["block"] for b in s] == [0, 1, 2]
        for b in s:
            assert b["converged"] and 1 <= b["iterations"] <= 100
            assert b["residual"] <= 1e-10 * max(1.0, z.abs().max().item())
            assert b["evaluations"] >= b["iterations"] + 1
        stats[method] = sum(b["iterations"] for b in s)
    assert stats["newton"] < stats["fixed_point"], stats


def test_iteration_cap_warns_and_reports_unconverged():
    flow = _flow(chain_adjacency(6), num_layers=2, hidden_sizes=(8,), inverse_max_iter=1, inverse_tol=1e-14)
    _scale_weights(flow, 3.0)
    z = flow.sample(n=5)
    with pytest.warns(RuntimeWarning, match="inverse_max_iter=1"):
        flow.inverse(z)
    blocks = flow.last_stats["inverse"]["blocks"]
    assert all(b["iterations"] == 1 for b in blocks)
    assert not all(b["converged"] for b in blocks) and not flow.last_stats["inverse"]["converged"]
    assert flow.last_stats["inverse"]["residual"] == max(b["residual"] for b in blocks) > 1e-14


def test_batched_context_broadcasts_and_float32_works():
    A = random_dag_adjacency(4, 2, p=0.5, seed=8)
    torch.manual_seed(0)
    flow = GraphicalResidualFlow(A, context_dim=2, num_layers=2, hidden_sizes=(8,))  # default dtype
    x = torch.randn(3, 2)
    z, lq = flow.rsample_and_log_prob(x, n=5)
    assert z.shape == (5, 3, 4) and lq.shape == (5, 3) and z.dtype == torch.float32
    lp = flow.log_prob(z.detach(), x)  # x broadcasts against (5, 3)
    assert torch.allclose(lp, lq.detach(), atol=1e-4)
    assert flow.last_stats["inverse"]["converged"]


def test_introspection():
    A = random_dag_adjacency(5, 1, p=0.5, seed=9)
    flow = _flow(A, 1, num_layers=3, hidden_sizes=(9, 7))
    assert flow.num_layers == flow.num_passes == 3
    masks = [m for name, m in flow.masks.items() if name.startswith("blocks.0.")]
    assert len(flow.masks) == 3 * len(masks)
    assert [tuple(m.shape) for m in masks] == [(9, 6), (7, 9), (5, 7)]
    # the masks connect output j exactly to z_j, pa(z_j) and its context columns
    P = masks[0].double()
    for m in masks[1:]:
        P = m.double() @ P
    expected = A.clone()
    expected[:, :5] |= torch.eye(5, dtype=torch.bool)
    assert (P > 0).eq(expected).all()
    assert "lipschitz=0.97" in repr(flow)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lipschitz": 1.0}, "lipschitz"),
        ({"lipschitz": 0.0}, "lipschitz"),
        ({"lipschitz": 1.5}, "lipschitz"),
        ({"lipschitz": -0.3}, "lipschitz"),
        ({"num_layers": 0}, "num_layers"),
        ({"activation": "gelu"}, "activation"),  # |f'| reaches 1.13
        ({"inverse_method": "bisection"}, "inverse_method"),
        ({"inverse_max_iter": 0}, "inverse_max_iter"),
        ({"inverse_tol": 0.0}, "inverse_tol"),
        ({"inverse_gradient": "adjoint"}, "inverse_gradient"),
        ({"block_mask": "dense"}, "block_mask"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GraphicalResidualFlow(chain_adjacency(3), **kwargs)


def test_bad_inputs_raise_clear_errors():
    flow = GraphicalResidualFlow(chain_adjacency(3, 1), context_dim=1)
    with pytest.raises(ValueError, match="context"):
        flow.forward(torch.randn(3))
    with pytest.raises(ValueError, match="eps"):
        flow.forward(torch.randn(4), torch.randn(1))
    with pytest.raises(ValueError, match="z must"):
        flow.inverse(torch.randn(2), torch.randn(1))
