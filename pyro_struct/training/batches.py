"""Where training batches come from: fresh simulations every step, or a fixed pool with a held-out split."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["Pool", "TensorPool", "PoolSource", "SimulationSource", "BatchSource"]


class Pool(Protocol):
    """A fixed set of training examples (``Simulations`` and :class:`TensorPool` are pools)."""

    @property
    def num(self) -> int:
        """Number of examples."""

    def select(self, index: torch.Tensor) -> "Pool":
        """The examples at ``index``."""


class BatchSource(Protocol):
    """What the training loop draws from: ``next_batch()``, an optional ``validation`` pool and
    ``steps_per_epoch`` (``None`` for an endless stream)."""

    validation: Pool | None
    steps_per_epoch: int | None

    def next_batch(self): ...


class TensorPool:
    """Rows of a tensor ``(n, ...)`` as a :class:`Pool`."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    @property
    def num(self) -> int:
        return int(self.data.shape[0])

    def select(self, index: torch.Tensor) -> "TensorPool":
        return TensorPool(self.data[index])


class SimulationSource:
    """Fresh simulations every step: ``simulator.simulate(batch_size)``."""

    validation = None
    steps_per_epoch = None

    def __init__(self, simulator, batch_size: int):
        self.simulator = simulator
        self.batch_size = int(batch_size)

    def next_batch(self):
        return self.simulator.simulate(self.batch_size)


class PoolSource:
    """Shuffled epochs over a fixed pool; the pool's tail share is held out for validation.

    The pool is taken to be in random order (simulations are), so its tail is a fair held-out set.

    Args:
        pool: the examples.
        batch_size: examples per step (at most the training share).
        validation_fraction: share held out (``0``: none).
    """

    def __init__(self, pool: Pool, batch_size: int, validation_fraction: float = 0.1):
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}")
        self.pool = pool
        n_val = int(round(validation_fraction * pool.num))
        self.train, self.validation = pool, None
        if 0 < n_val < pool.num:
            self.train = pool.select(torch.arange(pool.num - n_val))
            self.validation = pool.select(torch.arange(pool.num - n_val, pool.num))
        self.batch_size = min(int(batch_size), self.train.num)
        self.steps_per_epoch = max(1, self.train.num // self.batch_size)
        self._order, self._cursor = None, 0

    def next_batch(self):
        if self._order is None or self._cursor + self.batch_size > self.train.num:
            self._order, self._cursor = torch.randperm(self.train.num), 0
        idx = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += len(idx)
        return self.train.select(idx)
