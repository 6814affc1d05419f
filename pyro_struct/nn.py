"""Masked linear layers and the structured MLP (StrNN) built from :func:`~pyro_struct.masks.factorize`.

Example:
    >>> A = torch.tensor([[0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)  # (out=3, in=3)
    >>> net = StrNN(A, hidden_sizes=[16, 16], num_params=2, skip=True)
    >>> net(torch.randn(5, 3)).shape
    torch.Size([5, 3, 2])
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .masks import factorize

__all__ = ["MaskedLinear", "StrNN", "get_activation"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def get_activation(activation: str | Callable[[], nn.Module] | nn.Module) -> nn.Module:
    """An activation module from a name (``relu``, ``elu``, ``tanh``, ``gelu``, ``silu``,
    ``softplus``), a module class or factory, or a module instance."""
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}") from None
    if callable(activation):
        return activation()
    raise ValueError(f"activation must be a name, a module class or a module; got {activation!r}")


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed binary mask.

    Args:
        mask: ``(out_features, in_features)`` bool mask (``nn.Linear.weight``'s shape).
        bias: whether to add a bias.
        zero_init: start with zero weights (e.g. for a skip connection).

    Shapes: input ``(*, in_features)`` -> output ``(*, out_features)``.
    The initialisation draws each row uniformly in ``+-1/sqrt(fan_in)`` with the row's
    masked fan-in, so sparse rows are not under-scaled.
    """

    def __init__(self, mask: torch.Tensor, bias: bool = True, zero_init: bool = False):
        mask = torch.as_tensor(mask).bool()
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask)
        self.reset_masked_parameters(zero_init)

    @torch.no_grad()
    def reset_masked_parameters(self, zero_init: bool = False) -> None:
        fan_in = self.mask.sum(1, keepdim=True).clamp(min=1).to(self.weight.dtype)
        bound = 1.0 / fan_in.sqrt()
        if zero_init:
            self.weight.zero_()
        else:
            self.weight.uniform_(-1.0, 1.0).mul_(bound)
        self.weight.mul_(self.mask)
        if self.bias is not None:
            if zero_init:
                self.bias.zero_()
            else:
                self.bias.uniform_(-1.0, 1.0).mul_(bound.squeeze(1))

    @property
    def masked_weight(self) -> torch.Tensor:
        """The effective weight ``W * mask`` of shape ``(out_features, in_features)``."""
        return self.weight * self.mask

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.masked_weight, self.bias)

    def num_effective_parameters(self) -> int:
        """Unmasked weights plus biases."""
        return int(self.mask.sum()) + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, unmasked={int(self.mask.sum())}"


