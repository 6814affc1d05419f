"""A Gaussian hidden Markov model written with a Python loop of scalar sites."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["hmm", "hmm_posterior"]


def hmm(T: int, transition: float = 0.9, process_scale: float = 0.5, noise_scale: float = 0.5):
    """An HMM ``z_t ~ N(a z_{t-1}, s)``, ``x_t ~ N(z_t, r)`` with sites ``z_0..z_{T-1}``, ``x_0..x_{T-1}``.

    Args:
        T: number of time steps (``2 T`` scalar nodes).

    Returns:
        A Pyro model ``model(x=None)``; ``x`` has shape ``(*batch, T)`` and ``x[..., t]``
        observes site ``x_t``.
    """
    if T < 1:
        raise ValueError(f"an HMM needs T >= 1 time steps; got {T}")

    def model(x=None):
        z = pyro.sample("z_0", dist.Normal(torch.tensor(0.0), torch.tensor(1.0)))
        for t in range(T):
            if t > 0:
                z = pyro.sample(f"z_{t}", dist.Normal(transition * z, process_scale))
            pyro.sample(f"x_{t}", dist.Normal(z, noise_scale), obs=None if x is None else x[..., t])

    model.__name__ = f"hmm_{T}"
    model.observed_sites = [f"x_{t}" for t in range(T)]
    return model


def hmm_posterior(x: torch.Tensor, transition: float = 0.9, process_scale: float = 0.5, noise_scale: float = 0.5):
    """The exact posterior of ``z_0..z_{T-1}`` given ``x`` ``(T,)`` of :func:`hmm` (linear-Gaussian: from the joint precision).

    Returns:
        a float64 ``MultivariateNormal`` over ``(T,)``.
    """
    T = x.shape[-1]
    a, s2, r2 = transition, process_scale**2, noise_scale**2
    P = torch.eye(T, dtype=torch.float64) / r2
    P[0, 0] += 1.0
    idx = torch.arange(1, T)
    P[idx, idx] += 1 / s2
    P[idx - 1, idx - 1] += a**2 / s2
    P[idx, idx - 1] -= a / s2
    P[idx - 1, idx] -= a / s2
    cov = torch.linalg.inv(P)
    return torch.distributions.MultivariateNormal(cov @ (x.double() / r2), covariance_matrix=0.5 * (cov + cov.T))
