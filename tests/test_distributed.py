"""Data-parallel training: two CPU processes (gloo) against one process, and the torchrun launcher."""

import math
import os
import socket
import sys
import time

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_struct import StructuredGuide
from pyro_struct.models import LinearGaussianNetwork
from pyro_struct.training import TrainingError, train
from pyro_struct.training.distributed import DataParallel, data_parallel, is_main, launch, rank_seed, torchrun_command

WORLD = 2
BATCH = 64
STEPS = 40
# fkl on LinearGaussianNetwork.random(5, seed=0), constant lr 1e-2: two ranks of 64 against one
# process of 128. The two runs see different simulations, so the trajectories agree only up to
# batch noise: over 4 seeds of one process the 10-step window means differed by at most 0.15
# nats (measured); 0.35 nats is about half of the windows' fall over these steps (~0.7 nats).
WINDOW, TOLERANCE = 10, 0.35


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guide(lg):
    pyro.set_rng_seed(0)  # the same initial parameters in every process
    return StructuredGuide(lg.model, observed=lg.observed_sites, hidden_sizes=(16,), num_layers=1)


def _fit_options():
    return dict(objective="fkl", batch_size=BATCH, lr=1e-2, lr_schedule="constant", seed=1, progress=False, num_standardization=512)


def _flat_state(module) -> torch.Tensor:
    return torch.cat([v.detach().double().reshape(-1) for v in module.state_dict().values()])


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3))


class _Rows:
    """Rank ``r``'s batches: rows ``[r*k, (r+1)*k)`` of a fixed sequence of batches (exact comparison)."""

    validation, steps_per_epoch = None, None

    def __init__(self, batches, part=None):
        self.batches, self.part, self.i = batches, part, 0

    def next_batch(self):
        b = self.batches[self.i]
        self.i += 1
        if self.part is None:
            return b
        k = b.shape[0] // WORLD
        return b[self.part * k : (self.part + 1) * k]


def _quadratic(module):
    return lambda batch: ((batch @ module.w - 1.0) ** 2).mean()


