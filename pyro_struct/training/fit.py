"""Training an amortised guide on simulations of its model: arguments, standardisation, resume, the loop."""

from __future__ import annotations

import inspect
import numbers
import os
import warnings
from typing import Any, Callable, Mapping, Protocol

import pyro
import torch

from ..io import read_payload
from ..objectives import REVERSE_OBJECTIVES, get_objective
from ..simulation import ModelSimulator, Simulations
from ..threads import torch_threads
from .batches import PoolSource, SimulationSource
from .checkpoint import Checkpointer
from .data import fit_data, model_parameters
from .distributed import DataParallel, data_parallel, rank_seed
from .loop import FitResult, train
from .schedule import resolve_num_steps

__all__ = ["fit", "TrainableGuide", "DrawnArgumentsSource", "check_simulate_with", "draw_arguments"]


class TrainableGuide(Protocol):
    """What :func:`fit` needs from a guide (``StructuredGuide`` has these members)."""

    history: list
    validation_history: list
    standardized: torch.Tensor

    def simulator(self) -> ModelSimulator: ...
    def set_standardization(self, simulations: Simulations) -> None: ...
    def state_payload(self) -> dict: ...
    def load_payload(self, payload: dict) -> None: ...
    def check_compatible(self, payload: dict) -> None: ...
    def parameters(self): ...


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "non-negative" if minimum == 0 else ("positive" if minimum == 1 else f">= {minimum}")
        raise ValueError(f"{name} must be a {kind} int{' or None' if allow_none else ''}; got {value!r}")


def _check_real(name: str, value, *, positive: bool = True, allow_none: bool = False, upper: float | None = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 if positive else value >= 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} number{' or None' if allow_none else ''}; got {value!r}")
    if upper is not None and not value < upper:
        raise ValueError(f"{name} must be below {upper}; got {value!r}")


def _check_arguments(o: dict) -> None:
    """Every argument of :func:`fit` checked before anything is touched, named in the message."""
    _check_int("num_steps", o["num_steps"], 0)
    _check_int("batch_size", o["batch_size"], 1)
    _check_real("lr", o["lr"])
    _check_int("num_simulations", o["num_simulations"], 2, allow_none=True)
    _check_real("time_budget", o["time_budget"], allow_none=True)
    _check_real("clip_grad", o["clip_grad"], allow_none=True)
    _check_real("weight_decay", o["weight_decay"], positive=False)
    _check_int("num_standardization", o["num_standardization"], 2)
    _check_int("checkpoint_every", o["checkpoint_every"], 1)
    _check_int("seed", o["seed"], 0, allow_none=True)
    _check_int("num_threads", o["num_threads"], 1, allow_none=True)
    _check_int("draws_per_batch", o["draws_per_batch"], 1)
    v = o["validation_fraction"]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1); got {v!r}")
    if o["resume"] and o["checkpoint"] is None:
        raise ValueError("resume=True needs checkpoint=path (the file to resume from)")


def _advice(name: str, lr: float) -> str:
    tips = [f"Try a smaller lr (now {lr:.3g})", "a tighter clip_grad"]
    if name in REVERSE_OBJECTIVES:
        tips.append("objective='fkl' (which never evaluates the model density at guide samples)")
    return ", ".join(tips) + ", or check that the model's densities stay finite."


def _resume(guide: TrainableGuide, checkpoint, dp: DataParallel | None = None) -> tuple[int, dict | None, Simulations | None]:
    """Read and validate a checkpoint, then restore the guide from it: ``(step, optimizer state, pool)``.

    Under data parallelism each rank restores its own random state when the checkpoint has one
    per rank for this world size, and is reseeded per rank otherwise."""
    if not os.path.exists(os.fspath(checkpoint)):
        return 0, None, None
    payload = read_payload(checkpoint)
    state = payload.get("training")
    if state is None:
        raise ValueError(f"{os.fspath(checkpoint)!r} is a saved guide, not a training checkpoint; resume needs a checkpoint")
    guide.check_compatible(payload)  # before anything of the guide is overwritten
    guide.load_payload(payload)
    pool = state.get("pool")
    pool = None if pool is None else Simulations(pool["values"], pool["log_joint"])
    rng = state.get("rng")
    if dp is not None:
        ranks = state.get("rng_ranks")
        rng = ranks[dp.rank] if ranks is not None and len(ranks) == dp.world_size else None
        if rng is None:
            pyro.set_rng_seed(rank_seed(int(state["step"]), dp.rank))
    if rng is not None:
        torch.set_rng_state(rng)
    return int(state["step"]), state["optimizer"], pool


