"""The training loop of amortised guides: simulations, Adam with a schedule, progress bar, checkpoints."""

from __future__ import annotations

import math
import time
import os
from typing import Callable

import pyro
import torch
from tqdm import tqdm

from .objectives import Simulations, get_objective

__all__ = ["fit", "TrainingError", "learning_rate_factor"]


class TrainingError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the last good parameters were restored."""


def learning_rate_factor(schedule: str | Callable | None, step: int, num_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``num_steps``.

    ``"cosine"`` decays from 1 to 0.01 along a half cosine; ``None``/``"constant"`` keeps 1;
    a callable ``schedule(step, num_steps) -> float`` is used as is.
    """
    if schedule is None or schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(step / max(num_steps, 1), 1.0)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))
    if callable(schedule):
        return float(schedule(step, num_steps))
    raise ValueError(f"unknown lr_schedule {schedule!r}; use 'cosine', 'constant', None or a callable (step, num_steps) -> factor")


def _simulate_in_chunks(simulator, n: int, chunk: int = 4096) -> Simulations:
    parts = [simulator.simulate(min(chunk, n - i)) for i in range(0, n, chunk)]
    return parts[0] if len(parts) == 1 else Simulations.concat(parts)


def _pool_to_payload(pool: Simulations | None):
    return None if pool is None else {"values": dict(pool), "log_joint": pool.log_joint}


def _pool_from_payload(payload) -> Simulations | None:
    return None if payload is None else Simulations(payload["values"], payload["log_joint"])


