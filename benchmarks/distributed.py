"""Data-parallel training: simulations per second and time to a target exact KL on ecoli70, for 1..K processes.

Each configuration trains a StrAF guide on ecoli70 (fresh simulations every step, constant
learning rate, ``batch_size`` simulations per process and step) in ``K`` CPU processes (gloo,
one torch thread each; ``K = 1`` is a plain undistributed ``fit``). Every ``--eval-every``
steps rank 0 measures the exact symmetrised KL (mean of forward and reverse, nats) of the
amortised posterior against the closed-form posterior on ``--num-obs`` held-out observations;
that evaluation's time is excluded from the training seconds. ``--device cuda`` trains one
process on the GPU instead.

Usage: ``python -m benchmarks distributed [--nprocs 1,2] [--budget 60] [--target-kl 0.1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .report import write_results

__all__ = ["main", "train_and_measure"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _KLProbe:
    """The objective, wrapped: every ``every`` calls on rank 0 it first records
    ``(training seconds, exact symmetrised KL)``; its own time is kept out of the training seconds."""

    def __init__(self, objective, net, obs, every: int, num_samples: int, measure: bool):
        from .lgbn import evaluate_kl

        self.objective, self.net, self.obs, self.every = objective, net, obs, every
        self.num_samples, self.measure, self.evaluate_kl = num_samples, measure, evaluate_kl
        self.calls, self.eval_seconds, self.trace = 0, 0.0, []
        self.started = time.perf_counter()

    def kl(self, guide) -> float:
        post = guide.posterior(**{k: v.to(guide.latent_layout.loc.device) for k, v in self.obs.items()})
        sites = self.net.latent_sites
        dtype = guide.latent_layout.loc.dtype

        def log_q(z):
            return post.log_prob({s: z[..., k].to(post.context.device, dtype) for k, s in enumerate(sites)}).cpu()

        def sample_q(n):
            samples, lq = post.sample_and_log_prob(n)
            return torch.stack([samples[s] for s in sites], -1).cpu(), lq.cpu()

        fkl, rkl = self.evaluate_kl(self.net, self.obs, log_q, sample_q, self.num_samples)
        return 0.5 * (fkl + rkl)

    def __call__(self, guide, simulator, sims):
        if self.measure and self.calls % self.every == 0:
            t0 = time.perf_counter()
            value = self.kl(guide)
            self.eval_seconds += time.perf_counter() - t0
            self.trace.append((time.perf_counter() - self.started - self.eval_seconds, self.calls, value))
        self.calls += 1
        return self.objective(guide, simulator, sims)


def train_and_measure(rank: int, world: int, port: int, out: str, args: dict) -> None:
    """One process of a configuration; rank 0 writes its measurements to ``out`` (JSON)."""
    import pyro_struct as ps
    from pyro_struct.models import LinearGaussianNetwork
    from pyro_struct.objectives import get_objective

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = LinearGaussianNetwork.from_name(args["network"])
        obs = net.sample_observations(args["num_obs"], torch.Generator().manual_seed(123))
        torch.manual_seed(0)
        guide = ps.StructuredGuide(net.model, observed=net.observed_sites).to(args["device"])
        probe = _KLProbe(get_objective(args["objective"]), net, obs, args["eval_every"], args["kl_samples"], rank == 0)
        result = guide.fit(
            num_steps=10**7, time_budget=args["budget"], objective=probe, batch_size=args["batch_size"], lr=args["lr"],
            lr_schedule="constant", seed=0, progress=False, distributed=world > 1,
        )
        if rank == 0:
            train_s = time.perf_counter() - probe.started - probe.eval_seconds
            probe.trace.append((train_s, probe.calls, probe.kl(guide)))
            record = {"steps": result.num_steps, "train_s": train_s, "trace": probe.trace}
            with open(out, "w") as f:
                json.dump(record, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _row(nproc: int, device: str, record: dict, args) -> dict:
    sims = nproc * args.batch_size * record["steps"]
    reached = [t for t, _, kl in record["trace"] if kl <= args.target_kl]
    return {
        "processes": nproc, "device": device, "batch_per_process": args.batch_size, "steps": record["steps"],
        "train_s": round(record["train_s"], 1), "sims_per_s": round(sims / record["train_s"], 1),
        "steps_per_s": round(record["steps"] / record["train_s"], 2),
        f"s_to_kl<={args.target_kl}": round(reached[0], 1) if reached else None,
        "final_kl": round(record["trace"][-1][2], 4),
    }


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks distributed", description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU process (default cpu)")
    p.add_argument("--network", default="ecoli70")
    p.add_argument("--objective", default="skl")
    p.add_argument("--budget", type=float, default=60.0, help="wall-clock seconds per configuration (default 60)")
    p.add_argument("--batch-size", type=int, default=128, help="simulations per process and step (default 128)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--target-kl", type=float, default=0.1, help="exact symmetrised KL target in nats (default 0.1)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between KL evaluations (default 25)")
    p.add_argument("--num-obs", type=int, default=16)
    p.add_argument("--kl-samples", type=int, default=256)
    p.add_argument("--name", default=None, help="results file stem (default distributed_<device>)")
    p.add_argument("--notes", default="", help="appended to the table notes")
    p.add_argument("--results-dir", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    settings = {k: getattr(args, k) for k in ("network", "objective", "budget", "batch_size", "lr", "eval_every", "num_obs", "kl_samples", "device")}
    rows = []
    for nproc in [int(n) for n in args.nprocs.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "rank0.json")
            mp.spawn(train_and_measure, args=(nproc, _free_port(), out, settings), nprocs=nproc, join=True)
            with open(out) as f:
                rows.append(_row(nproc, args.device, json.load(f), args))
        print(rows[-1], flush=True)
    notes = (
        f"StrAF guide on {args.network}, objective {args.objective}, fresh simulations, constant lr {args.lr}, "
        f"{args.batch_size} simulations per process and step (K processes: an effective batch of K x {args.batch_size}), "
        f"{args.budget:g} s wall-clock per configuration; gloo, one torch thread per process. KL: exact symmetrised KL "
        f"(mean of forward and reverse) on {args.num_obs} observations, {args.kl_samples} samples, every {args.eval_every} steps "
        "on rank 0 (its time excluded from train_s). " + args.notes
    )
    write_results(args.name or f"distributed_{args.device}", rows, meta=settings, notes=notes.strip(), results_dir=args.results_dir)
    return 0
