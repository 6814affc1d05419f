"""Plated hierarchical (random effects) models: one plate, and two nested plates with a closed-form posterior."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["hierarchical", "nested_hierarchical", "nested_hierarchical_posterior", "GROUP_SCALE", "NOISE_SCALE"]

#: the nested model's group scale ``s`` and observation noise ``sigma``
GROUP_SCALE, NOISE_SCALE = 0.5, 1.0


def hierarchical(N: int, noise_scale: float = 1.0):
    """``mu ~ N(0, 1)``, ``tau ~ LogNormal(0, 0.5)``, ``z_i ~ N(mu, tau)``, ``x_i ~ N(z_i, noise)``.

    Args:
        N: plate size (``2 N + 2`` scalar nodes).

    Returns:
        A Pyro model ``model(x=None)`` with ``x`` of shape ``(N,)`` observing site ``x``.
    """
    if N < 1:
        raise ValueError(f"the plate needs N >= 1 members; got {N}")

    def model(x=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), torch.tensor(1.0)))
        tau = pyro.sample("tau", dist.LogNormal(torch.tensor(0.0), torch.tensor(0.5)))
        with pyro.plate("data", N, dim=-1):
            z = pyro.sample("z", dist.Normal(mu, tau))
            pyro.sample("x", dist.Normal(z, noise_scale), obs=x)

    model.__name__ = f"hierarchical_{N}"
    model.observed_sites = ["x"]
    return model


def nested_hierarchical(G: int = 5, M: int = 10, x=None):
    """Two nested plates: ``mu ~ N(0, 1)``; ``theta_g ~ N(mu, s)`` for ``G`` groups; ``x_gm ~ N(theta_g, sigma)``
    for ``M`` members of each group (``s = GROUP_SCALE``, ``sigma = NOISE_SCALE``).

    ``theta`` has shape ``(G, 1)`` (groups at ``dim=-2``), ``x`` shape ``(G, M)``; the posterior of
    ``(mu, theta)`` is Gaussian: :func:`nested_hierarchical_posterior`.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, GROUP_SCALE))
        with pyro.plate("obs", M, dim=-1):
            pyro.sample("x", dist.Normal(theta, NOISE_SCALE), obs=x)


def nested_hierarchical_posterior(x: torch.Tensor) -> torch.distributions.MultivariateNormal:
    """The exact posterior of ``(mu, theta_1..G)`` given ``x`` ``(G, M)`` (float64, from the joint precision)."""
    G, M = x.shape
    s2, v = GROUP_SCALE**2, NOISE_SCALE**2
    P = torch.zeros(G + 1, G + 1, dtype=torch.float64)
    P[0, 0] = 1 + G / s2
    P[0, 1:] = P[1:, 0] = -1 / s2
    P[1:, 1:] = torch.eye(G, dtype=torch.float64) * (1 / s2 + M / v)
    b = torch.cat([torch.zeros(1, dtype=torch.float64), x.double().sum(-1) / v])
    cov = torch.linalg.inv(P)
    return torch.distributions.MultivariateNormal(cov @ b, covariance_matrix=0.5 * (cov + cov.T))


nested_hierarchical.observed_sites = ["x"]
