"""The torch thread count used while pyro_struct trains or samples, restored afterwards."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["DEFAULT_NUM_THREADS", "torch_threads"]

#: Threads for training and sampling when the user does not choose (``PYRO_STRUCT_THREADS``
#: overrides). The networks are small: on the 2-core development machine one thread trained the
#: README quickstart in ~30 s where torch's default (2 threads) took 7.5 minutes on a busy machine.
DEFAULT_NUM_THREADS = 1


@contextlib.contextmanager
def torch_threads(num_threads: int | None = None):
    """Run the block with ``num_threads`` torch threads and restore the caller's setting after.

    Args:
        num_threads: threads to use; ``None`` takes ``$PYRO_STRUCT_THREADS``, else
            :data:`DEFAULT_NUM_THREADS`.
    """
    if num_threads is None:
        num_threads = int(os.environ.get("PYRO_STRUCT_THREADS", DEFAULT_NUM_THREADS))
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int; got {num_threads!r}")
    before = torch.get_num_threads()
    if before != num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
