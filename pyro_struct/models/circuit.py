"""The arithmetic circuit of Weilbach et al. (2020), a small non-linear model with a barren latent."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["arithmetic_circuit", "CIRCUIT_OBSERVATION"]

#: The typical observation used by Weilbach et al. and by ``pyro-struct demo``.
CIRCUIT_OBSERVATION = {"x0": 0.3, "x1": 5.2}


def arithmetic_circuit():
    """The arithmetic circuit model (DESIGN.md section 10).

    ``z0 ~ Laplace(5, 1)``, ``z1 ~ Laplace(-2, 1)``, ``z2 ~ N(tanh(z0 + z1 - 2.8), 0.1)``,
    ``z3 ~ N(z0 * z1, 0.1)``, ``z4 ~ N(7, 2)``, ``z5 ~ N(tanh(z3 + z4), 0.1)``,
    ``x0 ~ N(z3, 0.1)``, ``x1 ~ N(z5, 0.1)``. ``z2`` is barren (no observed descendant).

    Returns:
        A Pyro model ``model(x0=None, x1=None)``; every site is scalar, and batched values
        broadcast, so the model vectorises over a particle plate.

    Example:
        >>> model = arithmetic_circuit()
        >>> sorted(pyro.poutine.trace(model).get_trace().nodes)[:3]
        ['_INPUT', '_RETURN', 'x0']
    """

    def model(x0=None, x1=None):
        z0 = pyro.sample("z0", dist.Laplace(torch.tensor(5.0), torch.tensor(1.0)))
        z1 = pyro.sample("z1", dist.Laplace(torch.tensor(-2.0), torch.tensor(1.0)))
        pyro.sample("z2", dist.Normal(torch.tanh(z0 + z1 - 2.8), 0.1))
        z3 = pyro.sample("z3", dist.Normal(z0 * z1, 0.1))
        z4 = pyro.sample("z4", dist.Normal(torch.tensor(7.0), torch.tensor(2.0)))
        z5 = pyro.sample("z5", dist.Normal(torch.tanh(z3 + z4), 0.1))
        x0 = pyro.sample("x0", dist.Normal(z3, 0.1), obs=_as_tensor(x0))
        x1 = pyro.sample("x1", dist.Normal(z5, 0.1), obs=_as_tensor(x1))
        return x0, x1

    model.__name__ = "arithmetic_circuit"
    model.observed_sites = ["x0", "x1"]
    return model


def _as_tensor(value):
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, dtype=torch.get_default_dtype())
