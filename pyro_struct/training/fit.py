"""Training an amortised guide on simulations of its model: arguments, standardisation, resume, the loop."""

from __future__ import annotations

import numbers
import os
from typing import Callable, Protocol

import pyro
import torch

from ..io import read_payload
from ..objectives import REVERSE_OBJECTIVES, get_objective
from ..simulation import ModelSimulator, Simulations
from ..threads import torch_threads
from .batches import PoolSource, SimulationSource
from .checkpoint import Checkpointer
from .loop import FitResult, train

__all__ = ["fit", "TrainableGuide"]


class TrainableGuide(Protocol):
    """What :func:`fit` needs from a guide (``StructuredGuide`` has these members)."""

    history: list
    validation_history: list
    standardized: torch.Tensor

    def simulator(self) -> ModelSimulator: ...
    def set_standardization(self, simulations: Simulations) -> None: ...
    def state_payload(self) -> dict: ...
    def load_payload(self, payload: dict) -> None: ...
    def check_compatible(self, payload: dict) -> None: ...
    def parameters(self): ...


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "non-negative" if minimum == 0 else ("positive" if minimum == 1 else f">= {minimum}")
        raise ValueError(f"{name} must be a {kind} int{' or None' if allow_none else ''}; got {value!r}")


def _check_real(name: str, value, *, positive: bool = True, allow_none: bool = False, upper: float | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 if positive else value >= 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} number{' or None' if allow_none else ''}; got {value!r}")
    if upper is not None and not value < upper:
        raise ValueError(f"{name} must be below {upper}; got {value!r}")


def _check_arguments(o: dict) -> None:
    """Every argument of :func:`fit` checked before anything is touched, named in the message."""
    _check_int("num_steps", o["num_steps"], 0)
    _check_int("batch_size", o["batch_size"], 1)
    _check_real("lr", o["lr"])
    _check_int("num_simulations", o["num_simulations"], 2, allow_none=True)
    _check_real("time_budget", o["time_budget"], allow_none=True)
    _check_real("clip_grad", o["clip_grad"], allow_none=True)
    _check_real("weight_decay", o["weight_decay"], positive=False)
    _check_int("num_standardization", o["num_standardization"], 2)
    _check_int("checkpoint_every", o["checkpoint_every"], 1)
    _check_int("seed", o["seed"], 0, allow_none=True)
    _check_int("num_threads", o["num_threads"], 1, allow_none=True)
    v = o["validation_fraction"]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1); got {v!r}")
    if o["resume"] and o["checkpoint"] is None:
        raise ValueError("resume=True needs checkpoint=path (the file to resume from)")


def _advice(name: str, lr: float) -> str:
    tips = [f"Try a smaller lr (now {lr:.3g})", "a tighter clip_grad"]
    if name in REVERSE_OBJECTIVES:
        tips.append("objective='fkl' (which never evaluates the model density at guide samples)")
    return ", ".join(tips) + ", or check that the model's densities stay finite."


def _resume(guide: TrainableGuide, checkpoint) -> tuple[int, dict | None, Simulations | None]:
    """Read and validate a checkpoint, then restore the guide from it: ``(step, optimizer state, pool)``."""
    if not os.path.exists(os.fspath(checkpoint)):
        return 0, None, None
    payload = read_payload(checkpoint)
    state = payload.get("training")
    if state is None:
        raise ValueError(f"{os.fspath(checkpoint)!r} is a saved guide, not a training checkpoint; resume needs a checkpoint")
    guide.check_compatible(payload)  # before anything of the guide is overwritten
    guide.load_payload(payload)
    pool = state.get("pool")
    pool = None if pool is None else Simulations(pool["values"], pool["log_joint"])
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    return int(state["step"]), state["optimizer"], pool


