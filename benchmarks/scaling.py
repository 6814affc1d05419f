"""Compile time (trace, invert, masks) and time per training step against model size.

Models: the example HMM ``hmm(T)`` (a Python loop of scalar sites, ``2T`` nodes) and the plated
hierarchical model ``hierarchical(N)`` (``2N + 2`` nodes), built by
``benchmarks.compile_scaling.traced_model``. For each size the row reports

- ``trace_s``: ``ps.trace_model``; ``invert_s``: ``ps.inverse_structure(kind="faithful")``;
  ``masks_s``: building the flow (greedy mask factorisation of every conditioner and its
  parameters) on the inverse's adjacency; ``guide_s``: the whole ``ps.StructuredGuide(...)``
  (all of the above plus the layout), each timed once (compilation is a one-off cost);
- ``H_edges``, ``depth``, ``params`` (effective, unmasked) of the compiled guide;
- ``standardize_s``: the first ``fit`` simulating the standardisation statistics (2,048
  simulations, once per guide);
- ``ms_per_step_<objective>``: the mean time of a training step (``batch`` simulations,
  forward and backward) after warm-up steps.

A row whose single step takes longer than ``--max-step-s`` records that one step and skips
the rest (the HMM's skl step samples the flow in ``depth + 1`` conditioner passes). Steps are
timed in a forked process with its address space capped at ``--memory-gib``: a step that needs
more memory is recorded in the row's note instead of ending the run.

Usage: ``python -m benchmarks scaling [--hmm 10 100 1000] [--plate 10 100 1000 5000 10000]
[--objectives skl fkl] [--flow straf] [--steps 20] [--plates-auto] [--out scaling]``

``--plates-auto`` adds a row per plate size for ``StructuredGuide(..., plates="auto")`` (the
shared-weight plate flow compiled from a few-member template): only its whole compile
(``guide_s``) and its steps are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pyro_struct as ps
from pyro_struct.compile import FLOWS, build_flow

from .compile_scaling import traced_model
from .report import write_results

__all__ = ["main", "scaling_row"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _step_time_in_child(guide, objective: str, batch: int, steps: int, warmup: int, max_step_s: float, memory_gib: float):
    """:func:`_step_time` in a forked process whose address space is capped at ``memory_gib``,
    so a step that needs more memory than the machine has is recorded instead of bringing the
    whole benchmark (and its neighbours) down through the kernel's out-of-memory killer.

    Returns:
        ``(seconds per step, steps timed)``.

    Raises:
        RuntimeError: the child failed; the message says how (e.g. out of memory).
    """
    import multiprocessing
    import resource

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            send.send(("ok", _step_time(guide, objective, batch, steps, warmup, max_step_s)))
        except BaseException as e:  # report every failure to the parent, MemoryError included
            send.send(("error", f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"))

    proc = ctx.Process(target=child)
    proc.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "error", f"the step process died (exit code {proc.exitcode})"
    proc.join()
    if status != "ok":
        if "alloc" in value or "Memory" in value:
            value = f"out of memory under a {memory_gib:.0f} GiB cap ({value})"
        raise RuntimeError(value)
    return value


def _step_time(guide, objective: str, batch: int, steps: int, warmup: int, max_step_s: float) -> tuple[float, int]:
    """Mean seconds per training step and the number of steps timed (standardisation excluded)."""
    opts = dict(objective=objective, batch_size=batch, progress=False, lr_schedule=None)
    _, first = _timed(lambda: guide.fit(num_steps=1, **opts))
    if first > max_step_s:
        return first, 1
    if warmup > 1:
        guide.fit(num_steps=warmup - 1, **opts)
    _, total = _timed(lambda: guide.fit(num_steps=steps, **opts))
    return total / steps, steps


def _plate_guide_row(model_name: str, size: int, model, observed, args) -> tuple[dict, object]:
    """The ``plates="auto"`` row's compile part: only the whole guide is timed (its stages run on a plate template)."""
    torch.manual_seed(args.seed)
    guide, guide_s = _timed(lambda: ps.StructuredGuide(model, flow=args.flow, observed=observed, plates="auto", **args.flow_options))
    if guide.plate_layout is None:
        raise RuntimeError(f"plates='auto' fell back to the per-coordinate guide: {guide.plate_note}")
    row = {"model": f"{model_name} (plates='auto')", "size": size, "nodes": 2 * size + 2, "latent": size + 2,
           "H_edges": guide.inverse.num_edges, "depth": guide.inverse.depth, "trace_s": None, "invert_s": None,
           "masks_s": None, "guide_s": guide_s, "params": int(guide.structure.num_effective_parameters),
           "note": f"H_edges/depth of the {len(guide.bn)}-node template"}
    return row, guide


