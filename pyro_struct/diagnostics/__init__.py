"""Can I trust this posterior? Importance weighting with Pareto-k, simulation-based calibration,
per-observation refinement and prior-predictive checks of amortised guides.

- :func:`importance` (``post.importance(n)``): self-normalised weights ``p(z, x) / q(z | x)``,
  their effective sample size, PSIS Pareto-k, a log-evidence estimate and resampling.
- :func:`refine` (``post.refine(num_steps)``): a few ELBO steps on a copy of the flow for these
  observations (semi-amortised inference); the guide is left unchanged.
- :func:`calibration`: simulation-based calibration (ranks, coverage, uniformity tests, plots),
  summarised per site and per depth level of the inverse.
- :func:`prior_predictive_check`: observed coordinates outside the prior-predictive range.
"""

import importlib

# name -> submodule; imported lazily so that the command line can import this package (and
# `checks`) before torch is configured. The submodules are not named after the functions
# (importance, calibration, refine): importing a submodule binds its name on the package, which
# would shadow the function of the same name.
_EXPORTS = {
    "importance": "psis",
    "ImportanceResult": "psis",
    "pareto_k": "psis",
    "psis_smooth": "psis",
    "model_log_joint": "psis",
    "calibration": "sbc",
    "CalibrationResult": "sbc",
    "refine": "refinement",
    "RefinementRecord": "refinement",
    "prior_predictive_check": "checks",
    "PriorPredictiveNote": "checks",
    "symmetrized_kl_estimate": "checks",
    "warn_if_untrained": "checks",
    "run_checks": "after_fit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
