"""Property checks every conditional flow family must pass (shared by the flow test modules).

Each check takes a built flow (float64 recommended) and raises ``AssertionError`` with a
message saying which property broke.
"""

from __future__ import annotations

import networkx as nx
import torch

from pyro_struct.flows.base import ConditionalFlow, OutputMap, transitive_closure
from pyro_struct.nn import MaskedLinear, MaskedMLP

__all__ = [
    "random_dag_adjacency",
    "chain_adjacency",
    "check_jacobian_structure",
    "check_logdet",
    "check_log_prob_consistency",
    "check_round_trip",
    "check_sampling_without_gradients",
    "check_draw",
    "random_output_map",
    "check_gradients",
    "check_all",
    "check_augmented",
    "expanded_closure",
    "check_interface",
    "dag_from_adjacency",
]


def random_dag_adjacency(d: int, context_dim: int = 0, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    """A random ``(d, d + context_dim)`` adjacency, strictly lower-triangular among latents."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(d, d + context_dim, generator=g) < p
    A[:, :d] = torch.tril(A[:, :d], -1)
    return A


def chain_adjacency(d: int, context_dim: int = 0) -> torch.Tensor:
    """``z_0 -> z_1 -> ... -> z_{d-1}``; the context feeds the first latent only."""
    A = torch.zeros(d, d + context_dim, dtype=torch.bool)
    for i in range(1, d):
        A[i, i - 1] = True
    A[0, d:] = True
    return A


def _context(flow: ConditionalFlow, batch=(), seed: int = 0):
    if flow.context_dim == 0:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*batch, flow.context_dim, generator=g, dtype=torch.float64)


def _noise(flow: ConditionalFlow, batch=(), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, flow.dim, generator=g, dtype=torch.float64)


def check_jacobian_structure(flow: ConditionalFlow, atol: float = 1e-10, seed: int = 0) -> None:
    """The Jacobian of ``(eps, x) -> z`` is zero wherever the transitive closure has no path."""
    eps, x = _noise(flow, seed=seed), _context(flow, seed=seed)
    d = flow.dim
    if x is None:
        J = torch.autograd.functional.jacobian(lambda e: flow.forward(e, None)[0], eps)
    else:
        inp = torch.cat([eps, x])
        J = torch.autograd.functional.jacobian(lambda v: flow.forward(v[:d], v[d:])[0], inp)
    allowed = transitive_closure(flow.adjacency)
    bad = (J.abs() > atol) & ~allowed
    assert not bad.any(), (
        f"z depends on inputs the structure forbids at (row, col) {torch.nonzero(bad)[:5].tolist()}; "
        f"values {J[bad][:5].tolist()}"
    )


def check_logdet(flow: ConditionalFlow, atol: float = 1e-5, seed: int = 0) -> None:
    """``log|det dz/deps|`` from ``forward`` equals slogdet of the autograd Jacobian."""
    eps, x = _noise(flow, seed=seed), _context(flow, seed=seed)
    J = torch.autograd.functional.jacobian(lambda e: flow.forward(e, x)[0], eps)
    _, expected = torch.linalg.slogdet(J)
    _, logdet = flow.forward(eps, x)
    assert torch.allclose(logdet, expected, atol=atol), f"forward logdet {logdet.item()} != slogdet {expected.item()}"
    z = flow.forward(eps, x)[0].detach()
    Ji = torch.autograd.functional.jacobian(lambda v: flow.inverse(v, x)[0], z)
    _, expected_inv = torch.linalg.slogdet(Ji)
    _, logdet_inv = flow.inverse(z, x)
    assert torch.allclose(logdet_inv, expected_inv, atol=atol), (
        f"inverse logdet {logdet_inv.item()} != slogdet {expected_inv.item()}"
    )


def check_log_prob_consistency(flow: ConditionalFlow, atol: float = 1e-6, n: int = 7, seed: int = 0) -> None:
    """``log_prob(z, x)`` of ``rsample_and_log_prob(x, n)``'s samples equals the returned density."""
    torch.manual_seed(seed)
    x = _context(flow, batch=(3,), seed=seed)
    z, lq = flow.rsample_and_log_prob(x, n)
    batch = (3,) if x is not None else ()
    assert z.shape == (n, *batch, flow.dim), f"sample shape {tuple(z.shape)}"
    assert lq.shape == (n, *batch), f"log density shape {tuple(lq.shape)}"
    lp = flow.log_prob(z.detach(), x)
    assert torch.allclose(lp, lq.detach(), atol=atol), f"max |log_prob - returned| = {(lp - lq).abs().max().item()}"


def check_round_trip(flow: ConditionalFlow, atol: float = 1e-6, seed: int = 0) -> None:
    """Inverse then forward returns the input, and forward then inverse too."""
    x = _context(flow, batch=(5,), seed=seed)
    eps = _noise(flow, batch=(5,), seed=seed)
    z, ld_f = flow.forward(eps, x)
    eps2, ld_i = flow.inverse(z, x)
    assert torch.allclose(eps2, eps, atol=atol), f"forward-inverse error {(eps2 - eps).abs().max().item()}"
    z2, _ = flow.forward(eps2, x)
    assert torch.allclose(z2, z, atol=atol), f"inverse-forward error {(z2 - z).abs().max().item()}"
    assert torch.allclose(ld_f, -ld_i, atol=atol * 10), "forward and inverse log-determinants do not cancel"


def check_gradients(flow: ConditionalFlow, seed: int = 0) -> None:
    """Every trainable parameter gets a finite gradient, and at least one is non-zero."""
    torch.manual_seed(seed)
    flow.zero_grad()
    x = _context(flow, batch=(4,), seed=seed)
    z, lq = flow.rsample_and_log_prob(x, 3)
    loss = lq.mean() + (z**2).mean() + flow.log_prob(z.detach() + 0.1, x).mean()
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.requires_grad]
    assert grads, "flow has no trainable parameters"
    for (name, p) in flow.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "all gradients are zero"


