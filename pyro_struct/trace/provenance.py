"""Site-level provenance of the tensors a model computes (a torch function mode, no tensor subclass)."""

from __future__ import annotations

import types

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ProvenanceMode", "object_bits", "positions"]

# Tensor methods that turn tensor values into Python values: anything computed from such a
# value (control flow, indices, Python floats) escapes both provenance and autograd.
_ESCAPE_NAMES = frozenset(
    {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__",
     "__array__", "equal", "allclose", "is_nonzero"}
)
# Ops with a gradient graph but a zero derivative almost everywhere: dependencies through
# them are invisible to gradients.
_ZERO_GRAD_NAMES = frozenset({"round", "floor", "ceil", "trunc", "fix", "sign", "sgn", "heaviside"})
# Ops whose output shape depends on tensor values (dynamic shapes without a Python escape).
_DATA_SHAPE_NAMES = frozenset(
    {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
     "repeat_interleave", "histc", "nonzero_static"}
)


class ProvenanceMode(TorchFunctionMode):
    """Site-level provenance of every tensor computed while the model runs.

    Provenance is a bit mask over site positions (bit ``i``: the ``i``-th recorded site). Each
    torch call's outputs get the union of its tensor inputs' provenance, as
    ``pyro.ops.provenance`` does, but with a mode instead of a tensor subclass, which is
    several times cheaper per op. Conversions of tagged tensors to Python values (``item``,
    ``bool``, ...) are collected in :attr:`taint`: every later site may depend on them
    through control flow.
    """

    def __init__(self):
        super().__init__()
        # id -> (tensor, bits, non-differentiable bits); the tensor is held so that its id
        # cannot be reused while tracing. The second mask holds the sites that reach the tensor
        # through at least one op that gradients cannot see through.
        self.tags: dict[int, tuple[torch.Tensor, int, int]] = {}
        self.taint = 0
        self.value_dependent_shapes = False  # a tagged tensor went through a data-shaped op

    def tag(self, t: torch.Tensor, bits: int) -> None:
        self.tags[id(t)] = (t, bits, 0)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", None)
        escape = name in _ESCAPE_NAMES
        is_tensor = isinstance(out, torch.Tensor)
        if not (escape or is_tensor or out is None or type(out) is list or type(out) is tuple):
            return out  # shapes, dtypes, flags: nothing to tag
        tags = self.tags
        bits = nd = 0
        grad_in = False  # a tagged input is on the gradient graph
        for group in (args, kwargs.values()):
            for a in group:
                if type(a) is list or type(a) is tuple:
                    for b in a:
                        e = tags.get(id(b))
                        if e is not None:
                            bits |= e[1]
                            nd |= e[2]
                            grad_in = grad_in or b.requires_grad
                else:
                    e = tags.get(id(a))
                    if e is not None:
                        bits |= e[1]
                        nd |= e[2]
                        grad_in = grad_in or a.requires_grad
        if not bits:
            return out
        if escape:
            self.taint |= bits
            return out
        if name in _DATA_SHAPE_NAMES or (name == "__getitem__" and _has_mask_index(args)):
            self.value_dependent_shapes = True
        if is_tensor or out is None:
            # out is None: __setitem__ and friends write into their first argument
            target = out if is_tensor else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if target is not None:
                # the path leaves the gradient graph (comparisons, casts, detach, no_grad) or
                # has a zero derivative (rounding): gradients cannot see this dependency
                cut = name.rstrip("_") in _ZERO_GRAD_NAMES if name else False
                cut = cut or (grad_in and not target.requires_grad and torch.is_grad_enabled())
                tags[id(target)] = (target, bits, bits if cut else nd)
            return out
        # several outputs: which input feeds which is unknown, so cut only if all are cut
        outs = [b for b in out if isinstance(b, torch.Tensor)]
        cut = name.rstrip("_") in _ZERO_GRAD_NAMES if name else False
        cut = cut or (grad_in and torch.is_grad_enabled() and not any(b.requires_grad for b in outs))
        for b in outs:
            tags[id(b)] = (b, bits, bits if cut else nd)
        return out


def _has_mask_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in parts)


_ATOMS = (str, bytes, int, float, bool, complex, torch.Size, type(None), torch.dtype, torch.device)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def object_bits(obj, mode: ProvenanceMode, depth: int = 0, seen: set | None = None) -> tuple[int, int]:
    """Union of the provenance (all, non-differentiable) of every tensor reachable from a
    distribution's attributes."""
    tags = mode.tags
    if isinstance(obj, torch.Tensor):
        entry = tags.get(id(obj))
        return (0, 0) if entry is None else (entry[1], entry[2])
    if depth > 8 or isinstance(obj, _ATOMS) or isinstance(obj, _OPAQUE):
        return 0, 0
    if seen is None:
        seen = set()
    if id(obj) in seen:
        return 0, 0
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return 0, 0
    bits = nd = 0
    for x in children:
        if isinstance(x, torch.Tensor):
            entry = tags.get(id(x))
            if entry is not None:
                bits |= entry[1]
                nd |= entry[2]
        elif not isinstance(x, _ATOMS):
            b, n = object_bits(x, mode, depth + 1, seen)
            bits |= b
            nd |= n
    return bits, nd



def positions(bits: int) -> list[int]:
    """The set bit positions of ``bits``, lowest first."""
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out