class StrNN(nn.Module):
    """A masked MLP whose outputs depend on its inputs exactly as an adjacency allows.

    Args:
        adjacency: ``(d_out, d_in)`` bool tensor; output variable ``i`` may depend on input ``j``
            iff ``adjacency[i, j]``.
        hidden_sizes: widths of the hidden layers.
        num_params: outputs per output variable (e.g. 2 for a shift and a log-scale).
        skip: add a masked linear map from inputs to outputs (zero-initialised), which lets
            an affine flow represent linear-Gaussian conditionals exactly. ``True`` feeds
            every parameter of an output variable; a sequence of parameter indices feeds only
            those (e.g. ``(0,)``: the shift of an affine normaliser, whose linear-Gaussian
            scale does not depend on the inputs; a linear scale would only add parameters to
            over-fit a fixed simulation budget with).
        activation: activation name, class or module.
        method: mask factorisation, ``"greedy"`` or ``"made"`` (see :func:`factorize`).
        widen: widen hidden layers that are too narrow for an exact factorisation.

    Shapes: input ``(*, d_in)`` -> output ``(*, d_out, num_params)``; the parameters of one
    output variable are contiguous (output unit ``i * num_params + p``).
    """

    def __init__(
        self,
        adjacency: torch.Tensor,
        hidden_sizes: Sequence[int] = (64, 64),
        num_params: int = 1,
        skip: bool | Sequence[int] = False,
        activation="relu",
        method: str = "greedy",
        widen: bool = True,
    ):
        super().__init__()
        A = torch.as_tensor(adjacency).bool()
        if A.dim() != 2:
            raise ValueError(f"adjacency must be (d_out, d_in); got shape {tuple(A.shape)}")
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1; got {num_params}")
        self.d_out, self.d_in = A.shape
        self.num_params = int(num_params)
        self.register_buffer("adjacency", A, persistent=False)
        masks = factorize(A, list(hidden_sizes), method=method, widen=widen)
        masks[-1] = masks[-1].repeat_interleave(self.num_params, dim=0)
        self.hidden_sizes = [m.shape[0] for m in masks[:-1]]
        self.layers = nn.ModuleList(MaskedLinear(m) for m in masks)
        self.activations = nn.ModuleList(get_activation(activation) for _ in masks[:-1])
        self.skip = MaskedLinear(self._skip_mask(A, skip), bias=False, zero_init=True) if skip else None
        self._row_plans: dict = {}

    def _skip_mask(self, A: torch.Tensor, skip) -> torch.Tensor:
        mask = A.repeat_interleave(self.num_params, dim=0)
        if skip is True:
            return mask
        if isinstance(skip, (bool, int)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in skip):
            raise ValueError(f"skip must be True, False or a sequence of parameter indices; got {skip!r}")
        keep = torch.zeros(self.num_params, dtype=torch.bool)
        for k in skip:
            if not 0 <= k < self.num_params:
                raise ValueError(f"skip index {k} is out of range for num_params={self.num_params}")
            keep[k] = True
        return mask & keep.repeat(self.d_out).unsqueeze(1)

    @property
    def masks(self) -> list[torch.Tensor]:
        """Every layer's mask (the skip connection's last, if any)."""
        ms = [layer.mask for layer in self.layers]
        if self.skip is not None:
            ms.append(self.skip.mask)
        return ms

    def num_effective_parameters(self) -> int:
        """Trainable parameters that are not masked out."""
        n = sum(layer.num_effective_parameters() for layer in self.layers)
        if self.skip is not None:
            n += self.skip.num_effective_parameters()
        return n

    def num_dense_parameters(self) -> int:
        """Parameters of the same network without masks."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, input: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations of every layer, for analytic Jacobians: list of ``(*, width)``."""
        pre = []
        h = input
        for layer, act in zip(self.layers[:-1], self.activations):
            a = layer(h)
            pre.append(a)
            h = act(a)
        pre.append(self.layers[-1](h))
        return pre

    def row_plan(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The units needed to compute only the output variables ``rows``.

        Args:
            rows: ``(r,)`` long tensor of output variable indices.

        Returns:
            ``[inputs, layer_0_units, ..., output_units]``: index tensors of the inputs and of
            each layer's units that have a path to those outputs (cached per ``rows``).
        """
        key = (tuple(rows.tolist()), str(self.layers[0].mask.device))
        plan = self._row_plans.get(key)
        if plan is None:
            device = self.layers[0].mask.device
            rows = rows.to(device)
            P = self.num_params
            units = (rows[:, None] * P + torch.arange(P, device=device)).reshape(-1)
            plan = [units]
            for layer in reversed(self.layers):
                units = torch.nonzero(layer.mask[units].any(0)).flatten()
                plan.append(units)
            plan.reverse()
            self._row_plans[key] = plan
        return plan

    def forward(self, input: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioner outputs, for all output variables or only for ``rows``.

        Args:
            input: ``(*, d_in)``; with ``rows``, feature-major ``(d_in, N)`` instead.
            rows: optional ``(r,)`` long tensor of output variables to compute. Only the units
                with a path to them are evaluated (the same values as the full pass, at a
                fraction of the cost), in the feature-major layout where gathering a few
                features of many samples is a contiguous copy (depth-by-depth sampling).

        Returns:
            ``(*, d_out, num_params)``, or ``(r, num_params, N)`` with ``rows``.
        """
        if rows is not None:
            return self._forward_rows(input, rows)
        if input.shape[-1] != self.d_in:
            raise ValueError(f"StrNN input must have last dimension {self.d_in}; got shape {tuple(input.shape)}")
        h = input
        for layer, act in zip(self.layers[:-1], self.activations):
            h = act(layer(h))
        out = self.layers[-1](h)
        if self.skip is not None:
            out = out + self.skip(input)
        return out.unflatten(-1, (self.d_out, self.num_params))

    def _forward_rows(self, input_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if input_t.dim() != 2 or input_t.shape[0] != self.d_in:
            raise ValueError(f"with rows=, the input must be feature-major ({self.d_in}, N); got shape {tuple(input_t.shape)}")
        plan = self.row_plan(rows)
        h = inputs = input_t.index_select(0, plan[0])
        for i, layer in enumerate(self.layers):
            weight = layer.masked_weight.index_select(0, plan[i + 1]).index_select(1, plan[i])
            h = weight @ h
            if layer.bias is not None:
                h = h + layer.bias.index_select(0, plan[i + 1]).unsqueeze(-1)
            if i < len(self.activations):
                h = self.activations[i](h)
        if self.skip is not None:
            # the skip's mask is the adjacency's rows, so its inputs are the plan's inputs
            h = h + self.skip.masked_weight.index_select(0, plan[-1]).index_select(1, plan[0]) @ inputs
        return h.unflatten(0, (len(rows), self.num_params))