def check_sampling_without_gradients(flow: ConditionalFlow, atol: float = 1e-9, seed: int = 0) -> None:
    """Sampling without gradients (a family may use a faster sampler there) equals sampling with
    them, for samples of shared contexts (a context expanded along the sample dimension), of one
    context each, and across chunk boundaries; its log density equals a density pass over its samples."""
    n, b = 5, 3
    x = _context(flow, batch=(b,), seed=seed)
    eps = _noise(flow, batch=(n, b), seed=seed)
    chunk = getattr(flow, "chunk_points", None)
    for x_full in (None if x is None else x.expand(n, b, -1), None if x is None else x.expand(n, b, -1).clone()):
        z_ref, ld_ref = flow.forward(eps, x_full)
        for points in ([chunk] if chunk is None else [chunk, 2 * b, b + 1]):  # several chunks, a short last one
            if chunk is not None:
                flow.chunk_points = points
            try:
                with torch.no_grad():
                    z, ld = flow.forward(eps, x_full)
                    lp = flow.log_prob(z, x_full)
            finally:
                if chunk is not None:
                    flow.chunk_points = chunk
            assert torch.allclose(z, z_ref.detach(), atol=atol), f"no-grad sample error {(z - z_ref).abs().max().item()}"
            assert torch.allclose(ld, ld_ref.detach(), atol=atol), f"no-grad log-det error {(ld - ld_ref).abs().max().item()}"
            lq = flow.base_log_prob(eps) - ld
            assert torch.allclose(lp, lq, atol=max(atol, 1e-6)), f"max |log_prob - sampling density| = {(lp - lq).abs().max().item()}"
        if x is None:
            break


def random_output_map(d: int, seed: int = 0, dtype=torch.float64) -> OutputMap:
    """A random :class:`OutputMap`: a permutation, locations and positive scales."""
    g = torch.Generator().manual_seed(seed)
    return OutputMap(torch.randperm(d, generator=g), torch.randn(d, generator=g, dtype=dtype),
                     0.5 + torch.rand(d, generator=g, dtype=dtype))


def check_draw(flow: ConditionalFlow, atol: float = 1e-9, seed: int = 0) -> None:
    """``draw``: shapes; its log density equals a density pass over its samples; an output map is the
    map of the same draw; with ``common_noise`` batch element ``i`` is an unbatched draw for its context."""
    n, b, d = 3, 2, flow.dim
    x = _context(flow, batch=(b,), seed=seed)
    out = random_output_map(d, seed)
    torch.manual_seed(seed)
    z, lq = flow.draw(n, (b,), x)
    assert z.shape == (n, b, d) and lq.shape == (n, b)
    lp = flow.log_prob(z, None if x is None else x.expand(n, b, -1))
    assert torch.allclose(lp, lq, atol=max(atol, 1e-6)), f"draw: max |log_prob - log q| = {(lp - lq).abs().max().item()}"
    torch.manual_seed(seed)
    mapped, lq_mapped = flow.draw(n, (b,), x, output=out)
    assert torch.allclose(mapped, out.apply(z), atol=atol) and torch.allclose(lq_mapped, lq, atol=atol)
    torch.manual_seed(seed + 1)
    together, lq_together = flow.draw(n, (b,), x, common_noise=True, output=out)
    for i in range(b):
        torch.manual_seed(seed + 1)
        alone, lq_alone = flow.draw(n, (), None if x is None else x[i], output=out)
        assert torch.allclose(together[:, i], alone, atol=atol), "common_noise: a batch element differs from its unbatched draw"
        assert torch.allclose(lq_together[:, i], lq_alone, atol=atol)


