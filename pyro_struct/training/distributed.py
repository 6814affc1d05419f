"""Data-parallel training over ``torch.distributed`` ranks, and the ``torchrun`` launcher of ``pyro-struct fit --nproc``.

When ``torch.distributed`` is initialised (for example under ``torchrun --nproc_per_node=K``;
:func:`init_from_environment` initialises it from torchrun's variables), :func:`pyro_struct.training.fit`
trains data-parallel through a :class:`DataParallel`:

- each rank draws its own simulations, seeded by :func:`rank_seed` (``seed`` and the rank);
- rank 0's parameters and buffers are broadcast first, so every rank starts and ends identical;
- standardisation statistics are computed from the simulations of every rank (gathered);
- a fixed budget ``num_simulations=N`` is sharded: each rank simulates ``N // world_size``;
- after each backward pass one all-reduce averages the gradients and, in the same buffer, the
  loss and rank 0's clock: every rank then sees the same gradient (so the same clipping and the
  same gradient guard), the same mean loss (so any rank's non-finite loss stops every rank) and
  rank 0's elapsed time (so the learning-rate schedule and the time-budget stop agree);
- only rank 0 writes checkpoint files and shows the progress bar.

Why an explicit all-reduce rather than ``DistributedDataParallel``: the objectives never call
the guide's ``forward`` (they call ``guide.log_q`` / ``guide.rsample_q``), and DDP only
synchronises gradients of computations that go through the wrapper's ``forward``. An explicit
all-reduce also keeps the guide a plain module (no ``module.`` prefix in its ``state_dict``, so the
non-finite guard, validation restore and checkpoints work on it unchanged), and it lets one
collective per step carry the loss and the clock as well. What it gives up, overlapping
communication with the backward pass, matters little for networks of this size.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..simulation import Simulations
from .schedule import Schedule

__all__ = [
    "DataParallel",
    "AgreedSchedule",
    "rank_seed",
    "is_initialized",
    "is_main",
    "init_from_environment",
    "data_parallel",
    "launch",
    "torchrun_command",
]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank`` in a run seeded with ``seed``: ``seed`` itself on rank 0 (so one process
    reproduces an undistributed run), a hash of ``(seed, rank)`` below ``2**32`` on the others."""
    if rank == 0:
        return int(seed)
    digest = hashlib.sha256(f"pyro_struct:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Whether this process is rank 0, or the only process (the one that should write files)."""
    return not is_initialized() or dist.get_rank() == 0


def init_from_environment(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's variables (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when they are set and no group exists yet.

    The backend is NCCL for a CUDA ``device``, gloo otherwise. Returns whether a group is
    initialised afterwards.
    """
    if is_initialized():
        return True
    env = os.environ
    if not dist.is_available() or int(env.get("WORLD_SIZE", "1")) < 2 or "MASTER_ADDR" not in env:
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and "LOCAL_RANK" in env:
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


class AgreedSchedule(Schedule):
    """A :class:`~pyro_struct.training.schedule.Schedule` whose clock is the one every rank agreed
    on (rank 0's elapsed seconds, set by :meth:`DataParallel.average` each step), so that the
    learning rate and the time-budget stop are the same on every rank."""

    def __init__(self, lr: float, lr_schedule, num_steps: int, time_budget: float | None = None):
        super().__init__(lr, lr_schedule, num_steps, time_budget)
        self.agreed = 0.0

    @property
    def elapsed(self) -> float:
        return self.agreed

    def local_elapsed(self) -> float:
        """This process's own wall-clock seconds since the schedule started."""
        return time.perf_counter() - self.started


class DataParallel:
    """The collectives of data-parallel training over the default process group.

    Attributes:
        rank, world_size: this process's rank and the number of ranks.
        is_main: ``rank == 0`` (the rank that writes files and shows progress).
    """

    def __init__(self):
        if not is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group (torch.distributed.init_process_group)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0

    def _device(self) -> torch.device:
        """Where collective buffers live: CUDA under NCCL, the CPU otherwise."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def schedule(self, lr: float, lr_schedule, num_steps: int, time_budget: float | None) -> AgreedSchedule:
        """The schedule of the training loop, with the agreed clock."""
        return AgreedSchedule(lr, lr_schedule, num_steps, time_budget)

    def average(self, params: Sequence[torch.Tensor], loss: float, schedule: AgreedSchedule) -> float:
        """Average the gradients of ``params`` over ranks in place, and return the mean ``loss``.

        One all-reduce carries every gradient (a missing one counts as zero), the loss and rank
        0's clock, which is stored in ``schedule.agreed``. The mean of the losses is non-finite
        when any rank's is, so every rank's guard stops together.
        """
        ref = params[0] if params else torch.zeros(())
        dev, dtype = self._device(), ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        clock = schedule.local_elapsed() if self.is_main else 0.0
        scalars = torch.tensor([loss, clock], dtype=dtype, device=dev)
        flat = torch.cat([g.detach().reshape(-1).to(dev, dtype) for g in grads] + [scalars])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset : offset + n] / self.world_size).reshape(p.shape).to(p.device, p.dtype)
            offset += n
        schedule.agreed = float(flat[-1])
        return float(flat[-2]) / self.world_size

    def mean(self, value: float) -> float:
        """The mean of a number over ranks (held-out losses)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t) / self.world_size

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        dev = self._device()
        for t in list(module.parameters()) + list(module.buffers()):
            # gloo has no bool collectives (the guide's ``standardized`` flag)
            buf = t.detach().to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype)
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device, t.dtype))

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (any picklable object, e.g. simulations)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read next)."""
        dist.barrier()

    def gather_simulations(self, sims: Simulations) -> Simulations:
        """The simulations of every rank, concatenated in rank order, on ``sims``' device
        (sent through the CPU: a pickled CUDA tensor would arrive on the sender's device index)."""
        device = sims.log_joint.device
        cpu = Simulations({k: v.cpu() for k, v in sims.items()}, sims.log_joint.cpu())
        parts = self.gather(cpu)
        whole = Simulations.concat(parts)
        return Simulations({k: v.to(device) for k, v in whole.items()}, whole.log_joint.to(device))

    def shard(self, total: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of ``total`` items in equal shards of ``total // world_size``
        (the remainder, fewer than ``world_size`` items, is left out so every rank runs the same
        number of steps per epoch)."""
        per = total // self.world_size
        if per < 2:
            raise ValueError(
                f"num_simulations={total} gives {per} simulation(s) per rank over {self.world_size} ranks; "
                f"use at least {2 * self.world_size}"
            )
        return self.rank * per, (self.rank + 1) * per


def data_parallel(distributed: bool | None, device=None) -> DataParallel | None:
    """The :class:`DataParallel` of a ``fit(distributed=...)`` call, or ``None`` for one process.

    ``None`` (default): data-parallel when a process group is initialised, or can be from
    torchrun's variables; ``True``: the same, but an error without one; ``False``: one process.
    """
    if distributed is False:
        return None
    if distributed not in (None, True):
        raise ValueError(f"distributed must be None, True or False; got {distributed!r}")
    if not init_from_environment(device):
        if distributed:
            raise ValueError(
                "distributed=True but torch.distributed is not initialised and no torchrun environment "
                "(WORLD_SIZE, MASTER_ADDR) is set; run under torchrun or call torch.distributed.init_process_group first"
            )
        return None
    return DataParallel()


def _strip_nproc(argv: Sequence[str]) -> tuple[list[str], int | None]:
    out, nproc, i = [], None, 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            nproc, i = int(argv[i + 1]), i + 2
            continue
        if a.startswith("--nproc="):
            nproc = int(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return out, nproc


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The command that runs the CLI ``argv`` (without ``--nproc``) in ``nproc`` local processes:
    ``python -m torch.distributed.run --standalone --nproc_per_node N -m pyro_struct.cli ...``
    (only rank 0's output is shown)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive int; got {nproc!r}")
    rest, _ = _strip_nproc(argv)
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--local-ranks-filter=0", "-m", "pyro_struct.cli", *rest,
    ]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Re-run the command line ``argv`` under torchrun with ``nproc`` processes on this machine;
    returns torchrun's exit status. Each process trains data-parallel (see this module).

    Args:
        argv: the CLI arguments after the program name (``["fit", "m.py:f", "--out", ..., "--nproc", "2"]``).
        nproc: processes to start.

    Raises:
        ValueError: ``argv`` is not a ``fit`` command line with ``--nproc`` (e.g. ``main([...])`` was
            called from Python, where ``sys.argv`` is not the command line).
    """
    rest, given = _strip_nproc(argv)
    if "fit" not in rest or given is None:
        raise ValueError(
            "--nproc re-runs the command line under torchrun, but this process's arguments are not a "
            "'pyro-struct fit ... --nproc N' command line; run pyro-struct from a shell, or run "
            "torchrun --nproc_per_node=N -m pyro_struct.cli fit ... yourself"
        )
    env = dict(os.environ)
    # each process gets its share of the cores rather than all of them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(rest, nproc), env=env).returncode
