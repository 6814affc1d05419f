"""Semi-amortised refinement: a few ELBO steps on a copy of the guide for the observations at hand."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from ..training import TrainingError
from ..training.loop import train
from .psis import K_THRESHOLD, model_log_joint, posterior_context, psis_smooth

__all__ = ["refine", "RefinementRecord", "elbo", "ESTIMATORS"]


@dataclass
class RefinementRecord:
    """What :func:`refine` did.

    Attributes:
        elbo_before, elbo_after: ``(*batch,)`` ELBO estimates (nats) of the amortised and the
            refined posterior; their difference is the drop of ``KL(q || p(z | x))``, since
            ``log p(x)`` is the same for both.
        num_steps, lr, num_particles: the optimisation's settings.
        seconds: wall-clock time of the optimisation.
        history: the training loss of every step (the negative ELBO summed over the batch; with
            the STL estimator its value, though not its gradient, is the same).
        kept_amortized: the refined posterior ended worse, so the amortised parameters were kept.
        ess_before, ess_after: ``(*batch,)`` importance-sampling effective sample size of
            ``num_eval_particles`` draws, as a fraction of them (1: ``q`` is the posterior).
        pareto_k_before, pareto_k_after: ``(*batch,)`` PSIS Pareto-k of those weights.
        estimator: the refinement objective (see :func:`refine`).
    """

    elbo_before: torch.Tensor
    elbo_after: torch.Tensor
    num_steps: int
    lr: float
    num_particles: int
    seconds: float
    history: list = field(default_factory=list)
    kept_amortized: bool = False
    ess_before: torch.Tensor | None = None
    ess_after: torch.Tensor | None = None
    pareto_k_before: torch.Tensor | None = None
    pareto_k_after: torch.Tensor | None = None
    estimator: str = "stl"

    @property
    def kl_reduction(self) -> torch.Tensor:
        """``(*batch,)`` estimated drop of ``KL(q || p)`` in nats (``elbo_after - elbo_before``)."""
        return self.elbo_after - self.elbo_before


def elbo(guide, context, observations, batch_shape, num_particles: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo ELBO ``E_q[log p(z, x) - log q(z | x)]`` with ``num_particles`` draws and its
    standard error, both ``(*batch,)``."""
    with torch.set_grad_enabled(grad):
        z, log_q = guide.rsample_q(context, num_particles, batch_shape)
        log_w = model_log_joint(guide, z, observations, batch_shape) - log_q
        se = log_w.detach().std(0) / math.sqrt(num_particles) if num_particles > 1 else torch.zeros_like(log_w[0])
        return log_w.mean(0), se


