"""Tests for the structured autoregressive flow (StrAF) and its normalisers."""

import math

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_struct import dag
from pyro_struct.flows import ConditionalFlow, StrAF
from pyro_struct.flows.straf import (
    AffineNormalizer,
    SplineNormalizer,
    UMNNNormalizer,
    clenshaw_curtis,
)
from tests.flow_properties import (
    chain_adjacency,
    check_draw,
    check_all,
    check_jacobian_structure,
    check_round_trip,
    dag_from_adjacency,
    random_dag_adjacency,
    random_output_map,
)


def _randomize(flow, seed=0, scale=0.5):
    """Random parameters everywhere (masked entries too), so the flow is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return flow


def _wide_shallow_adjacency(d, context_dim=0, roots=3):
    A = torch.zeros(d, d + context_dim, dtype=torch.bool)
    A[roots:, :roots] = True
    A[:, d:] = True
    return A


def _dense_adjacency(d, context_dim=0):
    A = torch.ones(d, d + context_dim, dtype=torch.bool)
    A[:, :d] = torch.tril(A[:, :d], -1)
    return A


def _reference_depth(A):
    d = A.shape[0]
    g = dag_from_adjacency(A[:, :d])
    return nx.dag_longest_path_length(g)


class _PassCounter:
    """Counts conditioner evaluations: forward calls (through hooks) and level passes (sampling
    without gradients, :meth:`StrNN.level_pass`)."""

    def __init__(self, flow):
        self.calls = 0
        self.handles = [net.register_forward_hook(self._hook) for net in flow.conditioners]
        self.nets = list(flow.conditioners)
        for net in self.nets:
            def counted(*args, _pass=net.level_pass):
                self.calls += 1
                return _pass(*args)

            net.level_pass = counted

    def _hook(self, *args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()
        for net in self.nets:
            del net.level_pass


# small normaliser settings keep the tests fast; the UMNN's random parameters are kept moderate
# because its static quadrature (and so log g versus the map's derivative) is only accurate for
# integrands that do not vary too much over [0, z]
NORMALIZER_OPTIONS = {
    "affine": {},
    "spline": {"num_bins": 5, "bound": 3.0},
    "umnn": {"embedding_dim": 4, "integrand_sizes": (8, 8), "num_steps": 16},
}
RANDOM_SCALE = {"affine": 0.5, "spline": 0.5, "umnn": 0.3}


@pytest.mark.parametrize("normalizer", ["affine", "spline", "umnn"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_flow_properties(normalizer, num_layers, context_dim):
    A = random_dag_adjacency(6, context_dim, p=0.4, seed=num_layers + 10 * context_dim)
    flow = StrAF(A, context_dim=context_dim, num_layers=num_layers, hidden_sizes=(12, 12),
                 normalizer=normalizer, **NORMALIZER_OPTIONS[normalizer]).double()
    _randomize(flow, seed=num_layers, scale=RANDOM_SCALE[normalizer])
    check_all(flow, logdet_atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    d=st.integers(1, 10),
    context_dim=st.integers(0, 3),
    p=st.sampled_from([0.1, 0.3, 0.7]),
    seed=st.integers(0, 10_000),
    normalizer=st.sampled_from(["affine", "spline"]),
    hidden=st.sampled_from([(), (6,), (10, 10)]),
)
def test_structure_and_round_trip_on_random_dags(d, context_dim, p, seed, normalizer, hidden):
    A = random_dag_adjacency(d, context_dim, p=p, seed=seed)
    flow = StrAF(A, context_dim=context_dim, num_layers=2, hidden_sizes=hidden, normalizer=normalizer,
                 **NORMALIZER_OPTIONS[normalizer]).double()
    _randomize(flow, seed=seed)
    check_jacobian_structure(flow)
    check_round_trip(flow)
    assert flow.last_stats["forward"]["passes_per_layer"] == _reference_depth(A) + 1
    assert flow.last_stats["forward"]["evaluations"] == flow.num_passes == 2 * (_reference_depth(A) + 1)


@pytest.mark.parametrize("normalizer", ["affine", "spline"])
def test_flow_properties_without_skip_on_a_chain(normalizer):
    flow = StrAF(chain_adjacency(5, 1), context_dim=1, num_layers=2, hidden_sizes=(8,),
                 normalizer=normalizer, skip=False, activation="tanh").double()
    _randomize(flow, seed=3)
    check_all(flow)


def test_spline_values_leave_and_enter_the_interval():
    # with a small bound many coordinates lie in the identity tails: both regimes are exercised
    flow = StrAF(random_dag_adjacency(5, 1, p=0.5, seed=4), context_dim=1, num_layers=2,
                 hidden_sizes=(8,), normalizer="spline", bound=1.0).double()
    _randomize(flow, seed=5)
    check_all(flow)
    eps = torch.randn(200, 5, dtype=torch.float64) * 3
    z, _ = flow.forward(eps, torch.randn(200, 1, dtype=torch.float64))
    assert (z.abs() > 1).any() and (z.abs() < 1).any()


@pytest.mark.parametrize(
    "name, A",
    [
        ("chain", chain_adjacency(7, 2)),
        ("wide shallow", _wide_shallow_adjacency(9, 2)),
        ("dense", _dense_adjacency(6, 2)),
        ("no latent edges", torch.cat([torch.zeros(4, 4, dtype=torch.bool), torch.ones(4, 2, dtype=torch.bool)], 1)),
    ],
)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sampling_uses_depth_plus_one_passes(name, A, num_layers):
    flow = StrAF(A, context_dim=2, num_layers=num_layers, hidden_sizes=(16,)).double()
    _randomize(flow, seed=1)
    depth = _reference_depth(A)
    assert flow.depth == depth and flow.num_passes == num_layers * (depth + 1)
    counter = _PassCounter(flow)
    x = torch.randn(3, 2, dtype=torch.float64)
    for grad in (True, False):  # the sampler with gradients and the level sampler
        counter.calls = 0
        with torch.set_grad_enabled(grad):
            flow.sample(x, n=4)
        assert flow.last_stats["forward"] == {"evaluations": (depth + 1) * num_layers, "passes_per_layer": depth + 1}
        assert counter.calls == (depth + 1) * num_layers
    counter.calls = 0
    z = torch.randn(4, 3, A.shape[0], dtype=torch.float64)
    flow.log_prob(z, x)
    assert counter.calls == num_layers == flow.last_stats["inverse"]["evaluations"], "one pass per layer"
    counter.remove()
    check_round_trip(flow)


def test_one_pass_fewer_is_not_enough():
    # depth + 1 passes is the minimum: with one fewer the deepest latent is wrong
    A = chain_adjacency(5)
    flow = _randomize(StrAF(A, hidden_sizes=(8,)).double(), seed=2)
    flow._levels = flow._levels[:-1]
    with pytest.raises(AssertionError):
        check_round_trip(flow)


def test_dag_depth_matches_networkx():
    for seed in range(5):
        A = random_dag_adjacency(15, 3, p=0.2, seed=seed)
        assert dag.depth(A) == _reference_depth(A)
    assert dag.depth(torch.zeros(3, 3, dtype=torch.bool)) == 0


@pytest.mark.parametrize("normalizer", ["affine", "spline", "umnn"])
def test_identity_at_initialisation(normalizer):
    flow = StrAF(random_dag_adjacency(5, 2, seed=0), context_dim=2, num_layers=2, normalizer=normalizer,
                 **NORMALIZER_OPTIONS[normalizer])
    eps = torch.randn(10, 5)
    z, logdet = flow.forward(eps, torch.randn(10, 2))
    assert torch.allclose(z, eps, atol=1e-5)
    assert torch.allclose(logdet, torch.zeros(10), atol=1e-5)


def test_batched_contexts_and_shapes():
    flow = StrAF(random_dag_adjacency(4, 3, seed=1), context_dim=3, hidden_sizes=(8,))
    _randomize(flow)
    x = torch.randn(2, 5, 3)
    z, lq = flow.rsample_and_log_prob(x, n=6)
    assert z.shape == (6, 2, 5, 4) and lq.shape == (6, 2, 5)
    assert z.dtype == torch.get_default_dtype()
    # one context broadcasts over a batch of latents
    lp = flow.log_prob(z[:, 0, 0], x[0, 0])
    assert lp.shape == (6,)
    assert torch.allclose(lp, lq[:, 0, 0], atol=1e-4)
    # the sample of each context depends on that context only
    z2, _ = flow.forward(torch.zeros(2, 4), x[0, :2])
    z3, _ = flow.forward(torch.zeros(1, 4), x[0, 1:2])
    assert torch.allclose(z2[1:], z3, atol=1e-6)


def test_plain_density_estimation_without_context():
    flow = StrAF(chain_adjacency(3), normalizer="spline", num_layers=2)
    assert isinstance(flow, ConditionalFlow)
    z = flow.sample(n=8)
    assert z.shape == (8, 3)
    assert flow.log_prob(z).shape == (8,)
    with pytest.raises(ValueError, match="no context"):
        flow.log_prob(z, torch.randn(8, 2))


def test_bad_arguments():
    A = chain_adjacency(3, 1)
    with pytest.raises(ValueError, match="unknown normalizer"):
        StrAF(A, context_dim=1, normalizer="cubic")
    with pytest.raises(ValueError, match="num_layers"):
        StrAF(A, context_dim=1, num_layers=0)
    with pytest.raises(ValueError, match="shape"):
        StrAF(A, context_dim=0)
    flow = StrAF(A, context_dim=1)
    with pytest.raises(ValueError, match="needs a context"):
        flow.sample(None, n=2)
    with pytest.raises(ValueError, match="last dimension 3"):
        flow.forward(torch.randn(2, 4), torch.randn(2, 1))


def test_affine_scale_is_safe_for_extreme_parameters():
    norm = AffineNormalizer(min_scale=1e-3)
    params = torch.tensor([[[0.0, -1e4], [0.0, 1e4], [0.0, 0.0]]])
    u = torch.ones(1, 3)
    z, log_grad = norm.to_latent(u, params)
    assert torch.isfinite(z).all() and torch.isfinite(log_grad).all()
    assert torch.allclose(log_grad[0, 0], torch.tensor(math.log(1e-3)))
    assert torch.allclose(z[0, 2], torch.tensor(1.0))  # zero raw parameter -> unit scale
    back, inv_grad = norm.to_noise(z, params)
    assert torch.allclose(back, u) and torch.allclose(inv_grad, -log_grad)


def test_spline_is_monotonic_and_inverts():
    torch.manual_seed(0)
    spline = SplineNormalizer(num_bins=6, bound=2.0)
    params = torch.randn(1, 3, spline.num_params, dtype=torch.float64) * 2
    y = torch.linspace(-3, 3, 601, dtype=torch.float64)[:, None].expand(-1, 3)
    u, log_grad = spline.to_noise(y, params.expand(601, -1, -1))
    assert (u.diff(dim=0) > 0).all(), "the spline must be increasing"
    outside = y.abs() > 2
    assert torch.equal(u[outside], y[outside]), "identity tails"
    back, inv_grad = spline.to_latent(u, params.expand(601, -1, -1))
    assert torch.allclose(back, y, atol=1e-9)
    assert torch.allclose(inv_grad, -log_grad, atol=1e-9)
    # the analytic log-derivative agrees with autograd's derivative of the map
    y_req = y.clone().requires_grad_(True)
    (du_dy,) = torch.autograd.grad(spline.to_noise(y_req, params.expand(601, -1, -1))[0].sum(), y_req)
    assert torch.allclose(torch.log(du_dy), log_grad, atol=1e-9)


def test_clenshaw_curtis_integrates_polynomials_exactly():
    nodes, weights = clenshaw_curtis(10, torch.float64)
    for k in range(10):
        exact = (1 - (-1) ** (k + 1)) / (k + 1)
        assert abs(float((weights * nodes**k).sum()) - exact) < 1e-12
    with pytest.raises(ValueError, match="even"):
        clenshaw_curtis(7)


def test_umnn_is_monotonic_inverts_and_its_log_derivative_is_the_integrand():
    torch.manual_seed(0)
    umnn = UMNNNormalizer(embedding_dim=3, hidden_sizes=(8,), num_steps=32).double()
    _randomize(umnn, scale=0.8)
    params = torch.randn(1, 2, umnn.num_params, dtype=torch.float64).expand(401, -1, -1)
    z = torch.linspace(-6, 6, 401, dtype=torch.float64)[:, None].expand(-1, 2).clone().requires_grad_(True)
    u, log_grad = umnn.to_noise(z, params)
    assert (u.diff(dim=0) > 0).all(), "the map must be increasing"
    (du_dz,) = torch.autograd.grad(u.sum(), z)
    assert torch.allclose(torch.log(du_dz), log_grad, atol=1e-7), "quadrature derivative != integrand"
    back, inv_grad = umnn.to_latent(u.detach(), params)
    assert torch.allclose(back, z.detach(), atol=1e-8)
    assert torch.allclose(inv_grad, -log_grad.detach(), atol=1e-7)
    # the solve is not differentiated; the final Newton step gives the implicit-function gradient
    p = torch.randn(3, 2, umnn.num_params, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, dtype=torch.float64) * 3
    (grad,) = torch.autograd.grad(umnn.to_latent(target, p)[0].sum(), p)
    h = 1e-6
    for idx in [(0, 0, 0), (1, 1, 2), (2, 0, 3)]:
        bump = torch.zeros_like(p)
        bump[idx] = h
        with torch.no_grad():
            fd = (umnn.to_latent(target, p + bump)[0].sum() - umnn.to_latent(target, p - bump)[0].sum()) / (2 * h)
        assert abs(float(fd) - float(grad[idx])) < 1e-5
    # float32 solves too, to a tolerance matched to the precision
    u32, _ = umnn.float().to_noise(z.detach().float(), params.float())
    back32, _ = umnn.to_latent(u32, params.float())
    assert torch.allclose(back32, z.detach().float(), atol=1e-3)


def _linear_gaussian(n, generator):
    """``z0 ~ N(1, 1)``, ``z1 = 0.8 z0 + N(-0.5, 0.5^2)``, ``z2 = -0.5 z0 + 0.3 z1 + N(0.2, 0.7^2)``,
    ``z3 = 1.2 z2 + N(0, 0.4^2)``, and its exact log density."""
    W = torch.tensor([[0, 0, 0, 0], [0.8, 0, 0, 0], [-0.5, 0.3, 0, 0], [0, 0, 1.2, 0]])
    b = torch.tensor([1.0, -0.5, 0.2, 0.0])
    sd = torch.tensor([1.0, 0.5, 0.7, 0.4])
    z = torch.zeros(n, 4)
    for i in range(4):
        z[:, i] = b[i] + z @ W[i] + sd[i] * torch.randn(n, generator=generator)

    def log_density(v):
        return torch.distributions.Normal(b + v @ W.T, sd).log_prob(v).sum(-1)

    return z, log_density, W != 0


@pytest.mark.slow
def test_density_estimation_reaches_the_true_log_likelihood():
    g = torch.Generator().manual_seed(0)
    train, log_density, A = _linear_gaussian(5000, g)
    test, _, _ = _linear_gaussian(5000, g)
    torch.manual_seed(1)
    flow = StrAF(A, num_layers=1, hidden_sizes=(8, 8), normalizer="affine", skip=True)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(400):
        opt.zero_grad()
        loss = -flow.log_prob(train).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fitted = flow.log_prob(test).mean().item()
        truth = log_density(test).mean().item()
    assert abs(fitted - truth) < 0.05, (fitted, truth)


def test_sampling_with_recomputed_passes_gives_the_same_values_and_gradients(monkeypatch):
    # deep structures recompute each sampling pass in the backward pass to save memory; the
    # values and every parameter gradient must be those of the plain pass
    torch.manual_seed(0)
    d = 6
    A = torch.zeros(d, d + 2, dtype=torch.bool)
    for i in range(1, d):
        A[i, i - 1] = True  # a chain: depth d - 1
    A[:, d:] = True
    flow = StrAF(A, context_dim=2, num_layers=2, hidden_sizes=(16, 16)).double()
    for net in flow.conditioners:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
    eps, x = torch.randn(5, d, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def run():
        flow.zero_grad()
        z, logdet = flow(eps, x)
        (z.square().sum() + logdet.sum()).backward()
        return z.detach(), logdet.detach(), [p.grad.clone() for p in flow.parameters()]

    plain = run()
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(StrAF, "recompute_bytes", 0)
    recomputed = run()
    assert len(calls) == 2 * d  # every pass of both layers went through the checkpoint
    assert torch.allclose(plain[0], recomputed[0]) and torch.allclose(plain[1], recomputed[1])
    for a, b in zip(plain[2], recomputed[2]):
        assert torch.allclose(a, b)


# ------------------------------------------------------------ the level sampler (no gradients)
@settings(max_examples=12, deadline=None)
@given(
    d=st.integers(1, 12),
    context_dim=st.integers(0, 3),
    p=st.sampled_from([0.1, 0.3, 0.7]),
    seed=st.integers(0, 10_000),
    normalizer=st.sampled_from(["affine", "spline", "umnn"]),
    hidden=st.sampled_from([(), (6,), (10, 10), (16, 8, 12)]),
    activation=st.sampled_from(["relu", "tanh", "lipswish"]),
    skip=st.booleans(),
    chunk=st.sampled_from([1, 7, 16384]),
)
def test_level_sampler_equals_the_reference_sampler(d, context_dim, p, seed, normalizer, hidden, activation, skip, chunk):
    A = random_dag_adjacency(d, context_dim, p=p, seed=seed)
    flow = StrAF(A, context_dim=context_dim, num_layers=2, hidden_sizes=hidden, normalizer=normalizer, skip=skip,
                 activation=activation, **NORMALIZER_OPTIONS[normalizer]).double()
    _randomize(flow, seed=seed, scale=RANDOM_SCALE[normalizer])
    flow.chunk_points = chunk
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(4, 3, d, generator=g, dtype=torch.float64)
    x = torch.randn(3, context_dim, generator=g, dtype=torch.float64).expand(4, 3, -1) if context_dim else None
    with torch.no_grad():
        z_ref, ld_ref = flow._forward_rows(eps, x)
        z, ld = flow.forward(eps, x)
        lp = flow.log_prob(z, x)
    assert torch.allclose(z, z_ref, atol=1e-9) and torch.allclose(ld, ld_ref, atol=1e-9)
    assert torch.allclose(lp, flow.base_log_prob(eps) - ld, atol=1e-6)


def _documented_draw_noise(flow, n, batch, common_noise, dtype=torch.float64):
    """The noise ``StrAF.draw`` documents, rebuilt here: feature-major ``(d, ...)`` rows in level
    order, one ``(d, n)`` draw shared by the batch (common noise, or no batch), else one draw
    ``(d, samples, *batch)`` per chunk of ``max(1, chunk_points // prod(batch))`` samples;
    returned as ``eps`` ``(n, *batch, d)`` in the latents' order."""
    d, rest = flow.dim, math.prod(batch)
    if common_noise or rest == 1:
        rows = torch.randn(d, n, dtype=dtype).unsqueeze(-1).expand(d, n, rest)
    else:
        step = max(1, flow.chunk_points // rest)
        rows = torch.cat([torch.randn(d, min(step, n - i), rest, dtype=dtype) for i in range(0, n, step)], 1)
    eps = torch.empty(n, rest, d, dtype=dtype)
    eps[..., torch.cat(flow._levels)] = rows.permute(1, 2, 0)
    return eps.reshape((n,) + tuple(batch) + (d,))


@settings(max_examples=15, deadline=None)
@given(
    d=st.integers(1, 10),
    context_dim=st.integers(0, 3),
    p=st.sampled_from([0.1, 0.4, 0.8]),
    seed=st.integers(0, 10_000),
    normalizer=st.sampled_from(["affine", "spline"]),
    hidden=st.sampled_from([(), (8,), (10, 6)]),
    activation=st.sampled_from(["relu", "lipswish"]),
    batch=st.sampled_from([(), (3,), (2, 2)]),
    common_noise=st.booleans(),
    mapped=st.booleans(),
    chunk=st.sampled_from([1, 5, 16384]),
)
def test_draw_equals_the_reference_sampler_on_its_noise(d, context_dim, p, seed, normalizer, hidden, activation, batch,
                                                        common_noise, mapped, chunk):
    """The fused sampler (noise drawn per chunk in level order, output map folded in, samples
    written feature-major) gives the reference level-by-level sampler's latents and log density
    on the same noise, for random DAGs, contexts shared by the samples, batches and chunkings."""
    A = random_dag_adjacency(d, context_dim, p=p, seed=seed)
    flow = StrAF(A, context_dim=context_dim, num_layers=2, hidden_sizes=hidden, normalizer=normalizer,
                 activation=activation, **NORMALIZER_OPTIONS[normalizer]).double()
    _randomize(flow, seed=seed, scale=RANDOM_SCALE[normalizer])
    flow.chunk_points = chunk
    n = 4
    x = torch.randn(batch + (context_dim,), dtype=torch.float64) if context_dim else None
    out = random_output_map(d, seed) if mapped else None
    torch.manual_seed(seed)
    z, log_q = flow.draw(n, batch, x, common_noise=common_noise, output=out)
    torch.manual_seed(seed)
    eps = _documented_draw_noise(flow, n, batch, common_noise)
    with torch.no_grad():
        z_ref, ld_ref = flow._forward_rows(eps, None if x is None else x.expand((n,) + batch + (context_dim,)))
    z_ref = z_ref if out is None else out.apply(z_ref)
    assert z.shape == (n,) + batch + (d,) and log_q.shape == (n,) + batch
    assert torch.allclose(z, z_ref, atol=1e-9), f"max |z - z_ref| = {(z - z_ref).abs().max().item()}"
    assert torch.allclose(log_q, flow.base_log_prob(eps) - ld_ref, atol=1e-9)


def test_draw_properties_and_the_guide_path():
    """The family-independent draw checks, and a guide's no-gradient samples: the reference sampler
    on the documented noise, mapped by the layout (the guide's trace order and standardisation)."""
    import pyro

    from pyro_struct import StructuredGuide
    from pyro_struct.models import LinearGaussianNetwork

    flow = _randomize(StrAF(random_dag_adjacency(7, 2, p=0.5, seed=4), context_dim=2, num_layers=2,
                            hidden_sizes=(12, 12)).double(), seed=4)
    check_draw(flow)
    lg = LinearGaussianNetwork.random(8, seed=1)
    pyro.set_rng_seed(0)
    guide = StructuredGuide(lg.model, observed=lg.observed_sites, hidden_sizes=(16, 16))
    _randomize(guide.flow, seed=0, scale=0.3)
    layout = guide.latent_layout
    with torch.no_grad():
        layout.loc.copy_(torch.randn(layout.dim))
        layout.scale.copy_(0.5 + torch.rand(layout.dim))
    obs = lg.sample_observations(3, torch.Generator().manual_seed(2))
    post = guide.posterior(**obs)
    torch.manual_seed(1)
    u = post.sample_unconstrained(5)
    torch.manual_seed(1)
    eps = _documented_draw_noise(guide.flow, 5, (3,), False, dtype=torch.get_default_dtype())
    with torch.no_grad():
        y, _ = guide.flow._forward_rows(eps, post.context.expand(5, 3, -1))
    assert torch.allclose(u, layout.from_flow(y), atol=1e-5)


def test_level_schedule_computes_every_unit_once_from_final_inputs():
    A = random_dag_adjacency(15, 4, p=0.3, seed=3)
    flow = StrAF(A, context_dim=4, hidden_sizes=(24, 24))
    order, level, ready = flow._level_inputs()
    net = flow.conditioners[0]
    schedule = net.level_schedule(ready, level)
    masks = [layer.mask for layer in net.layers]
    unit_ready = [ready]
    for k, (perm, bounds) in enumerate(zip(schedule.perms, schedule.bounds)):
        assert len(set(perm.tolist())) == len(perm), "a unit is scheduled twice"
        assert bounds[0] == 0 and bounds == sorted(bounds) and bounds[-1] <= len(perm)
        if k == 0:
            continue
        pass_of = torch.full((masks[k - 1].shape[0],), -1)
        for t in range(len(bounds) - 1):
            pass_of[perm[bounds[t] : bounds[t + 1]]] = t
        prev = unit_ready[-1]
        for u in perm.tolist():  # every input of a unit is final at the unit's pass
            inputs = torch.nonzero(masks[k - 1][u]).flatten()
            assert (prev[inputs] <= pass_of[u]).all() and (prev[inputs] >= 0).all()
        unit_ready.append(pass_of)
    out_rows = schedule.perms[-1].view(-1, net.num_params)[:, 0] // net.num_params
    assert sorted(out_rows.tolist()) == list(range(flow.dim)), "every output row is computed"
    assert torch.equal(torch.cat(flow._levels), out_rows), "outputs in level order"


def test_guide_samples_score_as_their_sampling_density():
    import pyro

    from pyro_struct import StructuredGuide
    from pyro_struct.models import LinearGaussianNetwork

    lg = LinearGaussianNetwork.random(8, seed=1)
    pyro.set_rng_seed(0)
    guide = StructuredGuide(lg.model, observed=lg.observed_sites, hidden_sizes=(16, 16))
    _randomize(guide.flow, seed=0, scale=0.3)
    obs = lg.sample_observations(3, torch.Generator().manual_seed(2))
    post = guide.posterior(**obs)
    values, log_q = post.sample_and_log_prob(50)  # the level sampler (no gradients)
    assert torch.allclose(post.log_prob(values), log_q, atol=1e-4)
