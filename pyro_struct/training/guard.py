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

    Args:
        params: the trained parameters.
        advice: what to suggest in the error message.
    """

    def __init__(self, params: list[torch.Tensor], advice: str = ""):
        self.params = params
        self.advice = advice
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

    def check_gradient(self, norm: torch.Tensor, value: float, step: int, name: str, num_losses: int) -> None:
        if not torch.isfinite(norm):
            self.fail(f"the gradient of the {name!r} loss is not finite at step {step} (loss {value:.4g})", num_losses)

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
