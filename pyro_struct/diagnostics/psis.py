"""Importance weighting of an amortised posterior against the model's joint density, with PSIS Pareto-k diagnostics."""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

from .checks import warn_if_untrained

__all__ = ["importance", "ImportanceResult", "pareto_k", "psis_smooth", "model_log_joint", "K_THRESHOLD"]

#: Pareto-k above which importance-sampling estimates are unreliable (Vehtari et al. 2024, section 3)
K_THRESHOLD = 0.7
#: samples x observations handed to the model's log density at once (memory, not accuracy)
_MAX_ROWS = 1 << 16


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def posterior_context(post):
    """The flow context of a :class:`~pyro_struct.Posterior` (``.context``; ``._context`` in older versions)."""
    return post.context if hasattr(post, "context") else post._context


def model_log_joint(guide, latents: Mapping[str, torch.Tensor], observations: Mapping[str, torch.Tensor], batch_shape) -> torch.Tensor:
    """``log p(z, x)`` of the guide's model for posterior samples.

    The samples and the batch of observations are flattened into the simulator's one leading
    dimension, so the model runs once (vectorised over its particle plate when it can be).

    Args:
        guide: a :class:`~pyro_struct.StructuredGuide` (its ``simulator()`` evaluates the model).
        latents: every latent site -> ``(n, *batch, *site_shape)``.
        observations: every observed site -> ``(*batch, *site_shape)`` (broadcast over ``n``).
        batch_shape: ``batch``.

    Returns:
        ``(n, *batch)``; differentiable in ``latents``.
    """
    batch_shape = torch.Size(batch_shape)
    n = next(iter(latents.values())).shape[0]
    rows = n * _numel(batch_shape)
    values = {}
    for site in guide.latent_sites:
        shape = tuple(guide.site_shapes[site])
        values[site] = latents[site].reshape((rows,) + shape)
    ref = next(iter(latents.values()))
    for site in guide.observed_sites:
        shape = tuple(guide.site_shapes[site])
        x = torch.as_tensor(observations[site], dtype=ref.dtype, device=ref.device)
        values[site] = x.expand((n,) + batch_shape + shape).reshape((rows,) + shape)
    return guide.simulator().log_joint(values).reshape((n,) + batch_shape)


# ------------------------------------------------------------------------------------ PSIS
def _gpd_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Pareto fit to exceedances ``x`` ``(B, M)`` (ascending, non-negative) per row.

    The empirical-Bayes estimator of Zhang & Stephens (2009) with the weakly informative
    prior of PSIS (Vehtari et al. 2024, appendix): the shape estimate is shrunk towards 0.5
    as if by 10 pseudo-observations. Returns the shape ``k`` and scale ``sigma``, both ``(B,)``.
    """
    _, M = x.shape
    m = 30 + int(math.sqrt(M))
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    x_max = x[:, -1:]
    quartile = x[:, int(M / 4 + 0.5) - 1].unsqueeze(-1)
    # tied small weights would make the first-quartile scale zero; the largest is then the only scale left
    quartile = torch.where(quartile > 0, quartile, x_max)
    # the grid of b = -k / sigma candidates; every one is below 1 / x_max, so log1p(-b x) is finite
    b = 1 / x_max + (1 - torch.sqrt(m / (j - 0.5))) / (3 * quartile)
    k = torch.log1p(-b.unsqueeze(-1) * x.unsqueeze(1)).mean(-1)
    profile = M * (torch.log(-b / k) - k - 1)
    weights = torch.softmax(profile, -1)
    b_post = (b * weights).sum(-1)
    k_post = torch.log1p(-b_post.unsqueeze(-1) * x).mean(-1)
    sigma = -k_post / b_post
    k_post = (M * k_post + 10 * 0.5) / (M + 10)
    return k_post, sigma


def _gpd_quantile(p: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Quantiles ``(B, M)`` of generalised Pareto distributions ``(k, sigma)`` ``(B,)`` at ``p`` ``(M,)``."""
    k, sigma = k.unsqueeze(-1), sigma.unsqueeze(-1)
    small = k.abs() < 1e-10
    safe_k = torch.where(small, torch.ones_like(k), k)
    general = sigma * torch.expm1(-safe_k * torch.log1p(-p)) / safe_k
    return torch.where(small, -sigma * torch.log1p(-p), general)