def _seed(seed: int | None, dp: DataParallel | None) -> None:
    if dp is None:
        if seed is not None:
            pyro.set_rng_seed(seed)
        return
    # torch's generator starts from the same constant in every process: unseeded ranks would
    # simulate identical batches
    pyro.set_rng_seed(rank_seed(seed, dp.rank) if seed is not None else int.from_bytes(os.urandom(4), "little"))


def _pools(simulator: ModelSimulator, pool: Simulations | None, num_simulations: int | None, dp: DataParallel | None):
    """``(whole pool, this process's training share)`` of a fixed budget (``(None, None)``: fresh
    simulations every step). Under data parallelism each rank simulates an equal shard and
    every rank holds the whole pool (for the standardisation and for checkpoints)."""
    if dp is None:
        if pool is None and num_simulations is not None:
            pool = simulator.simulate_in_chunks(num_simulations)
        return pool, pool
    if pool is None:
        if num_simulations is None:
            return None, None
        start, stop = dp.shard(num_simulations)
        shard = simulator.simulate_in_chunks(stop - start)
        return dp.gather_simulations(shard), shard
    start, stop = dp.shard(pool.num)
    return pool, pool.select(torch.arange(start, stop))


def _standardize(guide: TrainableGuide, simulator: ModelSimulator, pool, num_standardization: int, dp) -> None:
    if bool(guide.standardized):
        return
    if pool is None:
        pool = simulator.simulate_in_chunks(num_standardization)
        if dp is not None:
            pool = dp.gather_simulations(pool)
    guide.set_standardization(pool)


def _checkpointer(guide: TrainableGuide, checkpoint, checkpoint_every: int, pool, dp) -> Checkpointer | None:
    if checkpoint is None:
        return None
    def extra() -> dict:
        out = {} if pool is None else {"pool": {"values": dict(pool), "log_joint": pool.log_joint}}
        if dp is not None:
            out["rng_ranks"] = dp.gather(torch.get_rng_state())
        return out
    return Checkpointer(checkpoint, checkpoint_every, guide.state_payload, extra, save_file=dp is None or dp.is_main)


def _guide_device(guide: TrainableGuide) -> torch.device:
    for t in guide.parameters():
        return t.device
    return torch.device("cpu")


def _on(sims: Simulations | None, device: torch.device) -> Simulations | None:
    """Simulations on the guide's device (no copy when they are there already): a model that
    computes on the CPU can then train a guide on a GPU with ``"fkl"``."""
    if sims is None or sims.log_joint.device == device:
        return sims
    return Simulations({k: v.to(device) for k, v in sims.items()}, sims.log_joint.to(device))


