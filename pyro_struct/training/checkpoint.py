"""Training checkpoints: the trained object's payload plus the loop's state, written atomically."""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..io import atomic_save

__all__ = ["Checkpointer"]


class Checkpointer:
    """Writes ``payload() | {"training": state}`` to ``path`` every ``every`` steps and at the end.

    Args:
        path: the checkpoint file.
        every: steps between checkpoints.
        payload: returns the trained object's payload (e.g. ``guide.state_payload``).
        extra: returns more training state to store (e.g. a simulation pool).
    """

    def __init__(self, path: str | os.PathLike, every: int, payload: Callable[[], dict], extra: Callable[[], dict] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive int; got {every!r}")
        self.path = os.fspath(path)
        self.every = every
        self.payload = payload
        self.extra = extra

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, step: int, num_steps: int, optimizer: torch.optim.Optimizer, name: str) -> None:
        payload = self.payload()
        payload["training"] = {
            "step": step,
            "num_steps": num_steps,
            "objective": name,
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            **(self.extra() if self.extra is not None else {}),
        }
        atomic_save(payload, self.path)