def fit(
    guide: TrainableGuide,
    num_steps: int = 1000,
    objective: str | Callable = "skl",
    batch_size: int = 256,
    lr: float = 1e-2,
    num_simulations: int | None = None,
    lr_schedule: str | Callable | None = "cosine",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    seed: int | None = None,
    clip_grad: float | None = 10.0,
    num_standardization: int = 2048,
    validation_fraction: float = 0.1,
    time_budget: float | None = None,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
) -> FitResult:
    """Train a guide on simulations ``(z, x) ~ p(z, x)`` of its model.

    Args:
        guide: the guide (a :class:`TrainableGuide`, e.g. ``StructuredGuide``).
        num_steps: total optimisation steps (with ``resume``, training continues from the
            checkpoint's step up to this number).
        objective: ``"skl"`` (symmetrised KL, default), ``"fkl"`` (forward KL) or ``"elbo"``
            (amortised negative ELBO); see :mod:`pyro_struct.objectives`.
        batch_size: simulations per step.
        lr: Adam's base learning rate. The default 1e-2 is what the benchmarks support
            (``benchmarks/results/NOTES.md``): with 1e-3 a 3-minute budget left the ecoli70
            guide at 8.8 nats of exact KL, with 1e-2 at 0.005.
        num_simulations: a fixed simulation budget, simulated once and reused over epochs
            (shuffled each epoch); ``None`` draws fresh simulations every step.
        lr_schedule: ``"cosine"`` (default), ``"constant"``/``None`` or ``f(step, num_steps) -> factor``.
        progress: show a tqdm progress bar with the loss.
        checkpoint: a path to write a checkpoint to every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` if that file exists (parameters, optimiser state,
            step, history, simulation budget); the file is validated before the guide is touched.
        seed: seeds Pyro's and torch's random number generators first.
        clip_grad: maximum gradient norm, positive (``None``: no clipping).
        time_budget: a wall-clock budget in seconds: training stops after the step that
            exhausts it (or at ``num_steps``), and the learning-rate schedule follows whichever
            budget runs out first, so it completes either way.
        validation_fraction: with ``num_simulations``, the share of the budget held out: its
            loss is evaluated after every epoch (``guide.validation_history``) and the
            parameters with the best one are restored at the end (early stopping, as sbi does).
        weight_decay: decoupled weight decay (AdamW) of the conditioners' weight matrices; the
            linear skips and biases are not decayed. A regulariser for small fixed budgets
            (0.3 lowered the exact KL with 5,000 simulations by 10-40%,
            ``benchmarks/results/NOTES.md``); it biases non-linear posteriors, so the default is 0.
        num_standardization: simulations used for the context/latent standardisation, the first
            time a guide is trained (with ``num_simulations``, the budget is used instead).
        num_threads: torch threads while training (default :data:`pyro_struct.threads.DEFAULT_NUM_THREADS`,
            or ``$PYRO_STRUCT_THREADS``); the caller's setting is restored afterwards.

    Returns:
        a :class:`~pyro_struct.training.loop.FitResult`: the loss per step over every fit of this
        guide (also ``guide.history``), with ``validation_history``. With ``"skl"`` a loss
        estimates the expected symmetrised KL in nats; with ``"fkl"`` the expected negative
        log-likelihood of the simulated latents; with ``"elbo"`` the expected negative ELBO.

    Raises:
        ValueError: a bad argument (named in the message), or a checkpoint for another model.
        TrainingError: a non-finite loss or gradient; the parameters of the last step with a
            finite loss and gradient are restored and ``guide.history`` keeps the losses so far.
    """
    options = dict(locals())
    loss_fn = get_objective(objective)
    _check_arguments(options)
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    with torch_threads(num_threads):
        if seed is not None:
            pyro.set_rng_seed(seed)
        simulator = guide.simulator()
        simulator.prepare()  # before any restored random state: deciding consumes random numbers
        start, optimizer_state, pool = _resume(guide, checkpoint) if resume else (0, None, None)
        if pool is None and num_simulations is not None:
            pool = simulator.simulate_in_chunks(num_simulations)
        if not bool(guide.standardized):
            guide.set_standardization(pool if pool is not None else simulator.simulate_in_chunks(num_standardization))
        source = SimulationSource(simulator, batch_size) if pool is None else PoolSource(pool, batch_size, validation_fraction)
        checkpointer = None
        if checkpoint is not None:
            extra = None if pool is None else (lambda: {"pool": {"values": dict(pool), "log_joint": pool.log_joint}})
            checkpointer = Checkpointer(checkpoint, checkpoint_every, guide.state_payload, extra)
        guide.validation_history = []
        return train(
            guide, lambda batch: loss_fn(guide, simulator, batch), source,
            num_steps=num_steps, lr=lr, lr_schedule=lr_schedule, time_budget=time_budget, clip_grad=clip_grad,
            weight_decay=weight_decay, progress=progress, desc=f"fit[{name}]", history=guide.history,
            validation_history=guide.validation_history, checkpointer=checkpointer, start_step=start,
            optimizer_state=optimizer_state, advice=_advice(name, lr),
        )
