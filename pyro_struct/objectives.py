"""Training objectives of amortised guides (DESIGN.md section 7): pure losses over simulations.

Each objective is ``loss(guide, simulator, simulations) -> scalar tensor``. What a loss needs from
the guide and the simulator is declared by :class:`AmortizedDensity` and :class:`JointDensity`, so
any object with those members can be trained (the objectives never import the guide).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import torch

__all__ = [
    "AmortizedDensity",
    "JointDensity",
    "symmetrized_kl",
    "forward_kl",
    "negative_elbo",
    "OBJECTIVES",
    "get_objective",
]


class AmortizedDensity(Protocol):
    """What an objective needs from a guide ``q(z | x)``."""

    latent_sites: Sequence[str]
    observed_sites: Sequence[str]

    def condition(self, observations: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Size]:
        """The flow's context ``(*batch, c)`` (or None) and the batch shape of observations ``(*batch, *shape)``."""

    def log_q(self, latents: Mapping[str, torch.Tensor], context, batch_shape: torch.Size) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents ``(*batch, *shape)``."""

    def rsample_q(self, context, n: int, batch_shape: torch.Size) -> tuple[dict, torch.Tensor]:
        """Reparameterised ``(n, *batch, *shape)`` samples and their ``log q`` ``(n, *batch)``."""


class JointDensity(Protocol):
    """What an objective needs from a simulator: the model's joint density."""

    def log_joint(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log p(z, x)`` ``(n,)`` of site values ``(n, *shape)``."""


def _split(guide: AmortizedDensity, sims):
    n = sims.num
    latents = {name: sims[name] for name in guide.latent_sites}
    observed = {name: sims[name] for name in guide.observed_sites}
    context, _ = guide.condition(observed)
    return n, latents, observed, context


def _reverse_term(guide: AmortizedDensity, simulator: JointDensity, context, observed, n: int) -> torch.Tensor:
    """``log q(z|x) - log p(z, x)`` ``(n,)`` at one reparameterised guide sample per simulated ``x``."""
    z, log_q = guide.rsample_q(context, 1, torch.Size((n,)))
    z = {k: v.squeeze(0) for k, v in z.items()}
    return log_q.squeeze(0) - simulator.log_joint({**z, **observed})


def forward_kl(guide: AmortizedDensity, simulator: JointDensity, sims) -> torch.Tensor:
    """Forward KL objective: ``E_{p(z,x)}[-log q(z|x)]`` (the expected negative log-likelihood of
    the simulated latents, in nats); needs no model density. Equals ``E_x KL(p(z|x) || q(z|x))``
    up to the constant ``E[log p(z|x)]``."""
    n, latents, _, context = _split(guide, sims)
    return -guide.log_q(latents, context, torch.Size((n,))).mean()


def negative_elbo(guide: AmortizedDensity, simulator: JointDensity, sims) -> torch.Tensor:
    """Amortised reverse KL: ``E_x E_{q(z|x)}[log q(z|x) - log p(z, x)]`` on simulated ``x`` (the
    negative ELBO averaged over simulated data sets), with reparameterised ``z ~ q``."""
    n, _, observed, context = _split(guide, sims)
    return _reverse_term(guide, simulator, context, observed, n).mean()


def symmetrized_kl(guide: AmortizedDensity, simulator: JointDensity, sims) -> torch.Tensor:
    """Symmetrised KL (Weilbach et al. 2020), in nats:
    ``0.5 * (E_{p(z,x)}[log p(z,x) - log q(z|x)] + E_{x, q(z|x)}[log q(z|x) - log p(z,x)])``.

    Both terms use the same simulated ``x``, so ``log p(x)`` cancels and the value is an
    unbiased estimate of ``E_x[0.5 (KL(p||q) + KL(q||p))]``: zero at the exact posterior.
    """
    n, latents, observed, context = _split(guide, sims)
    forward_term = sims.log_joint - guide.log_q(latents, context, torch.Size((n,)))
    reverse_term = _reverse_term(guide, simulator, context, observed, n)
    return 0.5 * (forward_term.mean() + reverse_term.mean())


#: objective name -> loss function ``(guide, simulator, simulations) -> scalar tensor``
OBJECTIVES: dict[str, Callable] = {"skl": symmetrized_kl, "fkl": forward_kl, "elbo": negative_elbo}

#: objectives that evaluate the model's density at guide samples (they need ``simulator.log_joint``)
REVERSE_OBJECTIVES = ("skl", "elbo")


def get_objective(objective: str | Callable) -> Callable:
    """The loss function for an objective name (``"skl"``, ``"fkl"``, ``"elbo"``) or a callable
    with the same signature."""
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective]
