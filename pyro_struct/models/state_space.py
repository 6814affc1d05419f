"""A state-space model with global parameters: an AR(1) latent chain with unknown coefficient and scale, a Python loop of scalar sites."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["ar1_state_space"]


def ar1_state_space(T: int, noise_scale: float = 0.5):
    """``rho ~ Uniform(-0.95, 0.95)``, ``s ~ LogNormal(-1, 0.3)``, ``z_0 ~ N(0, 1)``, ``z_t ~ N(rho z_{t-1}, s)``,
    ``x_t ~ N(z_t, noise_scale)`` with sites ``rho``, ``s``, ``z_0..z_{T-1}``, ``x_0..x_{T-1}``.

    The coefficient's prior keeps the chain stationary (``|rho| < 1``): an explosive draw would
    overflow long simulations (``rho^T``).

    Args:
        T: number of time steps (``2 T + 2`` scalar nodes).

    Returns:
        A Pyro model ``model(x=None)``; ``x`` has shape ``(*batch, T)`` and ``x[..., t]`` observes ``x_t``.
    """
    if T < 1:
        raise ValueError(f"a state-space model needs T >= 1 time steps; got {T}")

    def model(x=None):
        rho = pyro.sample("rho", dist.Uniform(torch.tensor(-0.95), torch.tensor(0.95)))
        s = pyro.sample("s", dist.LogNormal(torch.tensor(-1.0), torch.tensor(0.3)))
        z = pyro.sample("z_0", dist.Normal(torch.tensor(0.0), torch.tensor(1.0)))
        for t in range(T):
            if t > 0:
                z = pyro.sample(f"z_{t}", dist.Normal(rho * z, s))
            pyro.sample(f"x_{t}", dist.Normal(z, noise_scale), obs=None if x is None else x[..., t])

    model.__name__ = f"ar1_state_space_{T}"
    model.observed_sites = [f"x_{t}" for t in range(T)]
    return model