def expanded_closure(adjacency: torch.Tensor, augment: int) -> torch.Tensor:
    """Which state inputs each state output of an augmented flow may depend on, ``(D, D + c)``.

    Written here element by element, independently of the flow's own mask expansion: state unit
    ``u`` belongs to latent ``u`` (``u < d``) or ``(u - d) // augment``, and may depend on the
    noise of state unit ``v`` (context column ``k``) iff the latent closure links their latents.
    """
    C = transitive_closure(adjacency)
    d = C.shape[0]
    owner = list(range(d)) + [i for i in range(d) for _ in range(augment)]
    D, c = len(owner), C.shape[1] - d
    allowed = torch.zeros(D, D + c, dtype=torch.bool)
    for u in range(D):
        for v in range(D):
            allowed[u, v] = C[owner[u], owner[v]]
        for k in range(c):
            allowed[u, D + k] = C[owner[u], d + k]
    return allowed


def _check_state_maps(flow, atol: float, logdet_atol: float, jac_atol: float, seed: int) -> None:
    """The exact bijection on an augmented flow's state: Jacobian zeros, log-dets, round trip, no-grad."""
    D, d = flow.state_dim, flow.dim
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(D, generator=g, dtype=torch.float64)
    x = _context(flow, seed=seed)
    inp = e if x is None else torch.cat([e, x])
    J = torch.autograd.functional.jacobian(lambda v: flow.forward_state(v[:D], None if x is None else v[D:])[0], inp)
    bad = (J.abs() > jac_atol) & ~expanded_closure(flow.adjacency, flow.augment)
    assert not bad.any(), f"a state unit depends on a forbidden input at {torch.nonzero(bad)[:5].tolist()}"
    _, expected = torch.linalg.slogdet(J[:, :D])
    y, logdet = flow.forward_state(e, x)
    assert torch.allclose(logdet, expected, atol=logdet_atol), f"state logdet {logdet.item()} != slogdet {expected.item()}"
    Ji = torch.autograd.functional.jacobian(lambda v: flow.inverse_state(v, x)[0], y.detach())
    e_back, logdet_inv = flow.inverse_state(y.detach(), x)
    assert torch.allclose(logdet_inv, torch.linalg.slogdet(Ji)[1], atol=logdet_atol), "inverse state logdet != slogdet"
    assert torch.allclose(e_back[:d], e[:d], atol=atol), f"latent round trip error {(e_back[:d] - e[:d]).abs().max().item()}"
    assert torch.allclose(e_back, e, atol=atol), f"state round trip error {(e_back - e).abs().max().item()}"
    assert torch.allclose(logdet, -logdet_inv, atol=10 * atol), "state log-determinants do not cancel"
    with torch.no_grad():
        y_ng, ld_ng = flow.forward_state(e, x)
    assert torch.allclose(y_ng, y.detach(), atol=atol) and torch.allclose(ld_ng, logdet.detach(), atol=atol)


def _check_augmented_densities(flow, atol: float, seed: int) -> None:
    """The documented bound: both directions return ``log q(z, a | x) - log r(a | z, x)``, sampling at
    its own ``a``, ``log_prob`` at ``a ~ r`` (same seed, same draws)."""
    d = flow.dim
    x = _context(flow, batch=(3,), seed=seed)
    torch.manual_seed(seed)
    z, lq = flow.rsample_and_log_prob(x, 4)
    torch.manual_seed(seed)
    y, lq_state, lr = flow.rsample_state(x, 4)
    assert torch.equal(z, y[..., :d]), "rsample_and_log_prob and rsample_state must draw the same sample"
    assert torch.allclose(lq, lq_state - lr, atol=atol), "sampling density != log q(z, a | x) - log r(a | z, x)"
    exact = flow.state_log_prob(y.detach(), x)
    assert torch.allclose(exact, lq_state.detach(), atol=atol), f"state density error {(exact - lq_state).abs().max().item()}"
    direct = flow.auxiliary_log_prob(y[..., d:], z, x)
    assert torch.allclose(direct, lr, atol=1e-10), "log r of the sample differs from auxiliary_log_prob"
    saved, flow.aux_samples = flow.aux_samples, 1
    try:
        zd = z.detach()
        torch.manual_seed(seed + 1)
        lp = flow.log_prob(zd, x)
        torch.manual_seed(seed + 1)
        a, log_r = flow.auxiliary_sample(zd, x)
    finally:
        flow.aux_samples = saved
    expected = flow.state_log_prob(torch.cat([zd, a], -1), x) - log_r
    assert torch.allclose(lp, expected, atol=atol), f"log_prob != bound at a ~ r: {(lp - expected).abs().max().item()}"


