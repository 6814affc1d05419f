"""Small Pyro models that the command-line tests load as ``tests/models_for_cli.py:NAME``."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["chain", "overlap", "chain_factory", "broken", "discrete", "NOT_A_FUNCTION"]

NOT_A_FUNCTION = 3


def chain(x=None):
    """``z1 -> z2 -> z3 -> x``: 3 edges in G; every faithful inverse has 3 edges too."""
    z1 = pyro.sample("z1", dist.Normal(torch.tensor(0.0), 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 0.5))
    z3 = pyro.sample("z3", dist.Normal(z2, 0.5))
    return pyro.sample("x", dist.Normal(z3, 0.3), obs=x)


def overlap(x=None):
    """A vector latent ``z`` (3) and an observation ``x`` (2) with ``x[i] ~ N(z[i] + z[i + 1], 0.5)``.

    Element level: G has 4 edges (``z[0], z[1] -> x[0]``, ``z[1], z[2] -> x[1]``); the faithful
    inverse has 6 (``z[0] <- z[1], x[0]``; ``z[2] <- z[1], x[1]``; ``z[1] <- x[0], x[1]``).
    """
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(z[..., :2] + z[..., 1:], 0.5).to_event(1), obs=x)


def chain_factory(length=3):
    """A factory: returns a chain model with ``length`` latents ``z0 -> ... -> x``."""

    def model(x=None):
        z = pyro.sample("z0", dist.Normal(torch.tensor(0.0), 1.0))
        for i in range(1, length):
            z = pyro.sample(f"z{i}", dist.Normal(z, 0.5))
        return pyro.sample("x", dist.Normal(z, 0.3), obs=x)

    return model


def broken(x=None):
    """A model that fails when run."""
    raise RuntimeError("this model is broken on purpose\nsecond line of the message")


def discrete(x=None):
    """A model with a discrete latent, which the tracer refuses."""
    k = pyro.sample("k", dist.Bernoulli(torch.tensor(0.5)))
    return pyro.sample("x", dist.Normal(k, 1.0), obs=x)