def psis_smooth(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto-smoothed importance sampling (Vehtari et al. 2024) along dimension 0.

    The ``M = ceil(min(S / 5, 3 sqrt(S)))`` largest of ``S`` weights are replaced by the
    expected order statistics of a generalised Pareto distribution fitted to them.

    Args:
        log_weights: ``(S, *batch)`` unnormalised log importance weights.

    Returns:
        smoothed log weights ``(S, *batch)``, normalised over dimension 0, and the fitted
        Pareto shape ``k`` ``(*batch,)``: ``nan`` with fewer than 25 samples (a tail of under
        five weights), ``-inf`` where the largest weights are all equal (a bounded tail).
    """
    S, batch = log_weights.shape[0], log_weights.shape[1:]
    lw = log_weights.detach().to(torch.float64).reshape(S, -1)
    lw = torch.nan_to_num(lw, nan=-math.inf, posinf=-math.inf)
    lw = lw - lw.max(0).values.clamp_min(torch.finfo(torch.float64).min)
    M = math.ceil(min(0.2 * S, 3 * math.sqrt(S)))
    k = torch.full((lw.shape[1],), math.nan, dtype=torch.float64)
    if M >= 5 and M < S:
        ordered, idx = lw.sort(0)
        cutoff = ordered[-M - 1]
        tail = ordered[-M:]
        x = (tail.exp() - cutoff.exp()).T.clamp_min(0)
        fit_rows = x[:, -1] > 0
        k = torch.where(fit_rows, k, torch.full_like(k, -math.inf))
        if fit_rows.any():
            k_fit, sigma = _gpd_fit(x[fit_rows])
            p = (torch.arange(M, dtype=torch.float64) + 0.5) / M
            smooth = torch.log(_gpd_quantile(p, k_fit, sigma) + cutoff[fit_rows].exp().unsqueeze(-1)).clamp_max(0)
            good = torch.isfinite(k_fit).unsqueeze(-1) & torch.isfinite(smooth)
            new_tail = tail.T.clone()
            new_tail[fit_rows] = torch.where(good, smooth, tail.T[fit_rows])
            k[fit_rows] = k_fit
            lw = lw.scatter(0, idx[-M:], new_tail.T)
    lw = lw - torch.logsumexp(lw, 0)
    return lw.reshape((S,) + batch).to(log_weights.dtype), k.reshape(batch)


def pareto_k(log_weights: torch.Tensor) -> torch.Tensor:
    """PSIS Pareto shape ``k`` ``(*batch,)`` of log importance weights ``(S, *batch)``.

    Below 0.7 importance-weighted estimates are reliable with ``S`` in the hundreds;
    above 0.7 the weights' variance is effectively infinite (Vehtari et al. 2024).
    """
    return psis_smooth(log_weights)[1]


# ------------------------------------------------------------------------------ the result
class ImportanceResult:
    """Samples of ``q(z | x)`` weighted by ``p(z, x) / q(z | x)``, per observation.

    Attributes:
        samples: site -> ``(S, *batch, *site_shape)`` draws of the guide.
        log_q, log_p: ``(S, *batch)`` ``log q(z | x)`` and ``log p(z, x)`` of the draws.
        log_weights: ``(S, *batch)`` self-normalised log weights (``logsumexp`` over ``S`` is 0).
        smoothed_log_weights: the same after Pareto smoothing (used by :meth:`resample`).
        ess: ``(*batch,)`` effective sample size ``1 / sum w^2`` of the normalised weights.
        pareto_k: ``(*batch,)`` PSIS shape; above 0.7 the weights cannot be trusted.
        log_evidence: ``(*batch,)`` ``log mean exp`` of the raw weights, an estimate of ``log p(x)``
            (a lower bound in expectation).
        batch_shape: leading batch shape of the observations.
    """

    def __init__(self, samples, log_q, log_p, batch_shape):
        self.samples = samples
        self.log_q = log_q
        self.log_p = log_p
        self.batch_shape = torch.Size(batch_shape)
        raw = torch.nan_to_num(log_p - log_q, nan=-math.inf, posinf=-math.inf)
        self.num_samples = int(raw.shape[0])
        total = torch.logsumexp(raw, 0)
        self.log_evidence = total - math.log(self.num_samples)
        self.log_weights = raw - total
        self.ess = 1.0 / torch.exp(2 * self.log_weights).sum(0)
        self.smoothed_log_weights, k = psis_smooth(raw)
        self.pareto_k = k.to(raw.dtype)

    @property
    def reliable(self) -> torch.Tensor:
        """``(*batch,)`` bool: ``pareto_k <= 0.7``."""
        return self.pareto_k <= K_THRESHOLD

    def resample(self, n: int, smoothed: bool = True) -> dict[str, torch.Tensor]:
        """Importance resampling: ``n`` draws per observation, with replacement, proportional to the
        (Pareto-smoothed, by default) weights.

        Returns:
            site -> ``(n, *batch, *site_shape)``, shaped like ``Posterior.sample(n)``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"resample: n must be a positive int; got {n!r}")
        lw = self.smoothed_log_weights if smoothed else self.log_weights
        S, B = self.num_samples, _numel(self.batch_shape)
        probs = torch.exp(lw.to(torch.float64)).reshape(S, B).T
        index = torch.multinomial(probs, n, replacement=True).T  # (n, B)
        columns = torch.arange(B).expand(n, B)
        out = {}
        for site, v in self.samples.items():
            flat = v.reshape((S, B) + v.shape[1 + len(self.batch_shape):])
            out[site] = flat[index, columns].reshape((n,) + tuple(v.shape[1:]))
        return out

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """Self-normalised (Pareto-smoothed) importance estimate of the posterior mean:
        site -> ``(*batch, *site_shape)``, like :attr:`Posterior.mean`."""
        lw = self.smoothed_log_weights
        out = {}
        for site, v in self.samples.items():
            w = torch.exp(lw).reshape(lw.shape + (1,) * (v.dim() - lw.dim())).to(v.dtype)
            out[site] = (w * v).sum(0)
        return out

    def summary(self) -> str:
        """One line per observation: Pareto-k, ESS and the log-evidence estimate."""
        lines = []
        k, ess, le = self.pareto_k.reshape(-1), self.ess.reshape(-1), self.log_evidence.reshape(-1)
        for i, idx in enumerate(_indices(self.batch_shape)):
            flag = "" if not float(k[i]) > K_THRESHOLD else "  <- unreliable: refine or train longer"
            where = "observation" if not idx else f"observation {idx}"
            lines.append(
                f"{where}: pareto_k={float(k[i]):.2f} ess={float(ess[i]):.1f}/{self.num_samples} "
                f"log_evidence={float(le[i]):.3f}{flag}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ImportanceResult(num_samples={self.num_samples}, batch_shape={tuple(self.batch_shape)}, "
            f"max pareto_k={float(self.pareto_k.max()):.2f}, min ess={float(self.ess.min()):.1f})"
        )


