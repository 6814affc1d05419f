"""The generic training loop: Adam(W) with a schedule, clipping, the non-finite guard, validation and checkpoints."""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm

from .batches import BatchSource
from .checkpoint import Checkpointer
from .guard import NonFiniteGuard
from .schedule import UNBOUNDED_STEPS, Schedule

__all__ = ["FitResult", "train", "make_optimizer"]


class FitResult(list):
    """The per-step training losses (a ``list`` of floats, over every fit of the trained object).

    Attributes:
        history: the same losses (``self``).
        validation_history: held-out losses, one per epoch (fixed pools only).
        num_steps: steps run by this call.
        seconds: wall-clock seconds of this call.
        stopped_by: ``"num_steps"`` or ``"time_budget"``.
        local_losses: this call's losses on this process's own batches; under data parallelism
            ``history`` holds the mean over ranks, these are this rank's share of it.
        checks: the diagnostics run after training (name -> one-line result; see
            ``StructuredGuide.fit(checks=...)``); empty when none were run.
        skipped_steps: steps of this call whose gradient was not finite, skipped without an update
            (see :class:`~pyro_struct.training.guard.NonFiniteGuard`).
    """

    def __init__(self, history, validation_history=(), num_steps: int = 0, seconds: float = 0.0, stopped_by: str = "num_steps",
                 local_losses=None):
        super().__init__(float(h) for h in history)
        self.local_losses = [float(v) for v in (local_losses if local_losses is not None else list(self)[len(self) - int(num_steps):])]
        self.validation_history = [float(v) for v in validation_history]
        self.num_steps = int(num_steps)
        self.seconds = float(seconds)
        self.stopped_by = stopped_by
        self.checks: dict[str, str] = {}
        self.skipped_steps = 0

    @property
    def history(self) -> list[float]:
        return list(self)

    def report(self) -> str:
        """The training report: steps, time, what stopped it, the final loss and which checks ran."""
        tail = self.local_losses[-max(1, len(self.local_losses) // 10):]
        final = f", final loss {sum(tail) / len(tail):.4g} (mean of the last {len(tail)} steps)" if tail else ""
        skipped = f"; {self.skipped_steps} skipped for a non-finite gradient" if self.skipped_steps else ""
        lines = [f"{self.num_steps} steps in {self.seconds:.1f} s (stopped by {self.stopped_by}){final}{skipped}"]
        if self.checks:
            lines += [f"check {name}: {text}" for name, text in self.checks.items()]
        else:
            lines.append("checks run: none (fit(checks=('skl', 'calibration')) runs them; post.importance(n) per observation)")
        return "\n".join(lines)


def make_optimizer(module: torch.nn.Module, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam; with ``weight_decay``, AdamW decaying only weight matrices outside linear skips."""
    if not weight_decay:
        return torch.optim.Adam(params, lr=lr)
    names = {id(p): name for name, p in module.named_parameters()}
    decayed = [p for p in params if p.dim() >= 2 and ".skip." not in f".{names.get(id(p), '')}"]
    chosen = {id(p) for p in decayed}
    rest = [p for p in params if id(p) not in chosen]
    groups = [{"params": decayed, "weight_decay": float(weight_decay)}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class _Validation:
    """Held-out loss per epoch; remembers the parameters with the best one (early stopping)."""

    def __init__(self, loss_fn: Callable, pool, params: list, history: list, reduce: Callable = float):
        self.loss_fn, self.pool, self.params, self.history = loss_fn, pool, params, history
        self.reduce = reduce  # the mean over ranks under data parallelism, so every rank decides alike
        self.best, self.best_params = math.inf, None

    def __call__(self) -> None:
        with torch.no_grad():
            value = self.reduce(float(self.loss_fn(self.pool)))
        self.history.append(value)
        if math.isfinite(value) and value < self.best:
            self.best, self.best_params = value, [p.detach().clone() for p in self.params]

    def restore_best(self) -> None:
        if self.best_params is not None and self.history and self.history[-1] > self.best:
            with torch.no_grad():
                for p, b in zip(self.params, self.best_params):
                    p.copy_(b)


def _gradient_norm(params: list, clip_grad: float | None) -> torch.Tensor:
    if clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip_grad)
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def train(
    module: torch.nn.Module,
    loss_fn: Callable,
    source: BatchSource,
    *,
    num_steps: int,
    lr: float = 1e-2,
    lr_schedule="cosine",
    time_budget: float | None = None,
    clip_grad: float | None = 10.0,
    weight_decay: float = 0.0,
    progress: bool = True,
    desc: str = "fit",
    history: list | None = None,
    validation_history: list | None = None,
    checkpointer: Checkpointer | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    advice: str = "",
    sync=None,
) -> FitResult:
    """Minimise ``loss_fn(batch)`` over ``module``'s trainable parameters.

    Args:
        module: owns the parameters (all with ``requires_grad`` are trained).
        loss_fn: ``batch -> scalar tensor``.
        source: a :class:`~pyro_struct.training.batches.BatchSource`; with a ``validation`` pool the
            held-out loss is evaluated every epoch and the best parameters are restored at the end.
        num_steps: total steps (training continues from ``start_step``).
        lr, lr_schedule, time_budget: see :class:`~pyro_struct.training.schedule.Schedule`.
        clip_grad: maximum gradient norm (``None``: no clipping).
        weight_decay: AdamW decay of weight matrices (not of skips and biases).
        progress: show a tqdm bar.
        desc: the bar's label and the loss's name in messages.
        history, validation_history: lists to append the losses to (kept on failure).
        checkpointer: writes checkpoints (every ``checkpointer.every`` steps and at the end).
        start_step, optimizer_state: resume from a checkpoint.
        advice: appended to a :class:`~pyro_struct.training.guard.TrainingError`'s message.
        sync: a :class:`~pyro_struct.training.distributed.DataParallel` for data-parallel training
            (gradients, losses and the clock averaged/agreed over ranks; only its main rank shows
            progress and writes checkpoint files), or ``None`` for one process.

    Returns:
        a :class:`FitResult` over ``history``.

    Raises:
        TrainingError: a non-finite loss, or a non-finite gradient at more than 10 steps in a row
            (single such steps are skipped); the last good parameters are restored.
    """
    history = [] if history is None else history
    validation_history = [] if validation_history is None else validation_history
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(module, params, lr, weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    schedule = Schedule(lr, lr_schedule, num_steps, time_budget) if sync is None else sync.schedule(lr, lr_schedule, num_steps, time_budget)
    guard = NonFiniteGuard(params, advice)
    reduce = float if sync is None else sync.mean
    validate = _Validation(loss_fn, source.validation, params, validation_history, reduce) if source.validation is not None else None
    show = progress and (sync is None or sync.is_main)
    # (a fit bounded by its time budget only has no step total to show)
    total = None if num_steps >= UNBOUNDED_STEPS else num_steps
    bar = tqdm(total=total, initial=min(start_step, num_steps), disable=not show, desc=desc, dynamic_ncols=True)
    end_step, stopped_by, smoothed, local = num_steps, "num_steps", None, []
    was_training = module.training
    module.train(True)
    # submodules that adapt to training progress (e.g. a CNF's solver-tolerance schedule)
    followers = [m for m in module.modules() if callable(getattr(m, "set_training_progress", None))]
    try:
        for step in range(start_step, num_steps):
            if schedule.out_of_time():
                end_step, stopped_by = step, "time_budget"
                if validate is not None and step > start_step:
                    validate()  # the final parameters compete with the best ones too
                break
            for group in optimizer.param_groups:
                group["lr"] = schedule.learning_rate(step)
            for m in followers:
                m.set_training_progress(schedule.progress(step))
            loss = loss_fn(source.next_batch())
            value = float(loss.detach())
            if sync is None:
                guard.check_loss(value, step, desc, len(history))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sync is not None:
                # after backward: every rank must reach the all-reduce, whatever its own loss
                local.append(value)
                value = sync.average(params, value, schedule)
                guard.check_loss(value, step, desc, len(history))
            if guard.check_gradient(_gradient_norm(params, clip_grad), value, step, desc, len(history)):
                guard.accept()
                optimizer.step()
            # (a skipped step still counts: the step count and the global step stay those of the batches drawn)
            history.append(value)
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            bar.set_postfix(loss=f"{smoothed:.4g}", refresh=False)
            bar.update(1)
            if validate is not None and ((step + 1) % source.steps_per_epoch == 0 or step + 1 == num_steps):
                validate()
            if checkpointer is not None and checkpointer.due(step + 1):
                checkpointer.write(step + 1, num_steps, optimizer, desc)
        if validate is not None:
            validate.restore_best()
    finally:
        bar.close()
        module.train(was_training)
        for m in followers:
            m.set_training_progress(None)
    if checkpointer is not None and end_step > start_step:
        checkpointer.write(end_step, num_steps, optimizer, desc)
    ran = max(end_step - start_step, 0)
    result = FitResult(history, validation_history, ran, schedule.elapsed, stopped_by, local if sync is not None else None)
    result.skipped_steps = guard.skipped
    return result
