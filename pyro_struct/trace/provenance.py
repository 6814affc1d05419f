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
# Ops whose values depend on no input's values, only on shapes, dtypes and devices.
_VALUE_FREE_NAMES = frozenset(
    {"zeros_like", "ones_like", "empty_like", "rand_like", "randn_like", "randint_like",
     "new_zeros", "new_ones", "new_empty"}
)
# Methods whose values depend on ``self`` alone; other tensor arguments give a shape or dtype.
_SELF_ONLY_NAMES = frozenset({"to", "type_as", "expand_as", "view_as", "reshape_as"})
# Multi-output ops whose output k is a function of input k alone.
_PER_INPUT_NAMES = frozenset({"broadcast_tensors", "atleast_1d", "atleast_2d", "atleast_3d", "meshgrid"})
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
    several times cheaper per op. Tags are kept per tensor object, so they follow values, not
    uses: an op that returns one of its inputs unchanged (``broadcast_tensors`` of a tensor
    that already has the broadcast shape, ``.to``, ``.contiguous``) leaves that object's tag
    alone, output ``k`` of ``broadcast_tensors`` gets input ``k``'s tag, and only in-place
    writes (``add_``, ``__setitem__``, ``out=``; also into a view's base) unite a target's
    tag with the other inputs'. Conversions of tagged tensors to Python values (``item``,
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
        """Give the leaf ``t`` (a site's value) the provenance ``bits``."""
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
        if name in _VALUE_FREE_NAMES:
            return out  # values that depend on no input's values (zeros_like, new_ones, ...)
        groups = (args[:1],) if name in _SELF_ONLY_NAMES else (args, kwargs.values())
        bits, nd, grad_in = _union(self.tags, groups)
        if not bits:
            return out
        if escape:
            self.taint |= bits
            return out
        if name in _DATA_SHAPE_NAMES or (name == "__getitem__" and _has_mask_index(args)):
            self.value_dependent_shapes = True
        if "out" in kwargs or name == "__setitem__" or (name and name[-1] == "_" and name[:2] != "__"):
            # in place: the target's values now mix its old ones with every input
            target = out if is_tensor else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
            if target is not None:
                self._write(target, bits, nd, grad_in, name, union=True)
                if target._base is not None:  # a view: its base changed too
                    self._write(target._base, bits, nd, grad_in, name, union=True)
            return out
        if is_tensor:
            # an op that hands back one of its inputs unchanged (.to, .contiguous, ...) leaves
            # that object's provenance alone: the other inputs did not flow into it
            if not _is_input(out, args, kwargs):
                self._write(out, bits, nd, grad_in, name)
            return out
        if out is None:
            return out
        if name in _PER_INPUT_NAMES:
            seq = args[0] if len(args) == 1 and type(args[0]) in (list, tuple) else args
            if len(seq) == len(out):
                # output k is a function of input k alone (broadcast_tensors, atleast_1d, ...)
                for o, a in zip(out, seq):
                    e = self.tags.get(id(a))
                    if e is not None and o is not a and isinstance(o, torch.Tensor):
                        self._write(o, e[1], e[2], a.requires_grad, name)
                return out
        # several outputs: which input feeds which is unknown, so cut only if all are cut
        outs = [b for b in out if isinstance(b, torch.Tensor) and not _is_input(b, args, kwargs)]
        cut = _zero_grad(name) or (grad_in and torch.is_grad_enabled() and not any(b.requires_grad for b in outs))
        for b in outs:
            self.tags[id(b)] = (b, bits, bits if cut else nd)
        return out

    def _write(self, target: torch.Tensor, bits: int, nd: int, grad_in: bool, name, union: bool = False) -> None:
        # the path leaves the gradient graph (comparisons, casts, detach, no_grad) or has a
        # zero derivative (rounding): gradients cannot see this dependency
        cut = _zero_grad(name) or (grad_in and not target.requires_grad and torch.is_grad_enabled())
        nd = bits if cut else nd
        if union:
            old = self.tags.get(id(target))
            if old is not None:
                bits, nd = bits | old[1], nd | old[2]
        self.tags[id(target)] = (target, bits, nd)


def _union(tags: dict, groups) -> tuple[int, int, bool]:
    """(bits, non-differentiable bits, whether a tagged input requires grad) over the tensors
    in ``groups`` (iterables of arguments; lists and tuples of tensors are looked into)."""
    bits = nd = 0
    grad_in = False
    for group in groups:
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
    return bits, nd, grad_in


def _is_input(t: torch.Tensor, args, kwargs) -> bool:
    return any(t is a for a in args) or any(t is a for a in kwargs.values())


def _zero_grad(name) -> bool:
    return bool(name) and name.rstrip("_") in _ZERO_GRAD_NAMES


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
