"""Masked networks: the activation table, masked linear layers, the one masked-MLP pass and the StrNN.

One forward pass (:meth:`MaskedMLP.run`) serves every masked network of the package: the StrNN
conditioners of StrAF, the residual blocks of the graphical residual flow and the velocity field
of the structured CNF. Its hooks give each family what it needs:

- ``weights``: the per-layer weights to use instead of ``W * mask`` (the GRF passes its spectrally
  normalised masked weights, see :meth:`MaskedMLP.effective_weights`);
- ``post``: a per-layer transform of the linear output that returns the new value and its
  elementwise slope (the CNF's time gates);
- ``need_slopes``: return every layer's ``d(layer output)/d(linear output)`` (the activation
  derivative times the post-transform's slope), from which the GRF builds its Jacobian diagonal
  and the CNF its exact divergence;
- ``tangent``: carry a forward-mode Jacobian-vector product (the CNF's Hutchinson estimator);
- ``plan``: evaluate only the units with a path to some outputs, in a feature-major layout
  (StrAF's level-by-level sampling with gradients).

Without gradients StrAF samples through :meth:`StrNN.level_schedule` / :meth:`StrNN.level_pass`
instead: every unit computed once, at the first pass its inputs are final (:class:`LevelSchedule`).

Example:
    >>> A = torch.tensor([[0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)  # (out=3, in=3)
    >>> net = StrNN(A, hidden_sizes=[16, 16], num_params=2, skip=True)
    >>> net(torch.randn(5, 3)).shape
    torch.Size([5, 3, 2])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .masks import factorize

__all__ = [
    "MaskedStructure",
    "ACTIVATIONS",
    "Activation",
    "LevelEvaluator",
    "LevelSchedule",
    "LipSwish",
    "MaskedLinear",
    "MaskedMLP",
    "PassResult",
    "StrNN",
    "get_activation",
    "masked_layers",
    "masks_of",
    "parameter_counts",
]


# -------------------------------------------------------------------------------- activations
class Activation(nn.Module, ABC):
    """An elementwise activation that also returns its derivative.

    Class flags: ``lipschitz`` (``|f'| <= 1`` everywhere, which the GRF's contraction needs) and
    ``smooth`` (continuously differentiable twice or more, which adaptive ODE solvers assume).

    ``value_and_derivative(a, units=None, dim=-1)`` returns ``f(a)`` and ``f'(a)`` shaped like
    ``a``; ``units`` and ``dim`` matter only for activations with per-unit parameters: ``a``'s
    axis ``dim`` holds the units ``units`` (all of them when ``None``).
    """

    lipschitz: bool = False
    smooth: bool = False

    def __init__(self, width: int | None = None):
        super().__init__()

    @abstractmethod
    def value_and_derivative(self, a: torch.Tensor, units=None, dim: int = -1):
        """``(f(a), f'(a))``, both shaped like ``a``."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.value_and_derivative(a)[0]


class ReLU(nn.ReLU, Activation):
    """``max(a, 0)``; ``f'`` is the step function (0 at 0)."""

    lipschitz, smooth = True, False

    def __init__(self, width: int | None = None):
        nn.ReLU.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        return F.relu(a), (a > 0).to(a.dtype)


class ELU(nn.ELU, Activation):
    """``a`` for ``a > 0``, ``exp(a) - 1`` otherwise (``alpha = 1``)."""

    lipschitz, smooth = True, False

    def __init__(self, width: int | None = None):
        nn.ELU.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        e = torch.expm1(a.clamp(max=0.0))
        return torch.where(a > 0, a, e), torch.where(a > 0, torch.ones_like(a), e + 1.0)


class Tanh(nn.Tanh, Activation):
    """``tanh(a)``, ``f' = 1 - tanh(a)^2``."""

    lipschitz, smooth = True, True

    def __init__(self, width: int | None = None):
        nn.Tanh.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        t = torch.tanh(a)
        return t, 1.0 - t * t


class Softplus(nn.Softplus, Activation):
    """``log(1 + exp(a))``, ``f' = sigmoid(a)``."""

    lipschitz, smooth = True, True

    def __init__(self, width: int | None = None):
        nn.Softplus.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        return F.softplus(a), torch.sigmoid(a)


class SiLU(nn.SiLU, Activation):
    """``a * sigmoid(a)``; ``f'`` reaches 1.1, so it is not 1-Lipschitz."""

    lipschitz, smooth = False, True

    def __init__(self, width: int | None = None):
        nn.SiLU.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))


