"""Tests for MaskedLinear and the structured MLP (StrNN)."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyro_struct.masks import count_paths, mask_product
from pyro_struct.nn import MaskedLinear, StrNN, get_activation


def _randomize(module, seed=0, scale=0.7):
    """Random values everywhere, masked entries included (the masks must still hold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@st.composite
def rectangular_adjacencies(draw, max_out=30, max_in=30):
    d_out = draw(st.integers(1, max_out))
    d_in = draw(st.integers(1, max_in))
    p = draw(st.sampled_from([0.0, 0.1, 0.4, 0.8]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(d_out, d_in, generator=g) < p


def _jacobian(net, x):
    """``(d_out, num_params, d_in)`` Jacobian of one input ``x`` ``(d_in,)``."""
    return torch.autograd.functional.jacobian(net, x)


@settings(max_examples=30, deadline=None)
@given(
    rectangular_adjacencies(),
    st.booleans(),
    st.sampled_from([1, 3]),
    st.sampled_from([(), (8,), (12, 12)]),
    st.sampled_from(["greedy", "made"]),
)
def test_jacobian_is_zero_exactly_where_A_is(A, skip, num_params, hidden, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow layers are widened
        net = StrNN(A, hidden, num_params=num_params, skip=skip, activation="tanh", mask_method=method).double()
    _randomize(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(A.shape[1], generator=g, dtype=torch.float64)
    J = _jacobian(net, x)
    assert J.shape == (A.shape[0], num_params, A.shape[1])
    forbidden = ~A[:, None, :].expand_as(J)
    assert (J[forbidden] == 0).all(), "an output depends on an input the adjacency forbids"
    # with tanh and random weights every allowed dependency is generically non-zero
    allowed = J[~forbidden].abs()
    assert (allowed > 0).all(), "an allowed dependency is missing"


def test_parameters_of_one_variable_are_contiguous():
    A = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    net = StrNN(A, [6], num_params=2, skip=False)
    out_mask = net.layers[-1].mask
    # rows 2i and 2i+1 are the parameters of variable i: they share the mask row
    assert torch.equal(out_mask[0::2], out_mask[1::2])
    y = net(torch.randn(4, 3))
    assert y.shape == (4, 3, 2)


def test_batch_shapes():
    A = torch.tril(torch.ones(5, 5, dtype=torch.bool), -1)
    net = StrNN(A, [16, 16], num_params=4, skip=True)
    assert net(torch.randn(5)).shape == (5, 4)
    assert net(torch.randn(2, 7, 5)).shape == (2, 7, 5, 4)
    with pytest.raises(ValueError, match="last dimension 5"):
        net(torch.randn(3, 4))


def test_skip_is_masked_and_zero_initialised():
    A = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool)
    net = StrNN(A, [4], num_params=2, skip=True)
    assert torch.equal(net.skip.mask, A.repeat_interleave(2, dim=0))
    assert (net.skip.weight == 0).all()
    # a network without skip gives a different function only through the skip
    _randomize(net.skip)
    assert (net.skip.masked_weight[~net.skip.mask] == 0).all()


def test_skip_restricted_to_some_parameters_feeds_only_those():
    A = torch.tensor([[0, 0, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    net = StrNN(A, [8], num_params=2, skip=(0,)).double()
    assert torch.equal(net.skip.mask[0::2], A) and not net.skip.mask[1::2].any()
    _randomize(net.skip)
    with torch.no_grad():  # only the skip is left: the first parameter linear, the second constant
        net.layers[-1].weight.zero_()
    J = torch.autograd.functional.jacobian(lambda v: net(v), torch.randn(3, dtype=torch.float64))  # (3, 2, 3)
    assert torch.equal(J[:, 0] != 0, A)
    assert (J[:, 1] == 0).all()
    dense = StrNN(A, [8], num_params=2, skip=True)
    assert dense.num_effective_parameters() - net.num_effective_parameters() == int(A.sum())
    for bad in [(2,), (-1,), ("0",), 1]:
        with pytest.raises(ValueError, match="skip"):
            StrNN(A, [8], num_params=2, skip=bad)


def test_affine_straf_skip_feeds_the_shift_only():
    from pyro_struct.flows import StrAF

    A = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    for normalizer, rows in [("affine", slice(1, None, 2)), ("spline", None)]:
        flow = StrAF(A, context_dim=1, normalizer=normalizer)
        skip = flow.conditioners[0].skip
        if rows is None:
            assert torch.equal(skip.mask, A.repeat_interleave(skip.mask.shape[0] // 2, dim=0))
        else:
            assert not skip.mask[rows].any() and torch.equal(skip.mask[0::2], A)


def test_skip_makes_an_exact_linear_map_representable():
    A = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    net = StrNN(A, [4], num_params=1, skip=True)
    with torch.no_grad():
        net.layers[-1].weight.zero_()
        net.layers[-1].bias.copy_(torch.tensor([0.5, -1.0]))
        net.skip.weight.copy_(torch.tensor([[3.0, 3.0], [2.0, 7.0]]))
    x = torch.randn(10, 2)
    expected = torch.stack([torch.full((10,), 0.5), -1.0 + 2.0 * x[:, 0]], -1)
    assert torch.allclose(net(x).squeeze(-1), expected)


def test_masked_linear_initialisation_uses_masked_fan_in():
    torch.manual_seed(0)
    mask = torch.zeros(3, 400, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :100] = True
    mask[2] = True
    layer = MaskedLinear(mask)
    w = layer.weight
    assert (w[~mask] == 0).all(), "masked weights start at zero"
    for row, fan_in in enumerate([4, 100, 400]):
        bound = fan_in**-0.5
        vals = w[row, mask[row]]
        assert vals.abs().max() <= bound
        # uniform on +-bound: the spread scales with the masked fan-in, not the dense one
        assert vals.abs().max() > 0.5 * bound
        assert layer.bias[row].abs() <= bound
    dense = MaskedLinear(torch.ones(3, 400, dtype=torch.bool))
    assert dense.weight.abs().max() <= 400**-0.5


def test_masked_linear_zero_init_and_gradients_stay_masked():
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    layer = MaskedLinear(mask, zero_init=True)
    assert (layer.weight == 0).all() and (layer.bias == 0).all()
    layer = MaskedLinear(mask)
    layer(torch.randn(5, 3)).pow(2).sum().backward()
    assert (layer.weight.grad[~mask] == 0).all()
    assert (layer.weight.grad[mask] != 0).all()
    assert "unmasked=3" in repr(layer)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("num_params", [1, 3])
def test_effective_parameter_count(skip, num_params):
    g = torch.Generator().manual_seed(0)
    A = torch.tril(torch.rand(10, 10, generator=g) < 0.4, -1)
    net = StrNN(A, [20, 20], num_params=num_params, skip=skip)
    masks = [layer.mask for layer in net.layers]
    expected = sum(int(m.sum()) + m.shape[0] for m in masks)
    if skip:
        expected += int(A.sum()) * num_params
    assert net.num_effective_parameters() == expected
    assert net.num_dense_parameters() == sum(p.numel() for p in net.parameters())
    assert net.num_effective_parameters() < net.num_dense_parameters()
    # the hidden masks are the factorisation of A (the output layer repeats rows per parameter)
    assert torch.equal(mask_product(masks)[::num_params] > 0, A)
    assert count_paths(masks) > 0
    assert len(net.masks) == len(masks) + int(skip)


def test_all_zero_adjacency_gives_constant_outputs():
    A = torch.zeros(3, 4, dtype=torch.bool)
    net = StrNN(A, [5], num_params=2)
    _randomize(net)
    y = net(torch.randn(6, 4))
    assert torch.allclose(y, y[:1].expand_as(y))


def test_double_precision_and_hidden_preactivations():
    A = torch.tril(torch.ones(4, 4, dtype=torch.bool), -1)
    net = StrNN(A, [8, 8], num_params=2, skip=True).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert net(x).dtype == torch.float64
    pre = net.hidden(x)
    assert [p.shape[-1] for p in pre] == [8, 8, 8]
    # without skip weights, the last pre-activation is the output
    assert torch.allclose(pre[-1].unflatten(-1, (4, 2)), net(x))


@pytest.mark.parametrize("name", ["relu", "elu", "tanh", "gelu", "silu", "softplus"])
def test_activation_choice(name):
    A = torch.tril(torch.ones(3, 3, dtype=torch.bool), -1)
    net = StrNN(A, [4], activation=name)
    assert isinstance(net.activations[0], nn.Module)
    assert net(torch.randn(2, 3)).shape == (2, 3, 1)


def test_get_activation_forms_and_errors():
    assert isinstance(get_activation("ReLU"), nn.ReLU)
    assert isinstance(get_activation(nn.Tanh), nn.Tanh)
    act = nn.ELU()
    assert get_activation(act) is act
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("swish2")
    with pytest.raises(ValueError, match="activation must be"):
        get_activation(3)


def test_bad_strnn_arguments():
    with pytest.raises(ValueError, match="d_out, d_in"):
        StrNN(torch.ones(3, dtype=torch.bool), [4])
    with pytest.raises(ValueError, match="num_params"):
        StrNN(torch.ones(2, 2, dtype=torch.bool), [4], num_params=0)
    A = torch.tril(torch.ones(6, 6, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="at least 5 units"):
        StrNN(A, [3], widen=False)
    with pytest.warns(UserWarning, match="widened"):
        net = StrNN(A, [3], widen=True)
    assert net.hidden_sizes == [5]


def test_row_restricted_forward_equals_the_full_pass():
    from tests.flow_properties import random_dag_adjacency

    A = random_dag_adjacency(12, 3, p=0.3, seed=4)
    net = StrNN(A, hidden_sizes=(20, 20), num_params=2, skip=True).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    x = torch.randn(5, 15, dtype=torch.float64)
    full = net(x)
    for rows in ([0], [3, 7], list(range(12)), [11, 2]):
        idx = torch.tensor(rows)
        # feature-major in and out: (d_in, N) -> (r, num_params, N)
        assert torch.allclose(net(x.T.contiguous(), rows=idx), full[:, idx].permute(1, 2, 0), atol=1e-12)
        # only the units with a path to those outputs are used
        plan = net.row_plan(idx)
        assert len(plan[0]) == int(A[idx].any(0).sum())


# ------------------------------------------------------------------ activation table and the one pass
@pytest.mark.parametrize("name", sorted(__import__("pyro_struct.nn", fromlist=["ACTIVATIONS"]).ACTIVATIONS))
def test_activation_table_derivatives_and_flags(name):
    from pyro_struct.nn import ACTIVATIONS

    act = get_activation(name, width=5).double()
    with torch.no_grad():
        for p in act.parameters():  # LipSwish: betas away from 1
            p.copy_(torch.linspace(-2.0, 2.0, p.numel(), dtype=p.dtype))
    a = torch.linspace(-6.0, 6.0, 400, dtype=torch.float64).repeat(5, 1).T.contiguous().requires_grad_()
    value, slope = act.value_and_derivative(a)
    (grad,) = torch.autograd.grad(value.sum(), a)
    assert torch.allclose(slope, grad, atol=1e-12) and torch.allclose(act(a), value)
    lipschitz = bool((slope.abs() <= 1.0 + 1e-12).all())
    assert ACTIVATIONS[name].lipschitz == lipschitz, f"{name}: max |f'| = {slope.abs().max().item():.3f}"
    with pytest.raises(ValueError, match="lipschitz|derivative bounded"):
        get_activation("gelu", require="lipschitz")
    with pytest.raises(ValueError, match="smooth"):
        get_activation("relu", require="smooth")


def test_one_pass_hooks_give_slopes_tangents_and_row_plans():
    from tests.flow_properties import random_dag_adjacency

    A = random_dag_adjacency(6, 2, p=0.5, seed=3)
    net = StrNN(A, hidden_sizes=(10, 9), num_params=2, activation="lipswish").double()
    _randomize(net, seed=4)
    x = torch.randn(7, 8, dtype=torch.float64)
    v = torch.randn(7, 6, dtype=torch.float64)
    gates = [torch.rand(m.shape[0], dtype=torch.float64) + 0.5 for m in net.masks]

    def post(k, a):
        return a * gates[k] + 0.1, gates[k]

    result = net.run(x, post=post, need_slopes=True, tangent=v)
    f = lambda inp: net.run(inp, post=post).output  # noqa: E731
    _, jvp = torch.autograd.functional.jvp(f, x, torch.cat([v, torch.zeros(7, 2, dtype=torch.float64)], -1))
    assert torch.allclose(result.tangent, jvp, atol=1e-12), "tangent is the Jacobian-vector product"
    assert [s.shape[-1] for s in result.slopes] == [10, 9, 12] and torch.equal(result.slopes[-1], gates[-1])
    # the slopes rebuild the Jacobian: J = W_L S_{L-1} ... S_1 W_1 per sample
    W = net.effective_weights()
    first = [s.expand(7, -1)[0] for s in result.slopes]  # the output gate is not batched
    J = W[0] * first[0].unsqueeze(-1)
    for Wk, sk in zip(W[1:], first[1:]):
        J = (Wk @ J) * sk.unsqueeze(-1)
    assert torch.allclose(J, torch.autograd.functional.jacobian(lambda inp: f(inp), x[0]), atol=1e-12)
    # LipSwish's per-unit betas follow the units a row plan selects (feature-major)
    rows = torch.tensor([4, 1])
    assert torch.allclose(net(x.T.contiguous(), rows=rows), net(x)[:, rows].permute(1, 2, 0), atol=1e-12)
