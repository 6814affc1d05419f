"""GPU checks: every flow samples, scores and trains on CUDA, and guides save/load across devices.

Run on a machine with a GPU: ``python -m benchmarks gpu_check`` (or ``python benchmarks/gpu_check.py``).
Without CUDA it prints why and exits 0. Each check is one row of the table
(``benchmarks/results/gpu_check.md``): ``ok`` or the error, and how long it took; the exit
status is 1 when any check failed.

Checks, for each flow family (straf, grf, cnf) on a 5-node linear-Gaussian network:

- ``posterior``: ``guide.to("cuda").posterior(obs)`` samples and scores on CUDA (batched observations);
- ``fit fkl``: ``fit`` on CUDA with a model that simulates on the CPU (simulations are moved to
  the guide's device); parameters stay on CUDA, the loss is finite and falls;
- ``fit skl``: ``fit`` with the default objective, the model built and simulating on CUDA
  (``torch.device("cuda")`` as the default device while the network is built and trained);
- ``save/load``: a CUDA guide saved, loaded with ``map_location="cpu"`` and ``"cuda"``, gives the
  same log densities on both devices;
- ``data-parallel (NCCL)``: ``fit`` inside a one-rank NCCL process group (every collective of
  :class:`~pyro_struct.training.distributed.DataParallel` on CUDA buffers, a sharded pool);
- ``ecoli70 throughput``: simulations per second of a few skl steps on ecoli70, CUDA against the
  CPU (when the reference data are found).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .report import write_results  # noqa: E402

__all__ = ["main", "CHECKS"]

FLOWS = ("straf", "grf", "cnf")


def _guide(model, observed, flow, device):
    import pyro

    import pyro_struct as ps

    pyro.set_rng_seed(0)
    return ps.StructuredGuide(model, flow=flow, observed=observed).to(device)


def _all_on(tensors, device) -> None:
    wrong = [k for k, t in tensors.items() if t.device.type != torch.device(device).type]
    if wrong:
        raise AssertionError(f"not on {device}: {wrong}")


def check_posterior(net, flow, device):
    guide = _guide(net.model, net.observed_sites, flow, device)
    guide.set_standardization(guide.simulator().simulate(256))
    obs = {s: torch.randn(4) for s in net.observed_sites}  # CPU observations are moved
    post = guide.posterior(obs)
    samples, log_q = post.sample_and_log_prob(32)
    _all_on({**samples, "log_q": log_q, "context": post.context}, device)
    lp = post.log_prob(samples)
    _all_on({"log_prob": lp}, device)
    if not torch.isfinite(lp).all() or not torch.allclose(lp, log_q, atol=1e-2, rtol=1e-3):
        raise AssertionError(f"log_prob of samples disagrees with their sampling log density (max diff {(lp - log_q).abs().max():.3g})")
    return f"samples {tuple(next(iter(samples.values())).shape)} on {device}"


def check_fit(net_factory, flow, device, objective):
    if objective == "skl":
        with torch.device(device):  # the model's own tensors on the device too
            net = net_factory()
            guide = _guide(net.model, net.observed_sites, flow, device)
            history = guide.fit(num_steps=60, objective="skl", batch_size=128, progress=False, seed=0)
    else:
        net = net_factory()
        guide = _guide(net.model, net.observed_sites, flow, device)
        history = guide.fit(num_steps=60, objective=objective, batch_size=128, progress=False, seed=0)
    _all_on({n: p for n, p in guide.named_parameters()} | {n: b for n, b in guide.named_buffers()}, device)
    if not all(map(lambda v: v == v and abs(v) < float("inf"), history)):
        raise AssertionError("non-finite loss")
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    if not last < first:
        raise AssertionError(f"the loss did not fall ({first:.3f} -> {last:.3f})")
    return f"loss {first:.3f} -> {last:.3f}"


def check_save_load(net, flow, device):
    import pyro_struct as ps

    guide = _guide(net.model, net.observed_sites, flow, device)
    guide.fit(num_steps=5, objective="fkl", batch_size=64, progress=False, seed=0)
    values = {s: torch.randn(3) for s in net.latent_sites}
    obs = {s: torch.randn(3) for s in net.observed_sites}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "g.pt"
        guide.save(path)
        on_cpu = ps.StructuredGuide.load(path, net.model, map_location="cpu")
        on_gpu = ps.StructuredGuide.load(path, net.model, map_location=device)
    _all_on(dict(on_cpu.state_dict()), "cpu")
    _all_on(dict(on_gpu.state_dict()), device)
    a = on_cpu.posterior(obs).log_prob(values)
    b = on_gpu.posterior(obs).log_prob(values).cpu()
    c = guide.posterior(obs).log_prob(values).cpu()
    if not (torch.allclose(a, b, atol=1e-3, rtol=1e-4) and torch.allclose(b, c, atol=1e-5)):
        raise AssertionError(f"log densities differ across devices: cpu {a.tolist()}, cuda {b.tolist()}, original {c.tolist()}")
    return f"max |cpu - cuda| log q {float((a - b).abs().max().detach()):.2e}"


def check_nccl(net, flow, device):
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        guide = _guide(net.model, net.observed_sites, flow, device)
        result = guide.fit(num_steps=20, objective="fkl", batch_size=64, num_simulations=512, progress=False, seed=0, distributed=True)
    finally:
        dist.destroy_process_group()
    _all_on(dict(guide.state_dict()), device)
    if len(result.local_losses) != 20 or result.history[-20:] != result.local_losses:
        raise AssertionError("one rank's mean loss should be its own loss")
    return f"loss {result[0]:.3f} -> {result[-1]:.3f}"


def check_throughput(device, steps: int = 30):
    import pyro_struct as ps
    from pyro_struct.models import LinearGaussianNetwork

    try:
        LinearGaussianNetwork.from_name("ecoli70")
    except FileNotFoundError as e:
        return f"skipped ({e})"
    out = []
    for where in ("cpu", device):
        with torch.device(where):
            net = LinearGaussianNetwork.from_name("ecoli70")
            guide = ps.StructuredGuide(net.model, observed=net.observed_sites).to(where)
            guide.fit(num_steps=3, batch_size=256, progress=False, seed=0)  # warm-up
            if where != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            guide.fit(num_steps=steps, batch_size=256, progress=False, seed=0)
            if where != "cpu":
                torch.cuda.synchronize()
            out.append(f"{where}: {steps * 256 / (time.perf_counter() - t0):.0f} sims/s")
    return ", ".join(out) + " (skl, batch 256)"


def _run(rows, name, fn, *a):
    t0 = time.perf_counter()
    try:
        detail, status = fn(*a), "ok"
    except Exception as e:  # a failed check is a row, not the end of the run
        traceback.print_exc()
        detail, status = f"{type(e).__name__}: {e}"[:300], "FAILED"
    rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 2), "detail": detail})
    print(rows[-1], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing to check (exit 0)")
        return 0
    from pyro_struct.models import LinearGaussianNetwork

    torch.set_num_threads(1)
    net_factory = lambda: LinearGaussianNetwork.random(5, seed=0)  # noqa: E731
    net = net_factory()
    rows: list[dict] = []
    for flow in FLOWS:
        _run(rows, f"{flow} posterior", check_posterior, net, flow, args.device)
        _run(rows, f"{flow} fit fkl (CPU model)", check_fit, net_factory, flow, args.device, "fkl")
        _run(rows, f"{flow} fit skl (model on GPU)", check_fit, net_factory, flow, args.device, "skl")
        _run(rows, f"{flow} save/load cpu<->gpu", check_save_load, net, flow, args.device)
    _run(rows, "straf data-parallel (NCCL, 1 rank)", check_nccl, net, "straf", args.device)
    _run(rows, "ecoli70 throughput", check_throughput, args.device)
    meta = {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    write_results("gpu_check", rows, meta=meta, notes="benchmarks/gpu_check.py on one GPU.", results_dir=args.results_dir)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


CHECKS = {"posterior": check_posterior, "fit": check_fit, "save_load": check_save_load, "nccl": check_nccl, "throughput": check_throughput}

if __name__ == "__main__":
    sys.exit(main())
