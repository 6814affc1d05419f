"""Training objectives of amortised guides (DESIGN.md section 7): pure losses over simulations.

Each objective is ``loss(guide, simulator, simulations) -> scalar tensor``. What a loss needs from
the guide and the simulator is declared by :class:`AmortizedDensity` and :class:`JointDensity`, so
any object with those members can be trained (the objectives never import the guide).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol, Sequence

import torch

__all__ = [
    "AmortizedDensity",
    "JointDensity",
    "symmetrized_kl",
    "RobustSymmetrizedKL",
    "compress_log_ratio",
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


def compress_log_ratio(s: torch.Tensor, bound: float) -> torch.Tensor:
    """The identity on ``[-bound, bound]`` and ``sign(s) (bound + log1p(|s| - bound))`` outside, elementwise:
    a continuous, increasing soft clip whose gradient beyond the bound is ``1 / (1 + |s| - bound)``."""
    excess = (s.abs() - bound).clamp(min=0)
    return torch.where(excess > 0, s.sign() * (bound + torch.log1p(excess)), s)


class RobustSymmetrizedKL:
    """The default training objective ``"skl"``: the symmetrised KL of :func:`symmetrized_kl`, made robust
    to simulations and guide samples where the model's density is extreme.

    Per simulation ``(z, x) ~ p`` and guide sample ``z' ~ q(. | x)`` it forms the forward log-ratio
    ``f = log p(z, x) - log q(z | x)`` and the reverse one ``r = log q(z' | x) - log p(z', x)``; their
    sum ``s = f + r = log[p(z|x) / q(z|x)] + log[q(z'|x) / p(z'|x)]`` does not contain ``log p(x)``,
    is 0 for every sample when ``q = p``, and ``E[s] / 2`` is the symmetrised KL. The loss is
    ``0.5 * mean(compress(s))`` over the simulations whose terms are finite, with the gradient of
    ``r`` scaled by a warm-up weight ``w``:

    1. **Warm-up** (``w``): for the first ``warmup_steps`` steps only the forward term is trained
       (``w = 0``: the gradient of ``"fkl"``, which never differentiates the model's density at guide
       samples, weighted per sample by the compression below); over the next ``ramp_steps`` steps ``w``
       rises linearly to 1. The step is the guide's global step ``len(guide.history)``, so a resumed
       fit continues the same schedule. The reported value is the (compressed) estimate of the
       symmetrised KL throughout.
    2. **Soft clipping** (``compress``): ``s`` beyond ``+-b`` nats is compressed logarithmically
       (:func:`compress_log_ratio`); a sample 1e20 nats out then moves the parameters about as much
       as one a few nats out, instead of deciding the whole step. The bound ``b`` starts at
       ``log_ratio_bound`` and, once the reverse term is fully on, doubles every
       ``bound_doubling_steps`` steps (:meth:`bound_at`): the clip protects the first steps, where a
       poor guide meets extreme densities, and lets go later (with the defaults ``b`` is 640 nats
       after 1,450 steps and beyond float32's range after 31,200). *Bias*: only samples with ``|s| > b`` are affected, so it
       vanishes as ``b`` grows, also for far-tail simulations a fixed bound would keep down-weighted
       for good: on the arithmetic circuit, whose Laplace tails make such simulations dominate the
       symmetrised KL, a fixed 20-nat bound left the spline StrAF at 5.5 nats after 40 CPU-s where
       the doubling one reached 1.25 (no bound: 0.71), while on eight schools (centred) the
       doubling bound kept the fixed one's accuracy after 600 steps (0.096 sd against 0.58 with no
       bound; ``benchmarks/results/NOTES.md``, seventh session). The reported loss is the compressed
       one, so it is at most the plain estimate's size.
    3. **Masking**: a simulation whose ``f`` or ``r`` is not finite (``log p(z', x) = -inf``: a guide
       sample at the edge of a support, a scale that underflowed) is dropped from that step's mean,
       and its guide sample is detached before the model's density is evaluated again, so its
       gradient is 0 rather than NaN. *Bias*: it drops the samples with the worst reverse term;
       such samples have vanishing probability under a converged guide. A step where every
       simulation is dropped has a non-finite loss (and the training guard stops).

    Args:
        warmup_steps: steps of forward KL only (0: none).
        ramp_steps: steps over which the reverse term's weight rises from 0 to 1 after the warm-up.
        log_ratio_bound: nats beyond which ``s`` is first compressed (``None``: no compression).
        bound_doubling_steps: steps after which the bound doubles, counted from the end of the ramp
            (``None``: a fixed bound).
        mask_nonfinite: drop the simulations with a non-finite term (``False``: a non-finite loss instead).

    Attributes:
        last_stats: of the last call: ``reverse_weight``, ``log_ratio_bound`` (the bound in force),
            ``dropped`` (simulations masked), ``compressed`` (simulations beyond the bound).
    """

    __name__ = "robust_symmetrized_kl"

    def __init__(self, warmup_steps: int = 100, ramp_steps: int = 100, log_ratio_bound: float | None = 20.0,
                 mask_nonfinite: bool = True, bound_doubling_steps: int | None = 250):
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be >= 0; got {warmup_steps}, {ramp_steps}")
        if log_ratio_bound is not None and not log_ratio_bound > 0:
            raise ValueError(f"log_ratio_bound must be positive or None; got {log_ratio_bound!r}")
        if bound_doubling_steps is not None and (isinstance(bound_doubling_steps, bool) or not bound_doubling_steps > 0):
            raise ValueError(f"bound_doubling_steps must be a positive number of steps or None; got {bound_doubling_steps!r}")
        self.warmup_steps, self.ramp_steps = int(warmup_steps), int(ramp_steps)
        self.bound_doubling_steps = bound_doubling_steps
        self.log_ratio_bound, self.mask_nonfinite = log_ratio_bound, bool(mask_nonfinite)
        self.last_stats: dict = {}

    def reverse_weight(self, step: int) -> float:
        """The reverse term's weight at global step ``step``: 0 in the warm-up, then a linear ramp to 1."""
        if step < self.warmup_steps:
            return 0.0
        return 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.warmup_steps + 1) / self.ramp_steps)

    def bound_at(self, step: int) -> float | None:
        """The soft clip's bound (nats) at global step ``step``: ``log_ratio_bound`` until the ramp
        ends, then doubled every ``bound_doubling_steps`` steps (``None``: no clip)."""
        if self.log_ratio_bound is None or self.bound_doubling_steps is None:
            return self.log_ratio_bound
        doublings = max(0, step - self.warmup_steps - self.ramp_steps) / self.bound_doubling_steps
        return self.log_ratio_bound * 2.0 ** min(doublings, 1000.0)

    def __call__(self, guide: AmortizedDensity, simulator: JointDensity, sims) -> torch.Tensor:
        n, latents, observed, context = _split(guide, sims)
        step = len(getattr(guide, "history", ()))
        w, bound = self.reverse_weight(step), self.bound_at(step)
        forward = sims.log_joint - guide.log_q(latents, context, torch.Size((n,)))
        # the reverse term is always evaluated, so the value compressed is always the evidence-free
        # s = f + r; the warm-up only scales its gradient (by w), without one in the warm-up itself
        with torch.set_grad_enabled(torch.is_grad_enabled() and w > 0):
            reverse, ok = _reverse_term_masked(guide, simulator, context, observed, n, self.mask_nonfinite)
        ok = ok & torch.isfinite(forward)
        s = forward + (reverse if w == 1 else w * reverse + (1 - w) * reverse.detach())
        if self.mask_nonfinite:
            # masked before the compression: a NaN inside it would back-propagate NaN through the mask
            s = torch.where(ok, s, torch.zeros_like(s))
        compressed = 0
        if bound is not None:
            compressed = int(((s.detach().abs() > bound) & ok).sum())
            s = compress_log_ratio(s, bound)
        kept = int(ok.sum())
        if not self.mask_nonfinite or kept == n:
            loss = s.mean()
        else:
            loss = s.sum() / kept if kept else s.new_tensor(math.inf)
        self.last_stats = {"reverse_weight": w, "log_ratio_bound": bound, "dropped": n - kept, "compressed": compressed}
        return 0.5 * loss


