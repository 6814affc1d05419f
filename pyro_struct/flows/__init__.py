"""Conditional normalizing flows whose dependencies follow a compiled adjacency.

``ConditionalFlow`` is the shared interface; ``StrAF`` (structured autoregressive flow),
``GraphicalResidualFlow`` and ``StructuredCNF`` implement it. The flow classes are imported
lazily, so ``import pyro_struct.flows`` stays cheap and one family's module is only loaded
when it is used.

Example:
    >>> import torch
    >>> from pyro_struct.flows import StrAF
    >>> flow = StrAF(torch.tensor([[False, False], [True, False]]))
    >>> flow.sample(n=4).shape
    torch.Size([4, 2])
"""

import importlib

from .base import ConditionalFlow, check_adjacency, transitive_closure

# public name -> submodule defining it
_LAZY = {
    "StrAF": "straf",
    "GraphicalResidualFlow": "grf",
    "StructuredCNF": "cnf",
}

__all__ = ["ConditionalFlow", "check_adjacency", "transitive_closure"] + sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