def _exact_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, generator=g) for _ in range(12)]


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {"is_main": is_main()}
        dp = DataParallel()
        # 0. one all-reduce: the mean gradient (a missing one counts as zero), the mean loss, rank 0's clock
        p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.tensor([rank + 1.0, 2.0 * rank])
        q.grad = torch.ones(1) if rank == 0 else None
        schedule = dp.schedule(1.0, "constant", 10, None)
        time.sleep(0.01 * (1 - rank))
        out["average"] = (dp.average([p, q], 10.0 * rank, schedule), p.grad.clone(), q.grad.clone(), schedule.agreed, schedule.local_elapsed())
        # 1. the generic loop with fixed batches: averaged gradients equal one process's on their union
        m = _Linear()
        train(m, _quadratic(m), _Rows(_exact_batches(), rank), num_steps=12, lr=0.05, progress=False, sync=dp)
        out["exact"] = m.w.detach().clone()
        # 2. a non-finite loss on rank 1 only stops both ranks at the same step
        m = _Linear()
        loss = _quadratic(m)
        bad = lambda b: loss(b) * (math.inf if rank == 1 and bad.calls >= 3 else 1.0)  # noqa: E731
        bad.calls = 0
        def counting(b):
            value = bad(b)
            bad.calls += 1
            return value
        history = []
        try:
            train(m, counting, _Rows(_exact_batches()), num_steps=12, progress=False, sync=dp, history=history)
        except TrainingError as e:
            out["guard"] = (len(history), str(e))
        # 3. rank 0 is slow: the time budget stops both ranks at the same step (rank 0's clock)
        m = _Linear()
        slow = lambda b: (time.sleep(0.05) if rank == 0 else None) or _quadratic(m)(b)  # noqa: E731
        r = train(m, slow, _Rows([torch.randn(8, 3)] * 200), num_steps=200, time_budget=0.4, progress=False, sync=dp)
        out["budget"] = (r.num_steps, r.stopped_by)
        # 4. fit: fresh simulations per rank, checkpoints only on rank 0
        lg = LinearGaussianNetwork.random(5, seed=0)
        guide = _guide(lg)
        result = guide.fit(num_steps=STEPS, checkpoint=os.path.join(folder, f"ckpt{rank}.pt"), checkpoint_every=20, **_fit_options())
        out["fit_state"] = _flat_state(guide)
        out["fit_history"] = list(result)
        out["fit_local"] = list(result.local_losses)
        # 5. a sharded fixed budget with validation; pooled standardisation
        guide = _guide(lg)
        guide.fit(num_steps=6, num_simulations=200, checkpoint=os.path.join(folder, f"pool{rank}.pt"), **_fit_options())
        out["pool_state"] = _flat_state(guide)
        out["pool_loc"] = guide.latent_layout.loc.clone()
        out["pool_validation"] = list(guide.validation_history)
        # 6. resume: 4 steps, then resumed to 6 (every rank reads rank 0's file), equals 6 in one go
        path = os.path.join(folder, "resume.pt")
        whole = _guide(lg)
        whole.fit(num_steps=6, **_fit_options())
        _guide(lg).fit(num_steps=4, checkpoint=path, **_fit_options())
        resumed = _guide(lg)
        resumed.fit(num_steps=6, checkpoint=path, resume=True, **_fit_options())
        out["resume"] = (_flat_state(whole), _flat_state(resumed), len(resumed.history))
        # 7. distributed=False inside a process group: this rank alone (no collective, its own seed)
        alone = _guide(lg)
        result = alone.fit(num_steps=3, distributed=False, **(_fit_options() | {"seed": 10 + rank}))
        out["alone"] = (_flat_state(alone), list(result), list(result.local_losses))
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=True)
    return folder, [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_only_rank_0_is_main(two_ranks):
    _, ranks = two_ranks
    assert [r["is_main"] for r in ranks] == [True, False]
    assert is_main()  # no process group here


def test_average_is_one_all_reduce_of_gradients_loss_and_clock(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        loss, p_grad, q_grad, agreed, _ = r["average"]
        assert loss == pytest.approx(5.0)
        torch.testing.assert_close(p_grad, torch.tensor([1.5, 1.0]))
        torch.testing.assert_close(q_grad, torch.tensor([0.5]))
    assert ranks[0]["average"][3] == ranks[1]["average"][3] > 0  # rank 0's clock on both ranks
    assert ranks[0]["average"][3] <= ranks[0]["average"][4]


def test_averaged_gradients_equal_one_process_on_the_union_of_the_batches(two_ranks):
    _, ranks = two_ranks
    m = _Linear()
    train(m, _quadratic(m), _Rows(_exact_batches()), num_steps=12, lr=0.05, progress=False)
    for r in ranks:
        torch.testing.assert_close(r["exact"], m.w.detach(), rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_ranks):
    _, ranks = two_ranks
    (n0, msg0), (n1, msg1) = ranks[0]["guard"], ranks[1]["guard"]
    assert n0 == n1 == 3
    assert "at step 3" in msg0 and "at step 3" in msg1


def test_time_budget_follows_rank_0s_clock(two_ranks):
    _, ranks = two_ranks
    assert ranks[0]["budget"] == ranks[1]["budget"]
    steps, stopped = ranks[0]["budget"]
    assert stopped == "time_budget" and 3 <= steps < 200


def test_fit_two_ranks_identical_parameters_distinct_batches_one_checkpoint(two_ranks):
    folder, ranks = two_ranks
    assert torch.equal(ranks[0]["fit_state"], ranks[1]["fit_state"])
    assert ranks[0]["fit_history"] == ranks[1]["fit_history"]
    assert ranks[0]["fit_local"][0] != ranks[1]["fit_local"][0]  # distinct simulations per rank
    # the shared history is the mean of the ranks' own losses
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["fit_local"], ranks[1]["fit_local"])]
    assert ranks[0]["fit_history"] == pytest.approx(mean, rel=1e-5, abs=1e-5)
    assert os.path.exists(os.path.join(folder, "ckpt0.pt")) and not os.path.exists(os.path.join(folder, "ckpt1.pt"))
    payload = torch.load(os.path.join(folder, "ckpt0.pt"), weights_only=True)
    assert payload["training"]["step"] == STEPS and len(payload["training"]["rng_ranks"]) == WORLD