class GELU(nn.GELU, Activation):
    """``a * Phi(a)`` (exact); ``f'`` reaches 1.13, so it is not 1-Lipschitz."""

    lipschitz, smooth = False, True

    def __init__(self, width: int | None = None):
        nn.GELU.__init__(self)

    def value_and_derivative(self, a, units=None, dim=-1):
        cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return a * cdf, cdf + a * pdf


class LipSwish(Activation):
    """``f(a) = a * sigmoid(beta * a) / 1.1`` with a learnable ``beta > 0`` per unit (Chen et al., 2019).

    ``f'(a) = (s + u s (1 - s)) / 1.1`` with ``u = beta a`` and ``s = sigmoid(u)``, which lies in
    ``[-0.091, 1)`` for every ``beta``, so the activation is 1-Lipschitz.

    Args:
        width: number of units (one ``beta`` each).

    Shapes: ``(*, width)`` -> ``(*, width)`` (or the units on axis ``dim``).
    """

    lipschitz, smooth = True, True

    def __init__(self, width: int | None = None):
        super().__init__()
        if width is None or width < 1:
            raise ValueError(f"LipSwish needs the layer width (one beta per unit); got width={width!r}")
        # softplus^{-1}(1): start at beta = 1
        self.raw_beta = nn.Parameter(torch.full((int(width),), math.log(math.e - 1.0)))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta)

    def value_and_derivative(self, a, units=None, dim=-1):
        beta = self.beta if units is None else self.beta.index_select(0, units)
        if dim != -1 and dim != a.dim() - 1:
            beta = beta.reshape((-1,) + (1,) * (a.dim() - 1 - dim % a.dim()))
        u = beta * a
        s = torch.sigmoid(u)
        return a * s / 1.1, (s + u * s * (1.0 - s)) / 1.1


#: name -> activation class (each with ``value_and_derivative`` and the ``lipschitz`` / ``smooth`` flags)
ACTIVATIONS: dict[str, type[Activation]] = {
    "relu": ReLU,
    "elu": ELU,
    "tanh": Tanh,
    "softplus": Softplus,
    "silu": SiLU,
    "gelu": GELU,
    "lipswish": LipSwish,
}


def get_activation(
    activation: str | Callable[[], nn.Module] | nn.Module, width: int | None = None, require: str | None = None
) -> nn.Module:
    """An activation module from a name in :data:`ACTIVATIONS`, a module class or factory, or an instance.

    Args:
        activation: the name (case-insensitive), a class/factory, or a module.
        width: the layer width (needed by activations with per-unit parameters, e.g. ``lipswish``).
        require: ``"lipschitz"`` or ``"smooth"``: accept only a table activation with that flag
            (the GRF's contraction needs the first, the CNF's adaptive solver the second).

    Raises:
        ValueError: unknown name, an activation without the required flag, or a wrong type.
    """
    if require is not None:
        allowed = sorted(k for k, cls in ACTIVATIONS.items() if getattr(cls, require))
        name = activation.lower() if isinstance(activation, str) else None
        if name not in allowed:
            why = {"lipschitz": "derivative bounded by 1 in absolute value", "smooth": "smooth"}[require]
            raise ValueError(
                f"activation must be one of {allowed} ({why}, with an analytic derivative); got {activation!r}"
            )
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        try:
            cls = ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}") from None
        return cls(width)
    if callable(activation):
        return activation()
    raise ValueError(f"activation must be a name, a module class or a module; got {activation!r}")


# ---------------------------------------------------------------------------- masked layers
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
        """Redraw the weights (zero them with ``zero_init``) with the masked fan-in, masked entries zeroed."""
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
        return F.linear(input, self.masked_weight, self.bias)

    def num_effective_parameters(self) -> int:
        """Unmasked weights plus biases."""
        return int(self.mask.sum()) + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, unmasked={int(self.mask.sum())}"