# ---- simulate_with (issue #11): model keyword arguments drawn per training batch --------------
def check_simulate_with(model: Callable, spec) -> dict:
    """Validate ``simulate_with`` against ``model``'s signature; errors name the argument.

    Each value is a 2-tuple of ints ``(low, high)`` (uniform integers in the closed range), a
    non-empty list (a uniform choice) or a callable ``rng -> value`` (``rng`` a ``torch.Generator``).
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"simulate_with must be a non-empty dict {{model argument: (low, high) | list | callable}}; got {spec!r}")
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):
        params = None
    open_kwargs = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in spec.items():
        if not open_kwargs and name not in params:
            raise ValueError(
                f"simulate_with names {name!r}, which the model {getattr(model, '__name__', model)!r} does not take; "
                f"its arguments are {list(params)}"
            )
        ints = isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        if not (callable(value) or (ints and value[0] <= value[1]) or (isinstance(value, list) and value)):
            raise ValueError(
                f"simulate_with[{name!r}] must be a 2-tuple of ints (low, high) with low <= high, a non-empty list "
                f"or a callable rng -> value; got {value!r}"
            )
    return dict(spec)


def draw_arguments(spec: Mapping[str, Any], rng: torch.Generator) -> dict:
    """One draw of every argument of a (checked) ``simulate_with`` spec."""
    out = {}
    for name, value in spec.items():
        if callable(value):
            out[name] = value(rng)
        elif isinstance(value, tuple):
            out[name] = int(torch.randint(int(value[0]), int(value[1]) + 1, (), generator=rng))
        else:
            out[name] = value[int(torch.randint(len(value), (), generator=rng))]
    return out


class DrawnArgumentsSource:
    """Fresh simulations every step, each batch with model keyword arguments drawn from ``spec``.

    A simulator per distinct drawn value set (cached for hashable values, e.g. a plate size);
    its site shapes come from one trace of the model with those arguments. Each batch carries
    its simulator as ``batch.simulator`` (the reverse objectives need that model's density).

    Args:
        guide: the guide (its ``model``, ``model_args``, ``model_kwargs``, ``bn``).
        spec: a checked ``simulate_with`` dict.
        batch_size: simulations per step.
        rng: the generator the arguments are drawn with.
        vectorize: the vectorisation decision of the guide's own simulator (reused, not re-checked).
        draws: draws of the arguments per batch (each an equal share of the batch).
    """

    validation = None
    steps_per_epoch = None

    def __init__(self, guide, spec: Mapping[str, Any], batch_size: int, rng: torch.Generator, vectorize: bool | str | None = None,
                 draws: int = 1):
        self.guide, self.spec, self.batch_size, self.rng, self.vectorize = guide, dict(spec), int(batch_size), rng, vectorize
        self.draws = int(draws)
        self._simulators: dict = {}

    def simulator_for(self, drawn: Mapping[str, Any]) -> ModelSimulator:
        """The simulator of the model run with ``drawn`` on top of the guide's ``model_kwargs``."""
        try:
            key = tuple(sorted(drawn.items()))
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._simulators and not any(torch.is_tensor(v) for v in drawn.values()):
            return self._simulators[key]
        sim = self.guide.simulator().at_arguments(drawn, vectorize=self.vectorize)
        if key is not None and not any(torch.is_tensor(v) for v in drawn.values()):
            self._simulators[key] = sim
        return sim

    def _simulate_one(self, n: int) -> Simulations:
        sim = self.simulator_for(draw_arguments(self.spec, self.rng))
        sims = sim.simulate_in_chunks(n)
        sims.simulator = sim
        return sims

    def simulate(self, n: int, draws: int | None = None) -> Simulations:
        """``n`` simulations (``.simulator`` attached) over ``draws`` (default ``self.draws``) draws
        of the arguments in equal shares, e.g. several designs of a covariate in one batch; one
        draw when the drawn shapes differ (data-set sizes)."""
        draws = min(int(draws or self.draws), n)
        if draws == 1:
            return self._simulate_one(n)
        parts = [self._simulate_one(n // draws + (k < n % draws)) for k in range(draws)]
        if len({tuple((k, tuple(v.shape[1:])) for k, v in p.items()) for p in parts}) > 1:
            return self._simulate_one(n)
        sims = Simulations.concat(parts)
        sims.simulator = _MixedJoint([p.simulator for p in parts], [p.num for p in parts])
        return sims

    def next_batch(self) -> Simulations:
        return self.simulate(self.batch_size)

    def standardization(self, n: int) -> Simulations:
        """``n`` simulations for the standardisation: over 16 draws of the arguments for a guide
        with covariates (their statistics then describe the designs, not one design)."""
        return self.simulate(n, 16 if getattr(self.guide, "covariates", ()) else 1)


class _MixedJoint:
    """``log p(z, x)`` of simulations made of consecutive shares, each scored by its own simulator."""

    def __init__(self, simulators: list, sizes: list[int]):
        self.simulators, self.sizes = simulators, sizes

    def log_joint(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out, start = [], 0
        for sim, size in zip(self.simulators, self.sizes):
            out.append(sim.log_joint({k: v[start : start + size] for k, v in values.items()}))
            start += size
        return torch.cat(out)
# ---- end simulate_with ----------------------------------------------------------------------


def _warn_fixed_model(guide, name: str) -> None:
    """The simulation objectives treat the model as fixed: say so when it has learnable parameters."""
    params = model_parameters(guide.model, guide.model_args, guide.model_kwargs)
    if params:
        names = sorted(params)
        warnings.warn(
            f"objective {name!r} trains the guide on simulations of the model as it is: the model's parameters "
            f"{names[:5]}{' ...' if len(names) > 5 else ''} are not learned. To learn them from data use "
            "fit(objective='elbo' or 'iwae', data={site: tensor}) or Pyro's SVI", stacklevel=4)


def _fit_on_data(o: dict) -> FitResult:
    """``fit(data=...)``: the argument checks, seeding and threads of :func:`fit`, then :func:`fit_data`."""
    if o["data"] is None:
        raise ValueError("objective='iwae' learns from data: pass data={observed site: tensor}")
    if not isinstance(o["objective"], str) or o["objective"] not in ("elbo", "iwae"):
        raise ValueError(f"objective {o['objective']!r} trains on simulations of a fixed model; with data use 'elbo' or 'iwae'")
    _check_arguments(o)
    for key in ("num_simulations", "simulate_with"):
        if o[key] is not None:
            raise ValueError(f"{key} draws simulations; fit(data=...) trains on the data only: leave {key} unset")
    if o["distributed"]:
        raise ValueError("fit(data=...) runs in one process; distributed=True is not supported there")
    with torch_threads(o["num_threads"]):
        _seed(o["seed"], None)
        keys = ("objective", "num_steps", "batch_size", "lr", "num_particles", "standardize", "num_standardization",
                "checkpoint", "checkpoint_every", "resume", "lr_schedule", "time_budget", "clip_grad", "weight_decay",
                "progress", "validation_fraction")
        return fit_data(o["guide"], o["data"], **{k: o[k] for k in keys})


def fit(
    guide: TrainableGuide,
    num_steps: int | None = None,
    objective: str | Callable = "skl",
    batch_size: int = 256,
    lr: float = 1e-2,
    num_simulations: int | None = None,
    lr_schedule: str | Callable | None = "cosine",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    seed: int | None = None,
    clip_grad: float | None = 10.0,
    num_standardization: int = 2048,
    validation_fraction: float = 0.1,
    time_budget: float | None = None,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
    distributed: bool | None = None,
    simulate_with: Mapping[str, Any] | None = None,
    draws_per_batch: int = 1,
    data: Mapping[str, torch.Tensor] | None = None,
    num_particles: int | None = None,
    standardize: str | None = "data",
) -> FitResult:
    """Train a guide on simulations ``(z, x) ~ p(z, x)`` of its model.

    Args:
        guide: the guide (a :class:`TrainableGuide`, e.g. ``StructuredGuide``).
        num_steps: total optimisation steps (with ``resume``, training continues from the
            checkpoint's step up to this number). ``None`` (default): 1000, or with a
            ``time_budget`` as many as the budget allows (``fit(time_budget=60)`` trains for 60 s).
        objective: ``"skl"`` (symmetrised KL, default), ``"fkl"`` (forward KL) or ``"elbo"``
            (amortised negative ELBO); see :mod:`pyro_struct.objectives`. The default ``"skl"`` is
            :class:`~pyro_struct.objectives.RobustSymmetrizedKL`, made to hold where the model's
            density is extreme at simulations or guide samples (heavy-tailed scales, funnels, state
            spaces): the first 100 global steps train the forward term only and the next 100 ramp
            the reverse term in (counted by ``len(guide.history)``, so ``resume`` continues the same
            schedule); per-simulation log-ratios beyond a bound are compressed logarithmically (20
            nats until the ramp ends, then doubling every 250 steps); and simulations whose terms
            are not finite are dropped from that step's mean, with gradient 0. Its bias: only
            samples beyond the bound are down-weighted, every term is 0 at ``q = p``, and the bound
            grows, so it vanishes as training goes on; the dropped samples are
            those where the model's density is ``-inf`` at a guide sample. The plain, unbiased
            estimator is ``objective=RobustSymmetrizedKL(0, 0, None, False)``
            (:func:`~pyro_struct.objectives.symmetrized_kl` evaluates it). With ``data``: ``"elbo"``
            or ``"iwae"`` (the importance-weighted bound with ``num_particles`` draws), per data point.
        batch_size: simulations per step (data points per step with ``data``).
        lr: Adam's base learning rate. The default 1e-2 is what the benchmarks support
            (``benchmarks/results/NOTES.md``): with 1e-3 a 3-minute budget left the ecoli70
            guide at 8.8 nats of exact KL, with 1e-2 at 0.005.
        num_simulations: a fixed simulation budget, simulated once and reused over epochs
            (shuffled each epoch); ``None`` draws fresh simulations every step.
        lr_schedule: ``"cosine"`` (default), ``"constant"``/``None`` or ``f(step, num_steps) -> factor``.
        progress: show a tqdm progress bar with the loss.
        checkpoint: a path to write a checkpoint to every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` if that file exists (parameters, optimiser state,
            step, history, simulation budget); the file is validated before the guide is touched.
        seed: seeds Pyro's and torch's random number generators first (under data parallelism,
            rank ``r`` is seeded with :func:`~pyro_struct.training.distributed.rank_seed` ``(seed, r)``).
        clip_grad: maximum gradient norm, positive (``None``: no clipping).
        time_budget: a wall-clock budget in seconds: training stops after the step that
            exhausts it (or at ``num_steps``), and the learning-rate schedule follows whichever
            budget runs out first, so it completes either way.
        validation_fraction: with ``num_simulations``, the share of the budget held out: its
            loss is evaluated after every epoch (``guide.validation_history``) and the
            parameters with the best one are restored at the end (early stopping, as sbi does).
        weight_decay: decoupled weight decay (AdamW) of the conditioners' weight matrices; the
            linear skips and biases are not decayed. A regulariser for small fixed budgets
            (0.3 lowered the exact KL with 5,000 simulations by 10-40%,
            ``benchmarks/results/NOTES.md``); it biases non-linear posteriors, so the default is 0.
        num_standardization: simulations used for the context/latent standardisation, the first
            time a guide is trained (with ``num_simulations``, the budget is used instead); under
            data parallelism each rank draws this many and the statistics pool them all.
        num_threads: torch threads while training (default :data:`pyro_struct.threads.DEFAULT_NUM_THREADS`,
            or ``$PYRO_STRUCT_THREADS``); the caller's setting is restored afterwards.
        distributed: ``None`` (default) trains data-parallel when ``torch.distributed`` is
            initialised (or torchrun's variables are set): each rank simulates its own batches of
            ``batch_size`` (an effective batch of ``world_size * batch_size``), ``num_simulations``
            is split into equal shards, gradients are averaged, only rank 0 writes checkpoints and
            shows progress, and every rank ends with the same parameters; see
            :mod:`pyro_struct.training.distributed`. ``False``: this process alone; ``True``: like
            ``None`` but an error when there is no process group.
        simulate_with: model keyword arguments drawn afresh for every training batch (and for the
            standardisation): ``{"N": (10, 200)}`` draws uniform integers in the closed range, a
            list a uniform choice, a callable ``rng -> value`` anything (e.g. a covariate tensor
            ``{"X": lambda rng: torch.randn(50, 3, generator=rng)}``: a guide with ``covariates=["X"]``
            is then conditioned on each batch's design).
            The guide then learns over those arguments (over data-set sizes with
            ``plates="auto"``). Data arguments of the model must be left unset so that it simulates.
        draws_per_batch: with ``simulate_with``, how many draws of the arguments each batch
            mixes in equal shares (when their shapes agree): more designs per step for a guide
            amortised over covariates.
        data: learn the model's parameters and the guide together from data (a VAE), with
            ``objective="elbo"`` or ``"iwae"``: observed site -> tensor with the data points along
            the first dimension (flat guide: ``(N, *site_shape)``, one data point per run of the
            model) or along the data plate's dimension (``plates="auto"``: one data point per plate
            member; every latent must be in the plate). Each step draws ``batch_size`` data points;
            nothing is simulated. See :func:`~pyro_struct.training.data.fit_data`.
        num_particles: with ``data``, draws per data point ``K`` (default 1 for ``"elbo"``, 8 for ``"iwae"``).
        standardize: with ``data``, where the context statistics come from: ``"data"`` (default,
            the first ``num_standardization`` data points; latents unstandardised), ``"prior"``
            (simulations of the model at its current parameters) or ``None``.

    Returns:
        a :class:`~pyro_struct.training.loop.FitResult`: the loss per step over every fit of this
        guide (also ``guide.history``), with ``validation_history``. With ``"skl"`` a loss
        estimates the expected symmetrised KL in nats; with ``"fkl"`` the expected negative
        log-likelihood of the simulated latents; with ``"elbo"`` the expected negative ELBO.

    Raises:
        ValueError: a bad argument (named in the message), or a checkpoint for another model.
        TrainingError: a non-finite loss or gradient; the parameters of the last step with a
            finite loss and gradient are restored and ``guide.history`` keeps the losses so far.
    """
    num_steps = resolve_num_steps(num_steps, time_budget)
    options = dict(locals())
    if data is not None or objective == "iwae":
        return _fit_on_data(options)
    loss_fn = get_objective(objective)
    _check_arguments(options)
    if simulate_with is not None:
        simulate_with = check_simulate_with(guide.model, simulate_with)
        if num_simulations is not None:
            raise ValueError("simulate_with draws fresh simulations every step; it cannot be combined with num_simulations")
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    if distributed not in (None, True, False):
        raise ValueError(f"distributed must be None, True or False; got {distributed!r}")
    device = _guide_device(guide)
    dp = data_parallel(distributed, device)
    with torch_threads(num_threads):
        _seed(seed, dp)
        _warn_fixed_model(guide, name)
        simulator = guide.simulator()
        simulator.prepare()  # before any restored random state: deciding consumes random numbers
        start, optimizer_state, pool = _resume(guide, checkpoint, dp) if resume else (0, None, None)
        if dp is not None:
            starts = dp.gather(start)
            if len(set(starts)) > 1:
                raise ValueError(
                    f"the ranks resumed {os.fspath(checkpoint)!r} at different steps {starts}: every rank must read the "
                    "same checkpoint file (put it on a file system all machines share)"
                )
            dp.broadcast_module(guide)  # every rank starts from rank 0's parameters and standardisation
        pool, share = _pools(simulator, pool, num_simulations, dp)
        drawn = None
        if simulate_with is not None:
            rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
            # the strategy the guide's simulator decided is reused unchecked for every drawn value set
            drawn = DrawnArgumentsSource(guide, simulate_with, batch_size, rng, vectorize=simulator.strategy, draws=draws_per_batch)
            if not bool(guide.standardized):
                guide.set_standardization(drawn.standardization(num_standardization))
        _standardize(guide, simulator, pool, num_standardization, dp)
        source = SimulationSource(simulator, batch_size) if share is None else PoolSource(_on(share, device), batch_size, validation_fraction)
        source = drawn or source
        checkpointer = _checkpointer(guide, checkpoint, checkpoint_every, pool, dp)
        guide.validation_history = []
        result = train(
            guide, lambda batch: loss_fn(guide, getattr(batch, "simulator", simulator), _on(batch, device)), source,
            num_steps=num_steps, lr=lr, lr_schedule=lr_schedule, time_budget=time_budget, clip_grad=clip_grad,
            weight_decay=weight_decay, progress=progress, desc=f"fit[{name}]", history=guide.history,
            validation_history=guide.validation_history, checkpointer=checkpointer, start_step=start,
            optimizer_state=optimizer_state, advice=_advice(name, lr), sync=dp,
        )
        if dp is not None and checkpointer is not None:
            dp.barrier()  # rank 0's last checkpoint is on disk before any rank goes on (and perhaps reads it)
        return result