def check_augmented(flow, logdet_atol: float = 1e-5, roundtrip_atol: float = 1e-6, jac_atol: float = 1e-10) -> None:
    """The property suite for a flow with augmenting dimensions (``flow.augment > 0``): the latent
    Jacobian's zeros, the state bijection's properties and the documented density bound."""
    check_jacobian_structure(flow, atol=jac_atol)  # z's dependence on (eps, x), augmenting noise held fixed
    _check_state_maps(flow, roundtrip_atol, logdet_atol, jac_atol, seed=0)
    _check_augmented_densities(flow, max(roundtrip_atol, 1e-6), seed=0)
    check_gradients(flow)
    aux = [p.grad for p in flow.aux.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in aux), "the auxiliary model gets no gradient"


def check_all(flow: ConditionalFlow, logdet_atol: float = 1e-5, roundtrip_atol: float = 1e-6, jac_atol: float = 1e-10) -> None:
    """Run every property check on ``flow`` (expects float64 parameters); flows with augmenting
    dimensions run :func:`check_augmented` instead of the exact-density checks."""
    if getattr(flow, "augment", 0):
        check_augmented(flow, logdet_atol, roundtrip_atol, jac_atol)
        return
    check_jacobian_structure(flow, atol=jac_atol)
    check_logdet(flow, atol=logdet_atol)
    check_log_prob_consistency(flow, atol=max(roundtrip_atol, 1e-6))
    check_round_trip(flow, atol=roundtrip_atol)
    check_sampling_without_gradients(flow, atol=roundtrip_atol)
    check_draw(flow, atol=roundtrip_atol)
    check_gradients(flow)


def _count_network_evaluations(flow: ConditionalFlow) -> list[int]:
    """Wrap every masked network's ``run`` (and a StrNN's ``level_pass``, one pass of sampling without
    gradients) on this instance; the returned one-element list counts the calls."""
    calls = [0]
    for m in flow.modules():
        if isinstance(m, MaskedMLP):
            for name in ("run", "level_pass"):
                if hasattr(m, name):
                    def counted(*args, _fn=getattr(m, name), **kwargs):
                        calls[0] += 1
                        return _fn(*args, **kwargs)

                    setattr(m, name, counted)
    return calls


def check_interface(flow: ConditionalFlow, expected_passes: int | None) -> None:
    """The family-independent interface: ``masks``, parameter counts, ``num_passes``, ``last_stats``
    and the base class's input validation.

    ``expected_passes`` is the documented ``num_passes`` (``None`` where it is only known after a
    sampling call, as for the CNF's adaptive solver).
    """
    layers = {name: m for name, m in flow.named_modules() if isinstance(m, MaskedLinear)}
    masks = flow.masks
    assert list(masks) == list(layers) and masks, "masks must name every masked layer, in module order"
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and torch.equal(mask, layers[name].mask.cpu()), f"mask {name} differs"
    dense = sum(p.numel() for p in flow.parameters())
    masked_out = sum(int((~m.mask).sum()) for m in layers.values())
    assert flow.num_dense_parameters() == dense
    assert flow.num_effective_parameters() == dense - masked_out
    assert masked_out == 0 or flow.num_effective_parameters() < dense
    assert flow.num_passes == expected_passes, f"num_passes {flow.num_passes} != {expected_passes}"
    calls = _count_network_evaluations(flow)
    x = _context(flow, batch=(3,))
    with torch.no_grad():
        z = flow.sample(x, n=2)
        forward_calls = calls[0]
        stats = flow.last_stats["forward"]
        assert stats["evaluations"] == forward_calls, f"forward evaluations {stats['evaluations']} != {forward_calls}"
        assert flow.num_passes == forward_calls, f"num_passes {flow.num_passes} != {forward_calls} evaluations"
        calls[0] = 0
        flow.log_prob(z, x)
        assert flow.last_stats["inverse"]["evaluations"] == calls[0] > 0
    for fn, name in [(flow.forward, "eps"), (flow.inverse, "z")]:
        try:
            fn(torch.zeros(2, flow.dim + 1, dtype=torch.float64), None if x is None else x[:2])
        except ValueError as e:
            assert f"{name} must have last dimension {flow.dim}" in str(e), str(e)
        else:
            raise AssertionError(f"{name} of the wrong width was accepted")
    if flow.context_dim:
        try:
            flow.forward(torch.zeros(2, flow.dim, dtype=torch.float64), None)
        except ValueError as e:
            assert "needs a context" in str(e), str(e)
        else:
            raise AssertionError("a missing context was accepted")


def dag_from_adjacency(A: torch.Tensor) -> nx.DiGraph:
    """The DAG of a flow adjacency (input index -> latent index), for path-based checks."""
    g = nx.DiGraph()
    g.add_nodes_from(range(A.shape[1]))
    for i, j in torch.nonzero(A).tolist():
        g.add_edge(j, i)
    return g
