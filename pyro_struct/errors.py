"""Exceptions raised when a model cannot be compiled into a structured guide."""

__all__ = ["ModelStructureError"]


class ModelStructureError(ValueError):
    """A model whose structure pyro_struct cannot trace or compile.

    The message names the offending site and says how to fix the model.
    """