def _reverse_term_masked(guide, simulator, context, observed, n: int, mask: bool):
    """The reverse log-ratios ``(n,)`` at one guide sample per simulation and which are finite ``(n,)``.

    With ``mask``, a step with a non-finite term evaluates the model's density again with those rows'
    samples detached: their (masked) terms then back-propagate into nothing instead of sending
    ``0 * inf = NaN`` into the flow (a density of ``-inf`` usually has an infinite derivative too).
    """
    z, log_q = guide.rsample_q(context, 1, torch.Size((n,)))
    z, log_q = {k: v.squeeze(0) for k, v in z.items()}, log_q.squeeze(0)
    reverse = log_q - simulator.log_joint({**z, **observed})
    ok = torch.isfinite(reverse)
    if mask and not bool(ok.all()):
        cut = {k: torch.where(ok.reshape((n,) + (1,) * (v.dim() - 1)), v, v.detach()) for k, v in z.items()}
        reverse = torch.where(ok, log_q, log_q.detach()) - simulator.log_joint({**cut, **observed})
    return reverse, ok


#: objective name -> loss function ``(guide, simulator, simulations) -> scalar tensor``
OBJECTIVES: dict[str, Callable] = {"skl": RobustSymmetrizedKL(), "fkl": forward_kl, "elbo": negative_elbo}

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
