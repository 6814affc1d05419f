"""The learning-rate schedule and the wall-clock budget of a training run."""

from __future__ import annotations

import math
import time
from typing import Callable

__all__ = ["learning_rate_factor", "Schedule", "DEFAULT_NUM_STEPS", "UNBOUNDED_STEPS", "resolve_num_steps"]

#: steps of ``fit()`` when neither ``num_steps`` nor ``time_budget`` is given
DEFAULT_NUM_STEPS = 1000
#: the step limit of a fit given only a ``time_budget`` (the clock stops it long before)
UNBOUNDED_STEPS = 2**31 - 1


def resolve_num_steps(num_steps: int | None, time_budget: float | None) -> int:
    """``num_steps`` as given; ``None``: :data:`DEFAULT_NUM_STEPS`, or with a time budget no step limit
    (:data:`UNBOUNDED_STEPS`), so that ``fit(time_budget=60)`` trains for 60 s whatever a step costs."""
    if num_steps is not None:
        return num_steps
    return DEFAULT_NUM_STEPS if time_budget is None else UNBOUNDED_STEPS


def learning_rate_factor(schedule: str | Callable | None, step: float, num_steps: int) -> float:
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


class Schedule:
    """Learning rate per step and when to stop: after ``num_steps`` or once ``time_budget`` seconds
    have passed, whichever comes first. With a time budget the schedule follows whichever budget
    runs out first, so the decay completes either way.
    """

    def __init__(self, lr: float, lr_schedule, num_steps: int, time_budget: float | None = None):
        learning_rate_factor(lr_schedule, 0, max(num_steps, 1))  # validates the schedule early
        self.lr = float(lr)
        self.lr_schedule = lr_schedule
        self.num_steps = int(num_steps)
        self.time_budget = time_budget
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.time_budget is not None and self.elapsed >= self.time_budget

    def progress(self, step: int) -> float:
        """How far training has come at ``step``, in ``[0, 1]``: the larger of the steps' and (with a
        time budget) the clock's fraction."""
        done = step / max(self.num_steps, 1)
        if self.time_budget is not None:
            done = max(done, self.elapsed / self.time_budget)
        return min(done, 1.0)

    def learning_rate(self, step: int) -> float:
        if self.time_budget is None or callable(self.lr_schedule):
            return self.lr * learning_rate_factor(self.lr_schedule, step, self.num_steps)
        return self.lr * learning_rate_factor(self.lr_schedule, self.progress(step), 1)
