"""A plated hierarchical (random effects) model."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["hierarchical"]


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
