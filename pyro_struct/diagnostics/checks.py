"""Cheap checks shared by the API and the command line: prior-predictive range, untrained guides, the symmetrised-KL estimate."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

# torch is imported inside the functions: the command line imports this module before it has
# set torch's thread count (which torch reads when it is first imported)

__all__ = ["prior_predictive_check", "PriorPredictiveNote", "symmetrized_kl_estimate", "warn_if_untrained"]


def warn_if_untrained(guide, what: str) -> bool:
    """Warn (and return ``True``) when ``guide.history`` is empty, i.e. the guide was never trained."""
    if len(getattr(guide, "history", ()) or ()) == 0:
        warnings.warn(
            f"{what}: the guide was never trained (guide.history is empty), so its posterior is the "
            "standardised prior; call guide.fit(...) first for a meaningful diagnosis",
            stacklevel=3,
        )
        return True
    return False


@dataclass
class PriorPredictiveNote:
    """One observed coordinate outside the central prior-predictive range.

    Attributes:
        site: observed site name.
        coordinate: the scalar coordinate's label (``"x"`` or ``"x[2]"``).
        observation: index of the observation in the batch (``()`` for one data set).
        value: the observed value.
        low, high: the central ``level`` range of the prior-predictive simulations.
        level: that range's probability.
        distance_sd: how far outside the range, in prior-predictive standard deviations.
        num_simulations: simulations the range was estimated from.
    """

    site: str
    coordinate: str
    observation: tuple
    value: float
    low: float
    high: float
    level: float
    distance_sd: float
    num_simulations: int

    def __str__(self) -> str:
        where = f" (observation {self.observation})" if self.observation else ""
        return (
            f"{self.coordinate}={self.value:g}{where} lies {self.distance_sd:.1f} prior-predictive sd outside the "
            f"{100 * self.level:g}% range [{self.low:.3g}, {self.high:.3g}] of {self.num_simulations} prior "
            "simulations: the amortised posterior extrapolates there"
        )


def prior_predictive_check(
    guide, observations: Mapping, num_simulations: int = 4096, level: float = 0.999
) -> list[PriorPredictiveNote]:
    """Observed coordinates outside the central ``level`` range of the prior predictive.

    An amortised guide is trained on simulated observations; far outside their range its
    answer is an extrapolation, which the user should know about.

    Args:
        guide: a :class:`~pyro_struct.StructuredGuide`.
        observations: observed site -> ``(*batch, *site_shape)`` (a batch is checked per observation).
        num_simulations: prior-predictive simulations.
        level: probability of the central range (default 0.999).

    Returns:
        one :class:`PriorPredictiveNote` per coordinate (and observation) outside the range;
        empty when every value is inside.
    """
    import torch

    from ..graph import node_label

    if not isinstance(num_simulations, int) or num_simulations < 10:
        raise ValueError(f"prior_predictive_check: num_simulations must be an int >= 10; got {num_simulations!r}")
    if not 0 < level < 1:
        raise ValueError(f"prior_predictive_check: level must be in (0, 1); got {level!r}")
    unknown = sorted(set(observations) - set(guide.observed_sites))
    if unknown:
        raise ValueError(f"prior_predictive_check: {unknown[0]!r} is not an observed site; observed sites are {guide.observed_sites}")
    sims = guide.simulator().simulate(num_simulations)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    notes = []
    for site, value in observations.items():
        shape = tuple(int(s) for s in guide.site_shapes[site])
        size = math.prod(shape)
        flat = sims[site].reshape(num_simulations, size).to(torch.float64)
        lo, hi = torch.quantile(flat, torch.tensor([lo_q, hi_q], dtype=torch.float64), dim=0)
        sd = flat.std(0).clamp_min(1e-12)
        v = torch.as_tensor(value, dtype=torch.float64)
        batch = tuple(v.shape[: v.dim() - len(shape)])
        v = v.reshape(-1, size)
        labels = [node_label(site, idx, shape) for idx in _grid(shape)]
        for b, obs_index in enumerate(_grid(batch)):
            for k, label in enumerate(labels):
                x = float(v[b, k])
                if lo[k] <= x <= hi[k]:
                    continue
                gap = float(lo[k]) - x if x < lo[k] else x - float(hi[k])
                distance = gap / float(sd[k]) if math.isfinite(x) else math.inf
                notes.append(PriorPredictiveNote(site, label, obs_index, x, float(lo[k]), float(hi[k]), level, distance, num_simulations))
    return notes


def _grid(shape: tuple) -> list[tuple]:
    import itertools

    return list(itertools.product(*(range(int(s)) for s in shape)))


def symmetrized_kl_estimate(guide, num_samples: int = 512, num_batches: int = 8) -> tuple[float, float]:
    """Monte Carlo estimate of the expected symmetrised KL between ``p(z | x)`` and the guide.

    ``0.5 (E_{p(z,x)}[log p(z,x) - log q(z|x)] + E_{p(x) q(z|x)}[log q(z|x) - log p(z,x)])``
    in nats (``log p(x)`` cancels), on ``num_samples`` fresh simulations split into
    ``num_batches`` batches (the training objective, evaluated without gradients).

    Returns:
        ``(estimate, standard error over the batches)``.
    """
    import torch

    from ..objectives import symmetrized_kl

    simulator = guide.simulator()
    num_batches = max(1, min(num_batches, num_samples))
    per_batch = max(1, num_samples // num_batches)
    values = []
    with torch.no_grad():
        for _ in range(num_batches):
            values.append(float(symmetrized_kl(guide, simulator, simulator.simulate(per_batch))))
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if len(finite) == 0:
        return float("nan"), float("nan")
    se = float(finite.std() / math.sqrt(len(finite))) if len(finite) > 1 else float("nan")
    return float(finite.mean()), se