def masked_layers(module: nn.Module) -> dict[str, MaskedLinear]:
    """``{module name: MaskedLinear}`` of every masked layer inside ``module``, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MaskedLinear)}


def masks_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: (out, in) bool mask}`` of every masked layer inside ``module`` (detached copies on the CPU)."""
    return {name: m.mask.detach().to("cpu").bool().clone() for name, m in masked_layers(module).items()}


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """``(effective, dense)`` parameter counts of ``module``.

    Masked-out weights of :class:`MaskedLinear` layers are not effective; every other parameter
    (biases, gates, normaliser networks, ...) is. ``dense`` counts every parameter once.
    """
    params = {id(p): p for p in module.parameters()}
    dense = sum(p.numel() for p in params.values())
    removed = 0
    seen = set()
    for layer in masked_layers(module).values():
        if id(layer.weight) not in seen and id(layer.weight) in params:
            seen.add(id(layer.weight))
            removed += int((~layer.mask).sum())
    return dense - removed, dense


# ------------------------------------------------------------------------------- masked MLP
class PassResult(NamedTuple):
    """What :meth:`MaskedMLP.run` returns.

    Attributes:
        output: the last layer's output ``(*, out)`` (feature-major ``(out, N)`` with a plan).
        slopes: with ``need_slopes``, one entry per layer: ``d(layer output)/d(linear output)``
            shaped like that layer's output, or ``None`` where it is 1 (the last layer without a
            post-transform); else ``None``.
        tangent: with ``tangent``, the Jacobian-vector product ``(*, out)``; else ``None``.
    """

    output: torch.Tensor
    slopes: list | None
    tangent: torch.Tensor | None


