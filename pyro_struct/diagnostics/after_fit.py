"""Checks run right after training, recorded in the training report (``StructuredGuide.fit(checks=...)``)."""

from __future__ import annotations

from typing import Sequence

from .checks import symmetrized_kl_estimate
from .sbc import calibration

__all__ = ["CHECKS", "run_checks"]


def _skl(guide) -> str:
    value, se = symmetrized_kl_estimate(guide, num_samples=512)
    return f"expected symmetrised KL {value:.4g} +- {se:.2g} nats (512 fresh simulations)"


def _calibration(guide) -> str:
    result = calibration(guide, num_simulations=100, num_samples=100)
    cover = result.coverage((0.5, 0.9))
    p = result.uniformity()
    return (f"SBC over 100 simulations: mean coverage of 50% / 90% intervals {float(cover[0.5].mean()):.2f} / "
            f"{float(cover[0.9].mean()):.2f}, smallest uniformity p-value {float(p.min()):.2g}")


#: check name -> function of the guide returning one line
CHECKS = {"skl": _skl, "calibration": _calibration}


def run_checks(guide, names: Sequence[str]) -> dict[str, str]:
    """Run the named checks on a trained guide; ``{name: one-line result}``.

    Args:
        guide: a trained :class:`~pyro_struct.StructuredGuide`.
        names: names from :data:`CHECKS` (``"skl"``, ``"calibration"``).
    """
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r}; use any of {sorted(CHECKS)}")
    return {name: CHECKS[name](guide) for name in names}
