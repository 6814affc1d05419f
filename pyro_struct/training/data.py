"""Learning the model and the guide together from data (a VAE): ``fit(objective="elbo" | "iwae", data=...)``.

The loss is a bound on ``log p(x)`` per data point (:mod:`pyro_struct.likelihood`), averaged over
a minibatch of data points each step; its gradient trains the guide's flow and the model's own
parameters (``pyro.param``, ``pyro.module``, ``PyroModule``: found by tracing the model) with
the package's loop (:func:`~pyro_struct.training.loop.train`): progress bar, time budget,
schedule, the non-finite guard, held-out validation and checkpoints. Nothing is simulated for
training: the data are the batches.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from ..io import read_payload
from ..likelihood import DATA_OBJECTIVES, point_data, point_model, point_simulator
from .batches import PoolSource
from .checkpoint import Checkpointer
from .loop import FitResult, train

__all__ = ["model_parameters", "JointParameters", "fit_data", "STANDARDIZE"]

#: where ``fit(data=...)`` takes the flow's standardisation from (see :func:`fit_data`)
STANDARDIZE = ("data", "prior", None)


def model_parameters(model: Callable, args=(), kwargs: Mapping | None = None) -> dict[str, torch.Tensor]:
    """The model's learnable parameters: ``pyro.param`` name -> unconstrained leaf tensor.

    Found from one trace of the model (``pyro.module`` and ``PyroModule`` parameters are
    ``pyro.param`` sites too); the leaves are those in Pyro's parameter store, which the
    model reads on every run, so optimising them trains the model.
    """
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(model, param_only=True).get_trace(*args, **dict(kwargs or {}))
    store = dict(pyro.get_param_store().named_parameters())
    return {name: store[name] for name, site in tr.nodes.items() if site["type"] == "param" and name in store}


class JointParameters(nn.Module):
    """The guide plus the model's parameters, as one module for the training loop.

    ``named_parameters`` yields the guide's, then the model's (``"model." + pyro name``), which
    are Pyro parameter-store leaves rather than submodules' parameters.
    """

    def __init__(self, guide: nn.Module, model_params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.guide = guide
        self._model_params = dict(model_params)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        seen = set()
        for name, p in self.guide.named_parameters(prefix="guide"):
            seen.add(id(p))
            yield name, p
        for name, p in self._model_params.items():
            if id(p) not in seen:
                seen.add(id(p))
                yield f"model.{name}", p

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's parameters (unconstrained), detached copies on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self._model_params.items()}

    @torch.no_grad()
    def load_model_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k in self._model_params:
                self._model_params[k].copy_(v)


def _standardize(guide, points, simulator, how, n: int) -> None:
    """Standardise the flow's context (and latents with ``"prior"``) before the first training."""
    if how not in STANDARDIZE:
        raise ValueError(f"standardize must be one of {STANDARDIZE}; got {how!r}")
    if bool(guide.standardized) or how is None:
        return
    if how == "data":
        guide.set_observed_standardization(points.select(torch.arange(min(n, points.num))).values)
    else:
        guide.set_standardization(simulator.simulate_in_chunks(n))


def _resume(joint: JointParameters, guide, checkpoint) -> tuple[int, dict | None]:
    """Restore guide, model parameters and random state from ``checkpoint``: ``(step, optimiser state)``."""
    if not os.path.exists(os.fspath(checkpoint)):
        return 0, None
    payload = read_payload(checkpoint)
    state = payload.get("training")
    if state is None or "model_params" not in state:
        raise ValueError(f"{os.fspath(checkpoint)!r} is not a checkpoint of fit(data=...); resume needs one")
    guide.check_compatible(payload)
    guide.load_payload(payload)
    joint.load_model_state(state["model_params"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), state["optimizer"]


def fit_data(guide, data: Mapping[str, torch.Tensor], *, objective: str = "elbo", num_steps: int = 1000, batch_size: int = 256,
             lr: float = 1e-2, num_particles: int | None = None, standardize: str | None = "data", num_standardization: int = 2048,
             learn_model: bool = True, checkpoint=None, checkpoint_every: int = 100, resume: bool = False,
             **loop_options) -> FitResult:
    """Train the guide, and the model's parameters, on data points (see ``fit(data=...)``).

    Args:
        guide: a ``StructuredGuide``.
        data: observed site -> tensor; see :func:`pyro_struct.likelihood.point_data` for shapes
            (``(N, *site_shape)`` on the flat path, the plate dimension of size ``N`` on the plate path).
        objective: ``"elbo"`` or ``"iwae"``.
        num_particles: draws per data point ``K`` (default 1 for ``"elbo"``, 8 for ``"iwae"``).
        standardize: ``"data"`` (default): the context statistics from the first
            ``num_standardization`` data points, the latents left unstandardised (mean 0, sd 1);
            ``"prior"``: both from simulations of the model at its current parameters (what
            ``fit`` does without data); ``None``: none. Skipped when the guide is already standardised.
        learn_model: also train the model's parameters (default); ``False`` trains the guide only.
        batch_size: data points per step.
        **loop_options: ``lr_schedule``, ``time_budget``, ``clip_grad``, ``weight_decay``,
            ``progress``, ``validation_fraction`` of :func:`~pyro_struct.training.loop.train`/``fit``.

    Returns:
        a :class:`FitResult` of the loss (negative bound, nats per data point) per step.
    """
    if objective not in DATA_OBJECTIVES:
        raise ValueError(f"objective {objective!r} does not learn from data; with data use one of {sorted(DATA_OBJECTIVES)}")
    loss, default_k = DATA_OBJECTIVES[objective]
    k = default_k if num_particles is None else num_particles
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_particles must be a positive int; got {k!r}")
    points = point_data(guide, data)
    simulator = point_simulator(guide)
    params = model_parameters(point_model(guide.model, guide), guide.model_args, guide.model_kwargs) if learn_model else {}
    joint = JointParameters(guide, params)
    _standardize(guide, points, simulator, standardize, num_standardization)
    start, optimizer_state = _resume(joint, guide, checkpoint) if resume else (0, None)
    checkpointer = None
    if checkpoint is not None:
        checkpointer = Checkpointer(checkpoint, checkpoint_every, guide.state_payload, lambda: {"model_params": joint.model_state()})
    validation_fraction = loop_options.pop("validation_fraction", 0.1)
    # shuffled once: the pool's tail is the held-out share, and data files are often sorted
    source = PoolSource(points.select(torch.randperm(points.num)), batch_size, validation_fraction)
    guide.validation_history = []
    advice = f"Try a smaller lr (now {lr:.3g}), a tighter clip_grad, or check that the model's densities stay finite at guide samples."
    return train(joint, lambda batch: loss(guide, simulator, batch.values, k), source, num_steps=num_steps, lr=lr,
                 desc=f"fit[{objective}, data]", history=guide.history, validation_history=guide.validation_history,
                 checkpointer=checkpointer, start_step=start, optimizer_state=optimizer_state, advice=advice, **loop_options)