class MaskedMLP(nn.Module):
    """A multilayer perceptron of :class:`MaskedLinear` layers with an activation after each hidden one.

    Args:
        masks: per-layer ``(out, in)`` bool masks, input layer first.
        activation: a name in :data:`ACTIVATIONS`, a module class/factory or a module (one per
            hidden layer is built from a name or a class; an instance is shared).
        require: optional activation flag to demand (``"lipschitz"`` or ``"smooth"``).

    Shapes: input ``(*, masks[0].shape[1])`` -> output ``(*, masks[-1].shape[0])``.
    """

    def __init__(self, masks: Sequence[torch.Tensor], activation="relu", require: str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(MaskedLinear(m) for m in masks)
        self.activations = nn.ModuleList(
            get_activation(activation, width=m.shape[0], require=require) for m in masks[:-1]
        )

    def effective_weights(self, transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list:
        """Per-layer weights ``W * mask``, each passed through ``transform(k, W)`` when given."""
        ws = [layer.masked_weight for layer in self.layers]
        return ws if transform is None else [transform(k, W) for k, W in enumerate(ws)]

    def _activate(self, k: int, a: torch.Tensor, need_slope: bool, units, dim: int):
        act = self.activations[k]
        if need_slope:
            if not hasattr(act, "value_and_derivative"):
                raise TypeError(
                    f"activation {act!r} has no value_and_derivative; use one of {sorted(ACTIVATIONS)} for slopes"
                )
            return act.value_and_derivative(a, units=units, dim=dim)
        if units is not None and isinstance(act, LipSwish):
            return act.value_and_derivative(a, units=units, dim=dim)[0], None
        return act(a), None

    def run(
        self,
        h: torch.Tensor,
        weights: Sequence[torch.Tensor] | None = None,
        post: Callable | None = None,
        need_slopes: bool = False,
        tangent: torch.Tensor | None = None,
        plan: Sequence[torch.Tensor] | None = None,
    ) -> PassResult:
        """The forward pass, with the hooks described in the module docstring.

        Args:
            h: input ``(*, in)``; with ``plan``, the feature-major ``(len(plan[0]), N)`` inputs
                the plan selects.
            weights: per-layer weights (default :meth:`effective_weights`).
            post: ``post(k, a) -> (a', slope)`` applied to layer ``k``'s linear output ``a``
                (``slope`` the elementwise ``da'/da``, or ``None`` for 1).
            need_slopes: return the per-layer slopes.
            tangent: ``(*, k)`` input tangent on the first ``k <= in`` input columns (the others
                held fixed); the Jacobian-vector product comes back in ``PassResult.tangent``.
            plan: ``[inputs, units_0, ..., units_L]`` index tensors (see :meth:`StrNN.row_plan`):
                evaluate only those units, feature-major.
        """
        weights = self.effective_weights() if weights is None else weights
        need_slopes = need_slopes or tangent is not None
        slopes = [] if need_slopes else None
        last = len(self.layers) - 1
        for k, (layer, W) in enumerate(zip(self.layers, weights)):
            b = layer.bias
            if plan is not None:
                W = W.index_select(0, plan[k + 1]).index_select(1, plan[k])
                a = W @ h
                if b is not None:
                    a = a + b.index_select(0, plan[k + 1]).unsqueeze(-1)
            else:
                a = F.linear(h, W, b)
            if tangent is not None:
                tangent = F.linear(tangent, W[:, : tangent.shape[-1]] if k == 0 else W)
            slope = None
            if post is not None:
                a, slope = post(k, a)
            if k < last:
                units, dim = (plan[k + 1], 0) if plan is not None else (None, -1)
                h, da = self._activate(k, a, need_slopes, units, dim)
                if need_slopes:
                    slope = da if slope is None else da * slope
            else:
                h = a
            if need_slopes:
                slopes.append(slope)
                if tangent is not None and slope is not None:
                    tangent = tangent * slope
        return PassResult(h, slopes, tangent)


class StrNN(MaskedMLP):
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
        activation: a name in :data:`ACTIVATIONS`, a module class or a module.
        mask_method: mask factorisation, ``"greedy"`` or ``"made"`` (see :func:`factorize`).
        widen: widen hidden layers that are too narrow for an exact factorisation.
        require: optional activation flag to demand (``"lipschitz"`` or ``"smooth"``).

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
        mask_method: str = "greedy",
        widen: bool = True,
        require: str | None = None,
    ):
        A = torch.as_tensor(adjacency).bool()
        if A.dim() != 2:
            raise ValueError(f"adjacency must be (d_out, d_in); got shape {tuple(A.shape)}")
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1; got {num_params}")
        masks = factorize(A, list(hidden_sizes), method=mask_method, widen=widen)
        masks[-1] = masks[-1].repeat_interleave(int(num_params), dim=0)
        super().__init__(masks, activation, require=require)
        self.d_out, self.d_in = A.shape
        self.num_params = int(num_params)
        self.register_buffer("adjacency", A, persistent=False)
        self.hidden_sizes = [m.shape[0] for m in masks[:-1]]
        self.skip = MaskedLinear(self._skip_mask(A, skip), bias=False, zero_init=True) if skip else None
        self._row_plans: dict = {}
        self._level_schedules: dict = {}

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
        return parameter_counts(self)[0]

    def num_dense_parameters(self) -> int:
        """Parameters of the same network without masks."""
        return parameter_counts(self)[1]

    def hidden(self, input: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations of every layer, for analytic Jacobians: list of ``(*, width)``."""
        pre = []

        def record(k, a):
            pre.append(a)
            return a, None

        self.run(input, post=record)
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

    def level_schedule(self, input_ready: torch.Tensor, row_level: torch.Tensor) -> LevelSchedule:
        """The :class:`LevelSchedule` of level-by-level sampling (cached per argument values).

        Args:
            input_ready: ``(d_in,)`` long: the pass from which each input is final.
            row_level: ``(d_out,)`` long: the pass that computes each output variable.

        Raises:
            ValueError: an output depends on an input that is not final at its pass.
        """
        # the masks are buffers: a load_state_dict copies into them, which bumps their version
        masks_key = tuple((m.data_ptr(), m._version) for m in self.masks)
        key = (tuple(input_ready.tolist()), tuple(row_level.tolist()), masks_key)
        if key in self._level_schedules:
            return self._level_schedules[key]
        masks = [layer.mask.detach().cpu() for layer in self.layers]
        num_levels, P = int(row_level.max()) + 1, self.num_params
        ready = [input_ready.cpu().long()]
        for M in masks:  # a unit is final from the latest ready pass of its inputs
            ready.append(_latest(M, ready[-1]))
        out_level = row_level.cpu().long().repeat_interleave(P)
        skip_ready = _latest(self.skip.mask.cpu(), ready[0]) if self.skip is not None else ready[-1]
        if (torch.maximum(ready[-1], skip_ready) > out_level).any():
            raise ValueError("level_schedule: an output depends on an input that is not final at its pass")
        need, needs = torch.ones(len(out_level), dtype=torch.bool), []
        for M in reversed(masks[1:]):  # hidden units with a path to an output
            need = M.bool()[need].any(0)
            needs.insert(0, need)
        rows = torch.sort(row_level.cpu(), stable=True).indices
        perms = [torch.sort(ready[0], stable=True).indices]
        for r, nd in zip(ready[1:-1], needs):
            idx = torch.nonzero(nd).flatten()
            perms.append(idx[torch.sort(r[idx], stable=True).indices])
        perms.append((rows[:, None] * P + torch.arange(P)).reshape(-1))
        levels = [r[p] for r, p in zip(ready[:-1], perms[:-1])] + [out_level[perms[-1]]]
        bounds = [[0] + torch.cumsum(torch.bincount(lv, minlength=num_levels + 1)[:num_levels], 0).tolist() for lv in levels]
        sources = [_level_sources(M[perms[k + 1]][:, perms[k]], bounds[k + 1], bounds[k]) for k, M in enumerate(masks)]
        skip = self.skip.mask.cpu()[perms[-1]][:, perms[0]] if self.skip is not None else None
        sources.append(_level_sources(skip, bounds[-1], bounds[0]) if skip is not None else None)
        schedule = LevelSchedule(perms, bounds, sources)
        self._level_schedules[key] = schedule
        return schedule

    def level_weights(self, schedule: LevelSchedule) -> list:
        """The weights permuted by ``schedule``, cut into the blocks each pass multiplies.

        Returns:
            one entry per layer, then one for the skip: ``(W, b, blocks)`` with ``W`` and ``b``
            permuted (``None`` for a missing skip; ``b`` ``None`` for the skip) and ``blocks[t]``
            (``t >= 1``) the triple ``(W_t, source, sub)`` of :func:`_level_blocks`: pass ``t``'s
            rows (those of ``sub``) restricted to the input columns they use, and those columns of
            the layer below's buffer (a ``slice`` when they lie close together, else an index
            tensor to gather), counted from its first unit of ready pass 1.
        """
        device = self.layers[0].weight.device
        perms = [p.to(device) for p in schedule.perms]
        out = []
        for k, layer in enumerate(self.layers):
            W = layer.masked_weight.index_select(0, perms[k + 1]).index_select(1, perms[k])
            blocks = _level_blocks(W, schedule.sources[k], schedule.bounds[k + 1], schedule.bounds[k])
            out.append((W, layer.bias.index_select(0, perms[k + 1]), blocks))
        if self.skip is None:
            return out + [(None, None, None)]
        W = self.skip.masked_weight.index_select(0, perms[-1]).index_select(1, perms[0])
        mask = self.skip.mask.index_select(0, perms[-1]).index_select(1, perms[0])
        return out + [(W, None, _level_blocks(W, schedule.sources[-1], schedule.bounds[-1], schedule.bounds[0], mask))]

    def level_evaluator(self, schedule: LevelSchedule, weights, x_small, batch, buffers=None) -> "LevelEvaluator":
        """A :class:`LevelEvaluator` for ``prod(batch)`` points whose contexts ``x_small``
        ``(*small, c)`` (``small`` broadcastable to ``batch``; ``None`` if ``c = 0``) are given
        once each; ``weights`` from :meth:`level_weights`; ``buffers``: the hidden buffers of an
        evaluator of as many points, to reuse (its :attr:`LevelEvaluator.buffers`)."""
        return LevelEvaluator(self, weights, schedule, x_small, tuple(batch), buffers)

    def level_pass(self, state: "LevelEvaluator", t: int, z: torch.Tensor) -> torch.Tensor:
        """Sampling pass ``t`` of level-by-level evaluation: the output units of level ``t``.

        Args:
            state: the :class:`LevelEvaluator` of these points (its buffers are updated in place).
            t: the pass, ``0 ... T``; passes must run in order, each once.
            z: ``(d, N)`` latents in level order, final for levels below ``t`` (the same buffer
                at every pass of an evaluator).

        Returns:
            ``(r * num_params, N)``, a view of the output buffer.
        """
        steps, out = state.program(z)[t]
        for step in steps:
            step()
        return out

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
            if input.dim() != 2 or input.shape[0] != self.d_in:
                raise ValueError(
                    f"with rows=, the input must be feature-major ({self.d_in}, N); got shape {tuple(input.shape)}"
                )
            plan = self.row_plan(rows)
            inputs = input.index_select(0, plan[0])
            out = self.run(inputs, plan=plan).output
            if self.skip is not None:
                # the skip's mask is the adjacency's rows, so its inputs are the plan's inputs
                out = out + self.skip.masked_weight.index_select(0, plan[-1]).index_select(1, plan[0]) @ inputs
            return out.unflatten(0, (len(rows), self.num_params))
        if input.shape[-1] != self.d_in:
            raise ValueError(f"StrNN input must have last dimension {self.d_in}; got shape {tuple(input.shape)}")
        out = self.run(input).output
        if self.skip is not None:
            out = out + self.skip(input)
        return out.unflatten(-1, (self.d_out, self.num_params))


class MaskedStructure:
    """Mixin for modules built from masked layers: their masks and effective/dense parameter counts."""

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{module name: (out, in) bool mask}`` of every masked layer, in module order (CPU copies)."""
        return masks_of(self)

    def num_effective_parameters(self) -> int:
        """Trainable parameters that are not masked out (every parameter outside masked weights counts)."""
        return parameter_counts(self)[0]

    def num_dense_parameters(self) -> int:
        """Trainable parameters of the same module without masks."""
        return parameter_counts(self)[1]


# ------------------------------------------------------------------ level-by-level evaluation
class LevelSchedule(NamedTuple):
    """When each unit of a :class:`StrNN` is computed during level-by-level sampling.

    Pass ``t`` (``0 ... T``) computes the output variables of level ``t``. An input is final
    from its *ready* pass on (the context from 0, a level-``l`` latent from ``l + 1``), a hidden
    unit from the largest ready pass of its inputs. Each layer's units are permuted so that the
    units of ready pass ``t`` form one block whose inputs are a prefix of the layer below: every
    unit is computed once, at its ready pass, from a dense slice of the permuted weights, and
    all passes together cost about one full pass.

    Attributes:
        perms: ``[inputs, layer_0, ..., output]`` CPU long tensors: the units each layer keeps
            (hidden units without a path to an output are dropped), in ready order; the outputs
            are the rows by level, each row's ``num_params`` units together.
        bounds: per entry of ``perms``, ``T + 2`` offsets: the units of ready pass ``t`` are
            ``perm[bounds[t]:bounds[t + 1]]``.
        sources: per layer, then the skip (``None`` without one): per pass ``t >= 1`` the input
            columns that pass's block uses (see :func:`_level_sources`), or ``None``.
    """

    perms: list
    bounds: list
    sources: list


def _latest(M: torch.Tensor, ready: torch.Tensor, rows_per_step: int = 1024) -> torch.Tensor:
    """Per row of the ``(out, in)`` bool mask ``M``, the largest ``ready`` of its inputs (0 without
    inputs), a few rows at a time to bound the memory on wide layers."""
    out = [torch.where(R, ready, 0).amax(1) if R.shape[1] else torch.zeros(R.shape[0], dtype=torch.long)
           for R in M.split(rows_per_step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _level_sources(M: torch.Tensor, rows: list, cols: list) -> list:
    """Per pass ``t >= 1``, the columns (from ``cols[1]``, the first non-context unit) that the
    permuted mask ``M``'s block of rows ``rows[t]:rows[t + 1]`` uses: a ``slice`` when their span is
    at most 2.5 times their number (the product then reads the buffer in place), else an index
    tensor (the rows are gathered first); ``None`` for a pass without rows."""
    sources = [None]
    for t in range(1, len(rows) - 1):
        s, e, n0, p = rows[t], rows[t + 1], cols[1], cols[t + 1]
        if e == s:
            sources.append(None)
            continue
        used = torch.nonzero(M[s:e, n0:p].any(0)).flatten()
        if len(used) == 0:
            sources.append(slice(0, 0))
        elif int(used[-1] - used[0]) + 1 <= 2.5 * len(used):
            sources.append(slice(int(used[0]), int(used[-1]) + 1))
        else:
            sources.append(used)
    return sources


def _level_blocks(W: torch.Tensor, sources: list, rows: list, cols: list, mask: torch.Tensor | None = None) -> list:
    """Per pass ``t >= 1``: ``(W_t, source, sub)``, the permuted weight ``W``'s block of that pass's
    rows on the columns of ``sources[t]`` (counted from ``cols[1]``); ``None`` for a pass without rows.

    ``sub`` is a ``slice`` of the block's rows: with the permuted ``mask``, the rows that have an
    input when they form a regular progression (a skip feeding only a normaliser's shift: every
    ``num_params``-th row), so the product skips the rows of zeros; else all rows."""
    blocks = [None]
    for t in range(1, len(rows) - 1):
        source = sources[t]
        if source is None:
            blocks.append(None)
            continue
        s, e, n0, p = rows[t], rows[t + 1], cols[1], cols[t + 1]
        if isinstance(source, slice):
            block = W[s:e, n0 + source.start : n0 + source.stop]
        else:
            source = source.to(W.device)
            block = W[s:e, n0:p].index_select(1, source)
        sub = slice(None)
        if mask is not None:
            used = torch.nonzero(mask[s:e].any(1)).flatten().tolist()
            steps = {b - a for a, b in zip(used, used[1:])}
            if used and len(steps) <= 1 and len(used) < e - s:
                sub = slice(used[0], used[-1] + 1, steps.pop() if steps else 1)
        blocks.append((block[sub], source, sub))
    return blocks


class LevelEvaluator:
    """One :class:`StrNN` run level by level on ``N = prod(batch)`` feature-major points.

    Built by :meth:`StrNN.level_evaluator`. Units of ready pass 0 depend on the context only:
    they, their contribution to every later unit and the biases (the *base*) are computed once
    per distinct context (on ``x_small``). Each pass ``t`` then computes its units straight into
    their rows of the buffers (a product, the base added, the activation), and those rows stay
    in cache for the base and the activation; nothing is prefilled.

    The passes' operations are built once per latents buffer (:meth:`program`): views of the
    buffers, weight blocks and bases bound to the torch calls, so a pass costs its products and a
    few elementwise calls, not the slicing around them (deep structures run hundreds of passes).

    Attributes:
        buffers: per layer ``(units - ready-0 units, N)`` (hidden) and ``(outputs, N)``: reuse
            them for the next evaluator of as many points.
        bases: per layer, the base of the buffer's rows ``(rows, m)`` for the ``m`` distinct contexts.
    """

    def __init__(self, net: "StrNN", weights, schedule: LevelSchedule, x_small, batch: tuple, buffers=None):
        self.net, self.weights, self.schedule, self.batch = net, weights, schedule, tuple(batch)
        self.small = tuple(x_small.shape[:-1]) if x_small is not None else (1,) * len(batch)
        n, m = math.prod(batch), math.prod(self.small)
        W0 = weights[0][0]
        ctx = x_small.reshape(m, -1).T if x_small is not None else W0.new_zeros(0, 1)
        h0, bounds, L = ctx, schedule.bounds, len(net.layers)
        self.buffers = buffers if buffers is not None else []
        self.bases = []
        for k in range(L):
            W, b, _ = weights[k]
            base = W[:, : bounds[k][1]] @ h0 + b.unsqueeze(1)
            if k == L - 1 and weights[L][0] is not None:
                base = base + weights[L][0][:, : bounds[0][1]] @ ctx  # the skip's context columns
            n0 = bounds[k + 1][1] if k < L - 1 else 0
            if buffers is None:
                self.buffers.append(W.new_empty(W.shape[0] - n0, n))
            self.bases.append(base[n0:])
            if k < L - 1:
                h0 = net._activate(k, base[:n0], False, schedule.perms[k + 1][:n0].to(base.device), 0)[0]
        self._program, self._program_z = None, None

    def program(self, z: torch.Tensor) -> list:
        """Per pass ``t``: ``(steps, out)``, the calls that compute the pass into the buffers (the
        latents read from ``z`` ``(d, N)``) and the view of its output rows; built on first use
        and whenever ``z`` is another buffer."""
        if self._program is None or self._program_z is not z:
            self._program, self._program_z = self._build(z), z
        return self._program

    def _build(self, z: torch.Tensor) -> list:
        net, weights, L, bounds = self.net, self.weights, len(self.net.layers), self.schedule.bounds
        # one gather buffer for every block whose input columns are scattered: each gather is
        # consumed by the product right after it
        rows = [len(src) for w in weights if w[2] is not None for blk in w[2] if blk is not None
                for src in [blk[1]] if not isinstance(src, slice)]
        self._gathered = z.new_empty(max(rows, default=0), z.shape[1])
        passes = []
        for t in range(len(bounds[L]) - 1):
            lo, hi = bounds[L][t], bounds[L][t + 1]
            out = self.buffers[L - 1][lo:hi]
            if t == 0:  # level-0 rows see the context only: their base
                passes.append(([self._fill_base(L - 1, lo, hi, out)], out))
                continue
            steps, below = [], z
            for k in range(L - 1):
                s, e, n0 = bounds[k + 1][t], bounds[k + 1][t + 1], bounds[k + 1][1]
                if weights[k][2][t] is not None:
                    h = self.buffers[k][s - n0 : e - n0]
                    steps += self._product(weights[k][2][t], below, h, (k, s - n0, e - n0))
                    steps.append(self._activation(k, s, e, h))
                below = self.buffers[k]
            steps += self._product(weights[L - 1][2][t], below, out, (L - 1, lo, hi))
            if weights[L][0] is not None:
                steps += self._product(weights[L][2][t], z, out, None)
            passes.append((steps, out))
        return passes

    def _fill_base(self, k: int, s: int, e: int, rows: torch.Tensor):
        """The call writing the base of layer ``k``'s buffer rows ``s:e`` into ``rows`` ``(e - s, N)``."""
        base = self.bases[k][s:e]
        if base.shape[1] == 1:
            return partial(rows.copy_, base)
        return partial(rows.view((e - s,) + self.batch).copy_, base.view((e - s,) + self.small))

    def _product(self, block, below: torch.Tensor, out: torch.Tensor, base) -> list:
        """The calls for ``out (+)= W_t @ below[source]`` of a block ``(W_t, source, sub)`` of
        :func:`_level_blocks`: ``=`` plus the base of ``base = (layer, s, e)``, or ``+=`` when ``None``."""
        W, source, sub = block
        steps = []
        if isinstance(source, slice):
            inputs = below[source]
        else:
            inputs = self._gathered[: len(source)]
            steps.append(partial(torch.index_select, below, 0, source, out=inputs))
        if base is None:
            return steps + [partial(out[sub].addmm_, W, inputs)]
        k, s, e = base
        column = self.bases[k][s:e]
        if column.shape[1] == 1:  # one context: the base is a column, added by the product itself
            return steps + [partial(torch.addmm, column, W, inputs, out=out)]
        view = out.view((e - s,) + self.batch)
        return steps + [partial(torch.mm, W, inputs, out=out), partial(view.add_, column.view((e - s,) + self.small))]

    def _activation(self, k: int, s: int, e: int, h: torch.Tensor):
        """The call applying hidden layer ``k``'s activation to its units ``s:e`` in place in ``h``."""
        net = self.net
        if isinstance(net.activations[k], nn.ReLU):
            return partial(h.clamp_, min=0)
        units = self.schedule.perms[k + 1][s:e].to(h.device)
        return lambda: h.copy_(net._activate(k, h, False, units, 0)[0])
