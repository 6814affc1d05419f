"""Tests of site-level provenance: tags follow values, not Python objects handed back by ops."""

import pyro
import pyro.distributions as dist
import torch

from pyro_struct.trace import trace_model
from pyro_struct.trace.provenance import ProvenanceMode, positions


def edges(bn):
    return set(bn.graph.edges)


def tagged(mode, t):
    entry = mode.tags.get(id(t))
    return set() if entry is None else set(positions(entry[1]))


def leaves(mode, *shapes):
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, requires_grad=True)
        mode.tag(t, 1 << i)
        out.append(t)
    return out


# ----------------------------------------------------------------------------- the mode itself
def test_broadcast_tensors_tags_each_output_with_its_own_input():
    mode = ProvenanceMode()
    a, b, c = leaves(mode, (), (), (3,))
    with mode:
        a2, b2 = torch.broadcast_tensors(a, b)  # same shapes: hands back a and b themselves
        a3, c3 = torch.broadcast_tensors(a, c)  # a is expanded to a new view
    assert a2 is a and b2 is b
    assert tagged(mode, a) == {0} and tagged(mode, b) == {1}
    assert tagged(mode, a3) == {0} and tagged(mode, c3) == {2}


def test_ops_returning_an_input_keep_its_tag():
    mode = ProvenanceMode()
    a, b = leaves(mode, (), ())
    with mode:
        same = [a.to(b), a.contiguous(), a.type_as(b), a.float()]
        view = a.expand_as(b)
        zeros = torch.zeros_like(b) + 1.0
    assert all(t is a for t in same) and tagged(mode, a) == {0}
    assert tagged(mode, view) == {0}  # the shape came from b, the values from a alone
    assert tagged(mode, zeros) == set()


def test_in_place_writes_still_unite():
    mode = ProvenanceMode()
    a, b, c = leaves(mode, (), (2,), (2,))
    with mode:
        buf = torch.zeros(3)
        buf[0] = a
        acc = b * 1.0
        acc.add_(c)
        base = torch.zeros(4)
        base[2:].mul_(b)  # a view written in place: its base changes
        out = torch.empty(2)
        with torch.no_grad():  # out= refuses inputs that require grad otherwise
            torch.add(b, c, out=out)
    assert tagged(mode, buf) == {0}
    assert tagged(mode, acc) == {1, 2}
    assert tagged(mode, base) == {1}
    assert tagged(mode, out) == {1, 2}


# ----------------------------------------------------------------------------- traced models
def test_shared_scale_does_not_pick_up_the_other_location():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("b", dist.Normal(0.0, tau))

    bn = trace_model(model)
    assert edges(bn) == {("mu", "a"), ("tau", "a"), ("tau", "b")}


def test_ar1_python_loop_has_markov_parents_only():
    T = 10

    def model(x=None):
        phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        h = pyro.sample("h_0", dist.Normal(0.0, sigma))
        for t in range(T):
            if t > 0:
                h = pyro.sample(f"h_{t}", dist.Normal(phi * h, sigma))
            pyro.sample(f"x_{t}", dist.Normal(h, 1.0), obs=None if x is None else x[t])

    bn = trace_model(model, x=torch.zeros(T))
    expected = {("sigma", "h_0")}
    expected |= {(p, f"h_{t}") for t in range(1, T) for p in ("phi", "sigma", f"h_{t - 1}")}
    expected |= {(f"h_{t}", f"x_{t}") for t in range(T)}
    assert edges(bn) == expected


def test_like_and_to_do_not_add_parents():
    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        pyro.sample("a", dist.Normal(torch.zeros_like(mu), tau.to(mu)))
        pyro.sample("b", dist.Normal(mu.expand_as(tau).contiguous(), 1.0))

    assert edges(trace_model(model)) == {("tau", "a"), ("mu", "b")}