def scaling_row(model_name: str, size: int, args, plates: str | None = None) -> dict:
    """Compile and step timings of one model size (see the module docstring); ``plates="auto"``: the shared-weight plate guide."""
    model, observed = traced_model(model_name, size)
    if plates == "auto":
        row, guide = _plate_guide_row(model_name, size, model, observed, args)
    else:
        bn, trace_s = _timed(lambda: ps.trace_model(model, observed=observed))
        inv, invert_s = _timed(lambda: ps.inverse_structure(bn, kind="faithful"))
        _, masks_s = _timed(lambda: build_flow(args.flow, inv, **args.flow_options))
        torch.manual_seed(args.seed)
        guide, guide_s = _timed(lambda: ps.StructuredGuide(model, flow=args.flow, structure="faithful", observed=observed, **args.flow_options))
        row = {
            "model": model_name,
            "size": size,
            "nodes": len(bn),
            "latent": len(bn.latent_nodes),
            "H_edges": inv.num_edges,
            "depth": inv.depth,
            "trace_s": trace_s,
            "invert_s": invert_s,
            "masks_s": masks_s,
            "guide_s": guide_s,
            "params": int(guide.structure.num_effective_parameters),
        }
    # the first fit simulates the standardisation statistics: a one-off cost, timed on its own
    _, row["standardize_s"] = _timed(lambda: guide.fit(num_steps=0, objective=args.objectives[0], batch_size=args.batch_size, progress=False))
    for objective in args.objectives:
        try:
            s, n = _step_time_in_child(
                guide, objective, args.batch_size, args.steps, args.warmup, args.max_step_s, args.memory_gib
            )
            row[f"ms_per_step_{objective}"] = 1e3 * s
            if n == 1:
                row["note"] = (row.get("note", "") + f" {objective}: one step timed (> {args.max_step_s}s)").strip()
        except Exception as e:  # a failure is a result here: record it and go on
            row[f"ms_per_step_{objective}"] = None
            row["note"] = (row.get("note", "") + f" {objective}: {str(e)[:160]}").strip()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks scaling", description=__doc__.splitlines()[0])
    p.add_argument("--hmm", nargs="*", type=int, default=[10, 100, 1000], help="HMM lengths T")
    p.add_argument("--plate", nargs="*", type=int, default=[10, 100, 1000, 5000], help="plate sizes N (5000 -> 10,002 nodes)")
    p.add_argument("--flow", default="straf", choices=["straf", "grf", "cnf"])
    p.add_argument("--flow-options", default="{}", help="JSON options for the flow")
    p.add_argument("--objectives", nargs="+", default=["skl", "fkl"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-step-s", type=float, default=20.0)
    p.add_argument(
        "--memory-gib", type=float, default=16.0,
        help="address-space cap of the process that times the steps (a step over it is recorded as out of memory)",
    )
    p.add_argument("--plates-auto", action="store_true", help="also a plates='auto' (shared-weight plate guide) row per plate size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="scaling")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.flow_options = json.loads(args.flow_options)
    rows = []
    columns = ["model", "size", "nodes", "latent", "H_edges", "depth", "trace_s", "invert_s", "masks_s", "guide_s", "params", "standardize_s"]
    columns += [f"ms_per_step_{o}" for o in args.objectives] + ["note"]
    jobs = [("hmm", t, None) for t in args.hmm] + [("hierarchical", n, None) for n in args.plate]
    jobs += [("hierarchical", n, "auto") for n in args.plate] if args.plates_auto else []
    for name, size, plates in jobs:
        rows.append(scaling_row(name, size, args, plates))
        print(rows[-1], flush=True)
        write_results(
            args.out,
            rows,
            columns,
            meta={**vars(args), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            notes=(
                "Seconds of one compilation per stage; ms_per_step_<objective>: mean wall-clock ms of a training "
                f"step with batch {args.batch_size} after {args.warmup} warm-up steps, {args.flow} flow, faithful "
                "structure, default options. The machine is shared: times are upper bounds of the cost itself."
            ),
        )
    return 0
