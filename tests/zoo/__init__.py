"""A zoo of ordinary Pyro models with fixed observations, checked against NUTS reference moments (issue #14).

Each :class:`ZooModel` holds a model written the way Pyro users write them, the arguments it is
traced with, one fixed observed data set and the latent sites. ``tests/zoo/references.py`` computes
NUTS moments of every scalar latent coordinate at that observation (``references.json``);
``benchmarks/zoo.py`` and ``tests/test_zoo.py`` compare the default ``fit`` against them.
"""

from __future__ import annotations

from .models import MODELS, get
from .registry import ZooModel, coordinate_names, flatten_latents

__all__ = ["MODELS", "ZooModel", "coordinate_names", "flatten_latents", "get"]
