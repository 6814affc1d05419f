"""Tests of the example models and the closed-form linear-Gaussian posteriors."""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct.models import (
    LinearGaussianNetwork,
    arithmetic_circuit,
    deconvolution,
    gaussian_kl,
    hierarchical,
    hmm,
)
from pyro_struct.models.deconvolution import strided_convolution


@pytest.mark.parametrize("name,nodes,latent,observed", [("ecoli70", 46, 22, 24), ("magic-niab", 44, 39, 5)])
def test_bnlearn_networks_parse(name, nodes, latent, observed):
    net = LinearGaussianNetwork.from_name(name)  # the copy shipped in the package
    assert len(net.order) == nodes
    assert len(net.latent_sites) == latent and len(net.observed_sites) == observed
    # site names are valid identifiers and distinct
    names = net.latent_sites + net.observed_sites
    assert len(set(names)) == len(names) and all(n.isidentifier() for n in names)


def test_exact_posterior_matches_precision_form():
    net = LinearGaussianNetwork.random(9, seed=3)
    obs = net.sample_observations(5, torch.Generator().manual_seed(0))
    mean, cov = net.exact_posterior(obs)
    # independent route: the joint precision's latent block is the posterior precision
    idx = {n: i for i, n in enumerate(net.order)}
    lat = [idx[n] for n in net.latent]
    ob = [idx[n] for n in net.observed]
    P = torch.linalg.inv(net.joint_cov)
    cov2 = torch.linalg.inv(P[lat][:, lat])
    x = torch.stack([obs[s].double() for s in net.observed_sites], -1)
    mean2 = net.joint_mean[lat] - (x - net.joint_mean[ob]) @ (cov2 @ P[lat][:, ob]).T
    assert torch.allclose(cov, cov2, atol=1e-8)
    assert torch.allclose(mean, mean2, atol=1e-8)


def test_joint_moments_match_simulation():
    net = LinearGaussianNetwork.random(6, seed=1)
    joint = net.sample_joint(200_000, torch.Generator().manual_seed(0))
    X = torch.stack([joint[net.site_names[n]].double() for n in net.order], -1)
    assert torch.allclose(X.mean(0), net.joint_mean, atol=0.05)
    assert torch.allclose(torch.cov(X.T), net.joint_cov, atol=0.05 * net.joint_cov.abs().max())


def test_pyro_model_density_matches_joint_gaussian():
    net = LinearGaussianNetwork.random(5, seed=2)
    joint = net.sample_joint(3, torch.Generator().manual_seed(1))
    cond = pyro.poutine.condition(net.model, data={k: v[0] for k, v in joint.items()})
    lp = pyro.poutine.trace(cond).get_trace().log_prob_sum().double()
    x = torch.stack([joint[net.site_names[n]][0].double() for n in net.order])
    expected = dist.MultivariateNormal(net.joint_mean, net.joint_cov).log_prob(x)
    assert torch.allclose(lp, expected, atol=1e-4)


def test_gaussian_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cp, cq = A @ A.T + torch.eye(3), torch.eye(3, dtype=torch.float64) * 2
    mp, mq = torch.randn(3, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    p, q = dist.MultivariateNormal(mp, cp), dist.MultivariateNormal(mq, cq)
    z = p.sample((400_000,))
    mc = (p.log_prob(z) - q.log_prob(z)).mean()
    assert torch.allclose(gaussian_kl(mp, cp, mq, cq), mc, rtol=0.02)
    assert gaussian_kl(mp, cp, mp, cp).abs() < 1e-10


def test_network_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        LinearGaussianNetwork.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": ["a"], "cpds": {}}))
    with pytest.raises(ValueError, match="malformed"):
        LinearGaussianNetwork.from_json(bad)
    net = LinearGaussianNetwork.random(4, seed=0)
    with pytest.raises(ValueError, match="unknown observed site"):
        net.model(nonsense=1.0)


def test_example_models_run_and_vectorise():
    for model, kwargs in [
        (arithmetic_circuit(), {}),
        (hmm(4), {}),
        (hierarchical(3), {}),
        (deconvolution(), {}),
    ]:
        tr = pyro.poutine.trace(model).get_trace(**kwargs)
        assert torch.isfinite(tr.log_prob_sum())
        with pyro.plate("particles", 7, dim=-3):
            tr = pyro.poutine.trace(model).get_trace(**kwargs)
        assert torch.isfinite(tr.log_prob_sum())


def test_strided_convolution_matches_conv2d():
    img, k = torch.randn(2, 9, 9), torch.randn(3, 3)
    expected = torch.nn.functional.conv2d(img[:, None], k[None, None], stride=2)[:, 0]
    assert torch.allclose(strided_convolution(img, k, 2), expected, atol=1e-5)


def test_models_declare_their_observed_sites():
    import pyro_struct as ps

    net = LinearGaussianNetwork.random(5, seed=0)
    for model, expected in [
        (arithmetic_circuit(), ["x0", "x1"]),
        (hmm(3), ["x_0", "x_1", "x_2"]),
        (hierarchical(2), ["x"]),
        (deconvolution(), ["kernel", "output"]),
        (net.model, net.observed_sites),
    ]:
        assert model.observed_sites == expected
        assert ps.trace_model(model).observed_sites == expected
