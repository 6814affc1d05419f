"""The non-finite guard: stop on a non-finite loss or gradient with the last good parameters restored."""

from __future__ import annotations

import math

import torch

__all__ = ["TrainingError", "NonFiniteGuard"]


class TrainingError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the last good parameters were restored."""


class NonFiniteGuard:
    """Keeps the parameters of the last step whose loss and gradient were both finite.

    Call :meth:`accept` before each optimiser update that passed both checks; :meth:`fail`
    restores those parameters and raises. So after a failure the parameters are the ones that
    gave a finite loss *and* a finite gradient, not the ones an exploding update produced.

    A step with a finite loss but a non-finite gradient is *skipped* (no update; the batch is
    dropped) up to ``patience`` times in a row before training stops: a density that is finite at a
    sample but whose derivative overflows in float32 (stochastic volatility: a scale of 1e-15 gives
    ``log p = -1e30`` and a ``var**2`` that underflows to 0) spoils one batch, not the training.

    Args:
        params: the trained parameters.
        advice: what to suggest in the error message.
        patience: consecutive steps with a non-finite gradient skipped before stopping (0: stop at the first).

    Attributes:
        skipped: steps skipped so far.
    """

    def __init__(self, params: list[torch.Tensor], advice: str = "", patience: int = 10):
        self.params = params
        self.advice = advice
        self.patience = int(patience)
        self.skipped = 0
        self._in_a_row = 0
        self._good: list[torch.Tensor] | None = None

    def accept(self) -> None:
        with torch.no_grad():
            if self._good is None:
                self._good = [p.detach().clone() for p in self.params]
            else:
                for g, p in zip(self._good, self.params):
                    g.copy_(p)

    def restore(self) -> bool:
        """Put the last good parameters back; ``False`` when there are none yet."""
        if self._good is None:
            return False
        with torch.no_grad():
            for p, g in zip(self.params, self._good):
                p.copy_(g)
        return True

    def check_loss(self, value: float, step: int, name: str, num_losses: int) -> None:
        if not math.isfinite(value):
            self.fail(f"the {name!r} loss is {value} at step {step}", num_losses)

    def check_gradient(self, norm: torch.Tensor, value: float, step: int, name: str, num_losses: int) -> bool:
        """``True``: update; ``False``: skip this step (a non-finite gradient, within ``patience``); raises after that."""
        if torch.isfinite(norm):
            self._in_a_row = 0
            return True
        self._in_a_row += 1
        if self._in_a_row > self.patience:
            self.fail(f"the gradient of the {name!r} loss is not finite at step {step} (loss {value:.4g}"
                      f"{f', the last {self._in_a_row} steps in a row' if self._in_a_row > 1 else ''})", num_losses)
        self.skipped += 1
        return False

    def fail(self, what: str, num_losses: int) -> None:
        restored = self.restore()
        state = (
            "the parameters of the last step with a finite loss and gradient are restored"
            if restored else "no step had succeeded yet, so the initial parameters are in place"
        )
        raise TrainingError(
            f"{what}; training stopped and {state} (the history keeps the {num_losses} losses so far). "
            f"{self.advice}".strip()
        )