def _indices(batch_shape) -> list[tuple]:
    if len(batch_shape) == 0:
        return [()]
    grid = torch.cartesian_prod(*[torch.arange(int(s)) for s in batch_shape]).reshape(-1, len(batch_shape))
    return [tuple(r) for r in grid.tolist()]


def importance(post, num_samples: int = 1000, warn: bool = True) -> ImportanceResult:
    """Weight ``num_samples`` draws of the amortised posterior by ``p(z, x) / q(z | x)``.

    The guide knows the model's joint density, so its draws can be corrected exactly:
    the weighted draws estimate expectations under the true posterior, their mean weight
    estimates the evidence ``p(x)``, and the Pareto-k of the weights' tail says whether
    either can be trusted for this observation.

    Args:
        post: a :class:`~pyro_struct.Posterior` (one observation or a batch).
        num_samples: draws per observation (hundreds at least for a stable Pareto-k).
        warn: warn when ``pareto_k > 0.7`` for any observation.

    Returns:
        an :class:`ImportanceResult` with per-observation ``(*batch,)`` diagnostics.

    Example:
        >>> w = guide.posterior(x=x).importance(1000)          # doctest: +SKIP
        >>> w.pareto_k, w.ess, w.log_evidence                  # doctest: +SKIP
        >>> w.resample(500)["z"].shape                         # doctest: +SKIP
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"importance: num_samples must be a positive int (hundreds for a stable Pareto-k); got {num_samples!r}")
    guide = post.guide
    warn_if_untrained(guide, "importance")
    batch_shape = torch.Size(post.batch_shape)
    chunk = max(1, _MAX_ROWS // max(1, _numel(batch_shape)))
    parts, log_qs, log_ps = [], [], []
    with torch.no_grad():
        done = 0
        while done < num_samples:
            m = min(chunk, num_samples - done)
            z, log_q = post.sample_and_log_prob(m)
            parts.append(z)
            log_qs.append(log_q)
            log_ps.append(model_log_joint(guide, z, post.observations, batch_shape))
            done += m
    samples = {site: torch.cat([p[site] for p in parts]) for site in parts[0]}
    result = ImportanceResult(samples, torch.cat(log_qs), torch.cat(log_ps), batch_shape)
    if warn:
        _warn_high_k(result)
    return result


def _warn_high_k(result: ImportanceResult) -> None:
    k = result.pareto_k.reshape(-1)
    bad = [(idx, float(k[i])) for i, idx in enumerate(_indices(result.batch_shape)) if float(k[i]) > K_THRESHOLD]
    if not bad:
        return
    shown = ", ".join(f"{'observation ' + str(idx) if idx else 'the observation'} (k={v:.2f})" for idx, v in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(
        f"importance: Pareto k > {K_THRESHOLD} for {shown}{more}: q(z | x) misses posterior mass there, so "
        "importance-weighted estimates (and the log-evidence) are unreliable; correct the posterior with "
        "post.refine(num_steps=50) or train the guide longer",
        stacklevel=3,
    )