def _optimizer(guide, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam; with ``weight_decay``, AdamW decaying only weight matrices outside the linear skips."""
    if not weight_decay:
        return torch.optim.Adam(params, lr=lr)
    names = {id(p): name for name, p in guide.named_parameters()}
    decayed = [p for p in params if p.dim() >= 2 and ".skip." not in f".{names.get(id(p), '')}"]
    chosen = {id(p) for p in decayed}
    rest = [p for p in params if id(p) not in chosen]
    groups = [{"params": decayed, "weight_decay": float(weight_decay)}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def fit(
    guide,
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
) -> list[float]:
    """Train a :class:`~pyro_struct.StructuredGuide` on simulations ``(z, x) ~ p(z, x)`` of its model.

    Args:
        guide: the guide.
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
            step, history, simulation budget).
        seed: seeds Pyro's and torch's random number generators first.
        clip_grad: maximum gradient norm (``None``: no clipping).
        time_budget: a wall-clock budget in seconds: training stops after the step that
            exhausts it (or at ``num_steps``), and the learning-rate schedule follows whichever
            budget runs out first, so it completes either way.
        validation_fraction: with ``num_simulations``, the share of the budget held out: its
            loss is evaluated after every epoch (``guide.validation_history``) and the
            parameters with the best one are restored at the end, so a small budget is not
            over-fitted (early stopping, as sbi does). ``0`` trains on the whole budget.
        weight_decay: decoupled weight decay (AdamW) of the conditioners' weight matrices; the
            linear skip connections and the biases are not decayed, so the decay pulls each
            conditioner towards its linear part. A regulariser for small fixed budgets
            (``num_simulations``): on the linear-Gaussian benchmarks 0.3 lowered the exact
            KL with 5,000 simulations by 10-40% (``benchmarks/results/NOTES.md``). It biases
            non-linear posteriors, so the default is 0.
        num_standardization: simulations used for the context/latent standardisation, the first
            time a guide is trained (with ``num_simulations``, the budget is used instead).

    Returns:
        the loss history: one float per step, over every ``fit`` of this guide (also in
        ``guide.history``). With ``"skl"`` a loss is an estimate of the expected symmetrised KL
        in nats; with ``"fkl"`` the expected negative log-likelihood of the simulated latents;
        with ``"elbo"`` the expected negative ELBO.

    Raises:
        TrainingError: a non-finite loss or gradient; the parameters that last gave a finite
            loss are restored and ``guide.history`` keeps the losses so far.
    """
    loss_fn = get_objective(objective)
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int; got {num_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr!r}")
    if num_simulations is not None and (not isinstance(num_simulations, int) or num_simulations < 1):
        raise ValueError(f"num_simulations must be a positive int or None; got {num_simulations!r}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be a positive number of seconds; got {time_budget!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative number; got {weight_decay!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=path (the file to resume from)")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1; got {checkpoint_every}")
    learning_rate_factor(lr_schedule, 0, max(num_steps, 1))  # validates the schedule early
    if seed is not None:
        pyro.set_rng_seed(seed)

    from .guide import atomic_save

    simulator = guide.simulator()
    # before any restored random state: deciding consumes random numbers the first time
    simulator.prepare()
    params = [p for p in guide.parameters() if p.requires_grad]
    optimizer = _optimizer(guide, params, lr, weight_decay)
    start, pool = 0, None

    if resume and os.path.exists(os.fspath(checkpoint)):
        payload = guide.read_file(checkpoint)
        guide.load_payload(payload)
        state = payload.get("training")
        if state is None:
            raise ValueError(f"{os.fspath(checkpoint)!r} is a saved guide, not a training checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        pool = _pool_from_payload(state.get("pool"))
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])

    if pool is None and num_simulations is not None:
        pool = _simulate_in_chunks(simulator, num_simulations)
    if not bool(guide.standardized):
        guide.set_standardization(pool if pool is not None else _simulate_in_chunks(simulator, num_standardization))

    order, cursor = None, 0
    train_pool, validation = pool, None
    if pool is not None:
        n_val = int(round(validation_fraction * pool.num))
        if 0 < n_val < pool.num:
            # the pool is in simulation order, i.e. random: its tail is a fair held-out set
            train_pool = pool.select(torch.arange(pool.num - n_val))
            validation = pool.select(torch.arange(pool.num - n_val, pool.num))
    steps_per_epoch = None if train_pool is None else max(1, train_pool.num // min(batch_size, train_pool.num))
    best_loss, best_params = math.inf, None
    guide.validation_history = []

    def next_batch() -> Simulations:
        nonlocal order, cursor
        if train_pool is None:
            return simulator.simulate(batch_size)
        if order is None or cursor + batch_size > train_pool.num:
            order, cursor = torch.randperm(train_pool.num), 0
        idx = order[cursor : cursor + min(batch_size, train_pool.num)]
        cursor += len(idx)
        return train_pool.select(idx)

    def validate() -> None:
        nonlocal best_loss, best_params
        with torch.no_grad():
            value = float(loss_fn(guide, simulator, validation))
        guide.validation_history.append(value)
        if math.isfinite(value) and value < best_loss:
            best_loss, best_params = value, [p.detach().clone() for p in params]

    def write_checkpoint(step: int) -> None:
        payload = guide.state_payload()
        payload["training"] = {
            "step": step,
            "num_steps": num_steps,
            "objective": objective if isinstance(objective, str) else getattr(objective, "__name__", "custom"),
            "optimizer": optimizer.state_dict(),
            "pool": _pool_to_payload(pool),
            "rng": torch.get_rng_state(),
        }
        atomic_save(payload, checkpoint)

    was_training = guide.training
    guide.train(True)
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    bar = tqdm(total=num_steps, initial=min(start, num_steps), disable=not progress, desc=f"fit[{name}]", dynamic_ncols=True)
    smoothed, last_good = None, None
    try:
        started = time.perf_counter()
        end_step = num_steps
        for step in range(start, num_steps):
            elapsed = time.perf_counter() - started
            if time_budget is not None and elapsed >= time_budget:
                end_step = step
                if validation is not None and step > start:
                    validate()  # the final parameters compete with the best ones too
                break
            if time_budget is None or callable(lr_schedule):
                factor = learning_rate_factor(lr_schedule, step, num_steps)
            else:
                factor = learning_rate_factor(lr_schedule, max(step / max(num_steps, 1), elapsed / time_budget), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            loss = loss_fn(guide, simulator, next_batch())
            value = float(loss.detach())
            if not math.isfinite(value):
                if last_good is not None:
                    with torch.no_grad():
                        for p, g in zip(params, last_good):
                            p.copy_(g)
                raise TrainingError(
                    f"the {name!r} loss is {value} at step {step}; training stopped and the parameters that gave "
                    f"the last finite loss are restored (guide.history keeps the {len(guide.history)} losses so "
                    f"far). Try a smaller lr (now {lr * factor:.3g}), a tighter clip_grad, objective='fkl' "
                    "(which never evaluates the model density at guide samples), or check that the model's "
                    "densities stay finite."
                )
            # these parameters gave a finite loss: a later non-finite loss restores them
            last_good = [p.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
            else:
                grads = [p.grad.norm() for p in params if p.grad is not None]
                norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
            if not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"the gradient of the {name!r} loss is not finite at step {step} (loss {value:.4g}); training "
                    "stopped before updating, so the parameters that gave that finite loss are in place. Try a "
                    f"smaller lr (now {lr * factor:.3g}) or objective='fkl'."
                )
            optimizer.step()
            guide.history.append(value)
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            bar.set_postfix(loss=f"{smoothed:.4g}", refresh=False)
            bar.update(1)
            if validation is not None and ((step + 1) % steps_per_epoch == 0 or step + 1 == num_steps):
                validate()
            if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                write_checkpoint(step + 1)
        if best_params is not None and guide.validation_history[-1] > best_loss:
            with torch.no_grad():
                for p, b in zip(params, best_params):
                    p.copy_(b)
    finally:
        bar.close()
        guide.train(was_training)
    if checkpoint is not None and end_step > start:
        write_checkpoint(end_step)
    return list(guide.history)
