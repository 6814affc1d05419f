"""pyro_struct: structure-aware amortised inference for Pyro models.

Trace a Pyro model into a scalar Bayesian network, invert it faithfully, compile the
inverse into a masked conditional normalizing flow and train it as an amortised guide.
"""

import importlib

__version__ = "0.1.0"

# Public name -> defining module. Imported lazily so that `import pyro_struct` stays cheap
# (the CLI imports it before it knows which part it needs).
_EXPORTS = {
    "ModelStructureError": "errors",
    "BayesNet": "graph",
    "SiteInfo": "graph",
    "trace_model": "trace",
    "InverseStructure": "inversion",
    "faithful_inverse": "inversion",
    "inverse_structure": "inversion",
    "factorize": "masks",
    "count_paths": "masks",
    "MaskedLinear": "nn",
    "StrNN": "nn",
    "compile_model": "compile",
    "CompiledModel": "compile",
    "StructuredGuide": "guide",
    "Posterior": "guide",
    "amortize": "guide",
    "AmortizedModel": "guide",
    "TrainingError": "training",
    "FitResult": "training",
    "CompiledStructure": "inspect",
    "calibration": "diagnostics",
    "CalibrationResult": "diagnostics",
    "ImportanceResult": "diagnostics",
    "RefinementRecord": "diagnostics",
    "PriorPredictiveNote": "diagnostics",
    "prior_predictive_check": "diagnostics",
    "DensityFlow": "density",
    "CausalFlow": "density",
    "learn_structure": "structure_learning",
    "StructuredDecoder": "decoders",
}

__all__ = sorted(_EXPORTS) + ["diagnostics", "evaluate", "flows", "models"]


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    if name in ("diagnostics", "evaluate", "flows", "models"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pyro_struct' has no attribute {name!r}")


def __dir__():
    return __all__