def _check_options(num_steps, lr, num_particles, num_eval_particles, clip_grad) -> None:
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles), ("num_eval_particles", num_eval_particles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"refine: {name} must be a positive int; got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"refine: lr must be a positive number; got {lr!r}")
    if clip_grad is not None and not (isinstance(clip_grad, (int, float)) and clip_grad > 0):
        raise ValueError(f"refine: clip_grad must be a positive number or None; got {clip_grad!r}")


class _NoData:
    """A batch source for a loss that draws its own particles: no batches, no validation."""

    validation = None
    steps_per_epoch = None

    def next_batch(self):
        return None


def _forward_kl_loss(guide, context, observations, batch_shape, num_particles: int):
    """``batch -> KL(p(z | x) || q) + const`` summed over the batch, estimated by self-normalised
    (Pareto-smoothed) importance weights of the guide's own draws: ``-sum_i w_i log q(z_i | x)``
    with ``z_i ~ q`` and ``w`` held fixed (the wake-phase update of reweighted wake-sleep,
    Bornschein & Bengio 2015). It covers the posterior's mass where the reverse KL would shrink."""
    particles = torch.Size((num_particles,)) + batch_shape

    def loss(_batch):
        with torch.no_grad():
            z, log_q = guide.rsample_q(context, num_particles, batch_shape)
            log_w, _ = psis_smooth(model_log_joint(guide, z, observations, batch_shape) - log_q)
        return -(log_w.exp() * guide.log_q(z, context, particles)).sum(0).sum()

    return loss


def _importance_scores(guide, context, observations, batch_shape, num_particles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(*batch,)`` effective sample size ``1 / sum w^2`` of ``num_particles`` raw importance weights
    (as a fraction of them) and their PSIS Pareto-k."""
    with torch.no_grad():
        z, log_q = guide.rsample_q(context, num_particles, batch_shape)
        log_w = torch.nan_to_num(model_log_joint(guide, z, observations, batch_shape) - log_q, nan=-math.inf, posinf=-math.inf)
        k = psis_smooth(log_w)[1]
        log_w = log_w - torch.logsumexp(log_w, 0)
        return 1.0 / torch.exp(2 * log_w).sum(0) / num_particles, k


def _reverse_kl_loss(guide, context, observations, batch_shape, num_particles: int, estimator: str):
    """``batch -> KL(q || p) + const`` summed over the batch (the negative ELBO), reparameterised.

    With ``"stl"`` the draws are scored under a parameter-frozen twin of the guide, synchronised
    before every evaluation, so the gradient flows through the draws only (Roeder et al. 2017).
    """
    frozen = copy.deepcopy(guide) if estimator == "stl" else None
    if frozen is not None:
        for p in frozen.parameters():
            p.requires_grad_(False)

    def loss(_batch):
        z, log_q = guide.rsample_q(context, num_particles, batch_shape)
        if frozen is not None:
            frozen.flow.load_state_dict(guide.flow.state_dict())
            log_q = frozen.log_q(z, context, torch.Size((num_particles,)) + batch_shape)
        return (log_q - model_log_joint(guide, z, observations, batch_shape)).mean(0).sum()

    return loss


#: refinement objectives: the reverse KL (two gradient estimators) or the importance-weighted forward KL
ESTIMATORS = ("stl", "reparam", "forward")


def refine(
    post,
    num_steps: int = 50,
    lr: float = 5e-3,
    num_particles: int = 64,
    num_eval_particles: int = 512,
    clip_grad: float | None = 10.0,
    estimator: str = "stl",
):
    """Semi-amortised correction of an amortised posterior for its observations.

    A deep copy of the guide starts from the amortised solution and takes ``num_steps``
    Adam steps for these observations only; a batch is refined jointly (the sum of its
    losses). The guide itself is not changed.

    Args:
        post: a :class:`~pyro_struct.Posterior`.
        num_steps: optimisation steps.
        lr: Adam's base learning rate (cosine-annealed over the steps; small: the amortised solution is close).
        num_particles: draws of ``q`` per observation and step.
        num_eval_particles: draws per observation for the ELBO and the ESS before and after.
        clip_grad: maximum gradient norm.
        estimator: the reverse KL (the negative ELBO, reparameterised) with ``"stl"`` (default),
            the "sticking the landing" gradient of Roeder et al. (2017): ``log q`` is scored with
            the parameters held fixed, which drops the score term whose noise does not vanish at
            the optimum, so a nearly exact guide is not pushed away from it; or ``"reparam"``, the
            plain reparameterised gradient. Or ``"forward"``: the forward KL ``KL(p(z | x) || q)``
            estimated with Pareto-smoothed importance weights of the guide's own draws (reweighted
            wake-sleep's wake-phase update): mass-covering, so it widens a too-narrow posterior
            where the reverse KL shrinks it further, and it makes the guide a better proposal for
            :meth:`~pyro_struct.Posterior.importance`. Use more particles (hundreds) with it.

    If the refined posterior ends worse than the amortised one (a lower ELBO for the reverse KL;
    for ``"forward"`` a higher Pareto-k where either exceeds 0.7, else a lower ESS), the amortised parameters are kept
    (``.refinement.kept_amortized``) with a warning, so refinement never makes a posterior worse.

    Returns:
        a new :class:`~pyro_struct.Posterior` of the refined copy (``.guide`` is the copy,
        specialised to these observations) with ``.refinement``, a :class:`RefinementRecord`
        holding the ELBO and the ESS before and after.
    """
    _check_options(num_steps, lr, num_particles, num_eval_particles, clip_grad)
    if estimator not in ESTIMATORS:
        raise ValueError(f"refine: estimator must be one of {ESTIMATORS}; got {estimator!r}")
    guide = copy.deepcopy(post.guide)
    context = posterior_context(post)
    context = None if context is None else context.detach()
    batch_shape, obs = torch.Size(post.batch_shape), post.observations
    if not any(p.requires_grad for p in guide.flow.parameters()):
        raise ValueError("refine: the guide's flow has no trainable parameters")

    def scores():
        return (elbo(guide, context, obs, batch_shape, num_eval_particles)[0],
                *_importance_scores(guide, context, obs, batch_shape, num_eval_particles))

    before = scores()
    initial = copy.deepcopy(guide.flow.state_dict())
    if estimator == "forward":
        loss_fn = _forward_kl_loss(guide, context, obs, batch_shape, num_particles)
    else:
        loss_fn = _reverse_kl_loss(guide, context, obs, batch_shape, num_particles, estimator)
    try:
        result = train(
            guide.flow, loss_fn, _NoData(), num_steps=num_steps, lr=lr, clip_grad=clip_grad, progress=False, desc="refine"
        )
        history, seconds = list(result), float(result.seconds)
    except TrainingError as e:
        warnings.warn(f"refine: {e}", stacklevel=2)
        guide.flow.load_state_dict(initial)
        history, seconds = [], float("nan")
    guide.eval()
    for p in guide.parameters():
        p.requires_grad_(False)
    after = scores()
    kept = _worse(before, after, estimator, lr)
    if kept:
        guide.flow.load_state_dict(initial)
        after = before
    refined = guide.posterior(dict(obs))
    refined.refinement = RefinementRecord(
        before[0].detach(), after[0].detach(), num_steps, float(lr), num_particles, seconds, history,
        kept_amortized=kept, ess_before=before[1], ess_after=after[1], pareto_k_before=before[2],
        pareto_k_after=after[2], estimator=estimator,
    )
    return refined


def _worse(before, after, estimator: str, lr: float) -> bool:
    """Whether the refined ``(elbo, ess, pareto_k)`` is worse than the amortised one by the
    estimator's own measure, totalled over the batch (its parameters are shared); warns when it is.

    The reverse KL is judged by its ELBO. A forward refinement is for importance sampling, so it
    is judged by the weights: by the worst Pareto-k where either posterior's exceeds 0.7 (a
    heavier tail is worse whatever the ESS), else by the ESS."""
    if estimator != "forward":
        what, b, a = "ELBO", float(before[0].sum()), float(after[0].sum())
    elif max(float(before[2].max()), float(after[2].max())) > K_THRESHOLD:
        what, b, a = "Pareto-k (negated)", -float(before[2].max()), -float(after[2].max())
    else:
        what, b, a = "ESS", float(before[1].sum()), float(after[1].sum())
    if not a < b:
        return False
    warnings.warn(
        f"refine: the {what} fell ({b:.3f} -> {a:.3f} over the batch), so the amortised posterior is returned "
        f"unchanged; try a smaller lr (now {lr:g}) or more particles",
        stacklevel=3,
    )
    return True