def test_two_ranks_follow_one_process_with_twice_the_batch(two_ranks):
    _, ranks = two_ranks
    lg = LinearGaussianNetwork.random(5, seed=0)
    guide = _guide(lg)
    options = _fit_options() | {"batch_size": WORLD * BATCH, "num_standardization": WORLD * 512}
    single = list(guide.fit(num_steps=STEPS, distributed=False, **options))
    dp = ranks[0]["fit_history"]
    assert len(single) == len(dp) == STEPS
    for i in range(0, STEPS, WINDOW):
        a, b = sum(single[i : i + WINDOW]) / WINDOW, sum(dp[i : i + WINDOW]) / WINDOW
        assert abs(a - b) < TOLERANCE, (i, a, b)
    assert dp[-1] < dp[0] - 0.5  # both actually trained


def test_sharded_pool_and_pooled_standardisation(two_ranks):
    folder, ranks = two_ranks
    assert torch.equal(ranks[0]["pool_state"], ranks[1]["pool_state"])
    assert ranks[0]["pool_validation"] == ranks[1]["pool_validation"] and ranks[0]["pool_validation"]
    payload = torch.load(os.path.join(folder, "pool0.pt"), weights_only=True)
    pool = payload["training"]["pool"]
    assert pool["log_joint"].shape == (200,)  # two shards of 100, gathered
    # the statistics are those of the whole pool, not of rank 0's shard
    from pyro_struct.simulation import Simulations

    whole = Simulations(pool["values"], pool["log_joint"])
    guide = _guide(LinearGaussianNetwork.random(5, seed=0))
    guide.set_standardization(whole)
    torch.testing.assert_close(ranks[0]["pool_loc"], guide.latent_layout.loc)
    guide.set_standardization(whole.select(torch.arange(100)))
    assert not torch.allclose(ranks[0]["pool_loc"], guide.latent_layout.loc)


def test_resume_continues_every_rank_exactly(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        whole, resumed, n = r["resume"]
        assert n == 6
        torch.testing.assert_close(resumed, whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(ranks[0]["resume"][1], ranks[1]["resume"][1])


def test_distributed_false_trains_each_rank_alone(two_ranks):
    _, ranks = two_ranks
    (a, history0, local0), (b, history1, _) = ranks[0]["alone"], ranks[1]["alone"]
    assert not torch.equal(a, b) and history0 != history1
    assert history0 == local0  # its own losses, not a mean over ranks


def test_rank_seeds_are_distinct_and_rank_0_keeps_the_seed():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(s, r) for s in range(20) for r in range(1, 8)}
    assert len(seeds) == 20 * 7 and all(0 <= s < 2**32 for s in seeds)


def test_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert data_parallel(None) is None and data_parallel(False) is None
    with pytest.raises(ValueError, match="distributed=True"):
        data_parallel(True)
    with pytest.raises(ValueError, match="distributed must be"):
        data_parallel("yes")


def test_torchrun_command_and_launch_errors():
    cmd = torchrun_command(["--threads", "1", "fit", "m.py:f", "--out", "g.pt", "--nproc", "3"], 3)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=3" in cmd
    assert cmd[cmd.index("pyro_struct.cli") + 1 :] == ["--threads", "1", "fit", "m.py:f", "--out", "g.pt"]
    with pytest.raises(ValueError, match="--nproc must be a positive int"):
        torchrun_command(["fit"], 0)
    with pytest.raises(ValueError, match="not a 'pyro-struct fit"):
        launch(["-m", "pytest", "tests"], 2)


@pytest.mark.slow
def test_cli_fit_nproc_2_trains_under_torchrun(tmp_path):
    import subprocess

    out = tmp_path / "guide.pt"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pyro_struct.cli", "fit", "tests/models_for_cli.py:chain", "--observed", "x",
           "--out", str(out), "--steps", "5", "--batch-size", "16", "--nproc", "2", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.exists() and "trained 'chain' for 5 steps" in run.stdout
    assert run.stdout.count("trained 'chain'") == 1  # only rank 0's output is shown
