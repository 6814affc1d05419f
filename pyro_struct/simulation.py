"""Simulation from a Pyro model: joint draws ``(z, x) ~ p(z, x)`` and ``log p(z, x)``, vectorised over particles."""

from __future__ import annotations

import contextlib
import math
import os
import traceback
import types
import warnings
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
import torch.distributions as tdist
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.overrides import TorchFunctionMode

from .covariates import covariate_values, with_arguments
from .errors import ModelStructureError

__all__ = ["ModelSimulator", "Simulations", "STRATEGIES"]

_PARTICLE_PLATE = "_pyro_struct_particles"

#: how a simulator batches the model over particles, cheapest first: an outer particle plate,
#: ``torch.func.vmap`` over single runs, or one run per particle
STRATEGIES = ("plate", "vmap", "loop")


class Simulations(dict):
    """Simulated ``(z, x)``: site -> ``(n, *site_shape)`` for every latent and observed site, with
    ``log_joint`` ``(n,)`` = ``log p(z, x)`` of each simulation."""

    def __init__(self, values: Mapping[str, torch.Tensor], log_joint: torch.Tensor):
        super().__init__(values)
        self.log_joint = log_joint

    @property
    def num(self) -> int:
        """Number of simulations ``n``."""
        return int(self.log_joint.shape[0])

    def select(self, index: torch.Tensor) -> "Simulations":
        """The simulations at ``index`` (a LongTensor of positions)."""
        return Simulations({k: v[index] for k, v in self.items()}, self.log_joint[index])

    @staticmethod
    def concat(parts: Sequence["Simulations"]) -> "Simulations":
        """The simulations of ``parts`` one after the other."""
        keys = list(parts[0])
        return Simulations({k: torch.cat([p[k] for p in parts]) for k in keys}, torch.cat([p.log_joint for p in parts]))


class _NotVectorizable(RuntimeError):
    """The model cannot run under a batching strategy (the message says why, and where)."""


class _Uncondition(Messenger):
    """``poutine.uncondition`` that leaves ``pyro.deterministic`` sites alone.

    Pyro's version resamples a deterministic site from its ``Delta``, whose default event
    shape is the whole value: inside plates that value is then broadcast against the plates a
    second time (an ``(8,)`` site inside a plate of 8 comes back ``(8, 8)``).
    """

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] and not (msg["infer"] or {}).get("_deterministic"):
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["infer"]["obs"] = msg["value"]
            msg["value"] = None
            msg["done"] = False


def _uncondition(model: Callable) -> Callable:
    return _Uncondition()(model)


def _site_log_probs(tr, n: int | None) -> torch.Tensor:
    """``log p`` of every random sample site, summed per particle (``n``) or in total (``None``)."""
    tr.compute_log_prob()
    total = torch.zeros(())
    for name, site in tr.nodes.items():
        # a plate's own subsample site has a scalar log density of 0: not a particle quantity
        if site["type"] != "sample" or site["infer"].get("_deterministic") or site_is_subsample(site):
            continue
        lp = site["log_prob"]
        if n is None:
            total = total + lp.sum()
        else:
            if lp.dim() == 0 or lp.shape[0] != n:
                raise _NotVectorizable(f"site {name!r} has log-density shape {tuple(lp.shape)} for {n} particles")
            total = total + lp.reshape(n, -1).sum(-1)
    return total


# ------------------------------------------------------------ vmap support
def _random_fill(sampler: Callable, **defaults) -> Callable:
    """An out-of-place stand-in for an in-place random fill ``t.normal_(...)``: ``sampler(t, *params)``
    with the fill's parameters (named as torch names them, with their defaults)."""
    names = list(defaults)

    # a generator cannot be honoured: vmap's per-particle randomness draws from the global one
    def fill(t: torch.Tensor, *args, generator=None, **kwargs) -> torch.Tensor:
        params = {**defaults, **dict(zip(names, args)), **kwargs}
        return sampler(t, *(params[k] for k in names))

    return fill


def _rand(t: torch.Tensor) -> torch.Tensor:
    return torch.rand(t.shape, dtype=t.dtype, device=t.device)


def _randn(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape, dtype=t.dtype, device=t.device)


def _bernoulli(t: torch.Tensor, p) -> torch.Tensor:
    return torch.bernoulli(torch.as_tensor(p, dtype=t.dtype, device=t.device).expand(t.shape))


# torch's own samplers fill a fresh (unbatched) tensor in place, which vmap cannot make differ
# between particles; the same draws out of place come back batched
_RANDOM_FILLS = {
    torch.Tensor.normal_: _random_fill(lambda t, m, s: _randn(t) * s + m, mean=0.0, std=1.0),
    torch.Tensor.uniform_: _random_fill(lambda t, a, b: _rand(t) * (b - a) + a, **{"from": 0.0, "to": 1.0}),
    torch.Tensor.exponential_: _random_fill(lambda t, rate: -torch.log1p(-_rand(t)) / rate, lambd=1.0),
    torch.Tensor.cauchy_: _random_fill(lambda t, m, s: m + s * torch.tan(math.pi * (_rand(t) - 0.5)), median=0.0, sigma=1.0),
    torch.Tensor.log_normal_: _random_fill(lambda t, m, s: torch.exp(_randn(t) * s + m), mean=1.0, std=2.0),
    torch.Tensor.bernoulli_: _random_fill(_bernoulli, p=0.5),
}


class _OutOfPlaceRandomness(TorchFunctionMode):
    """Inside ``torch.func.vmap(..., randomness="different")``: an in-place random fill of an
    unbatched tensor (``torch.empty(shape).normal_()``, how ``Normal.rsample`` draws its noise)
    returns a fresh batched draw instead, so each particle gets its own; ``clamp_`` of a batched
    tensor runs as one batched op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fill = _RANDOM_FILLS.get(func)
        if fill is not None and not torch._C._functorch.is_batchedtensor(args[0]):
            return fill(*args, **kwargs)
        if func is torch.Tensor.clamp_ and torch._C._functorch.is_batchedtensor(args[0]):
            # vmap has no batching rule for clamp_ (Gamma.rsample clamps its draw in place) and
            # would run it particle by particle
            return args[0].copy_(args[0].clamp(*args[1:], **kwargs))
        return func(*args, **kwargs)


# tensor factories a model preallocates with (``h = torch.zeros(T)``, then ``h[t] = ...``)
_FACTORIES = frozenset({
    torch.zeros, torch.ones, torch.empty, torch.full, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
})


class _BatchedFactories(TorchFunctionMode):
    """Inside ``torch.func.vmap``: tensors from the factories a model preallocates with come back
    batched, so that writing a batched value into them in place (``h[t] = pyro.sample(...)``)
    works; vmap refuses to write a batched value into an unbatched tensor.

    Args:
        carrier: any batched tensor of the current vmap level (its values are not used).
    """

    def __init__(self, carrier: torch.Tensor):
        super().__init__()
        self.zero = torch.zeros_like(carrier.reshape(-1)[0], dtype=torch.float32)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _FACTORIES and not torch._C._functorch.is_batchedtensor(out):
            out = torch.zeros_like(self.zero, dtype=out.dtype) + out
        return out


def _dirichlet_draw(fn) -> torch.Tensor | None:
    """A draw of ``fn`` as normalised Gammas when it is a Dirichlet or Beta, or by
    :func:`_lkj_cholesky_draw` when an LKJ Cholesky factor (possibly masked, ``Independent`` or
    transformed), else ``None``: torch draws those through an ``autograd.Function`` that vmap
    cannot batch."""
    if isinstance(fn, (tdist.Independent, MaskedDistribution)):
        return _dirichlet_draw(fn.base_dist)
    if isinstance(fn, tdist.TransformedDistribution):
        x = _dirichlet_draw(fn.base_dist)
        for t in fn.transforms if x is not None else ():
            x = t(x)
        return x
    if isinstance(fn, tdist.LKJCholesky):
        return _lkj_cholesky_draw(fn)
    if isinstance(fn, tdist.Beta):
        concentration = torch.stack([fn.concentration1, fn.concentration0], -1).expand(fn.batch_shape + (2,))
    elif isinstance(fn, tdist.Dirichlet):
        concentration = fn.concentration.expand(fn.batch_shape + fn.event_shape)
    else:
        return None
    g = torch._standard_gamma(concentration).clamp(min=torch.finfo(concentration.dtype).tiny)
    x = g / g.sum(-1, keepdim=True)
    return x[..., 0] if isinstance(fn, tdist.Beta) else x


def _lkj_cholesky_draw(fn: tdist.LKJCholesky) -> torch.Tensor:
    """A draw of an LKJ Cholesky factor by the onion method (Lewandowski et al. 2009, sec. 3.2).

    torch's ``LKJCholesky.sample`` (2.13) gives row ``k >= 2`` a radius ``y ~ Beta((k + 1) / 2, ...)``
    where the onion method has ``Beta(k / 2, ...)``: its correlations beyond the first column are too
    spread (LKJ(3, 1): variance 0.30 where the law, and its own ``log_prob``, have 0.25). Simulations
    must follow the density that the model scores, so every strategy draws here; the Beta draws are
    normalised Gammas and nothing is written in place, so that vmap batches it too."""
    k = torch.arange(fn.dim, dtype=fn.concentration.dtype, device=fn.concentration.device)
    # row 0 has no direction to draw (its radius is unused); row k >= 1 has k free coordinates
    conc1 = torch.where(k == 0, torch.full_like(k, 0.5), k / 2)
    conc0 = fn.concentration.unsqueeze(-1) + 0.5 * (fn.dim - 2) - 0.5 * (k - 1).clamp(min=0)
    y = _dirichlet_draw(tdist.Beta(conc1.expand(conc0.shape), conc0)).unsqueeze(-1)  # (*batch, dim, 1)
    u = torch.randn(fn.batch_shape + fn.event_shape, dtype=y.dtype, device=y.device).tril(-1)
    u = torch.where((k == 0)[:, None], torch.zeros_like(u), u / u.norm(dim=-1, keepdim=True).clamp(min=1e-30))
    w = torch.sqrt(y) * u
    diag = torch.clamp(1 - torch.sum(w**2, dim=-1), min=torch.finfo(w.dtype).tiny).sqrt()
    return w + torch.diag_embed(diag)


def _lkj_base(fn):
    """The ``LKJCholesky`` under masks and ``Independent`` wrappers of ``fn``, else ``None``."""
    while isinstance(fn, (tdist.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, tdist.LKJCholesky) else None


class _LKJSampling(Messenger):
    """Draws unobserved ``LKJCholesky`` sites by :func:`_lkj_cholesky_draw` (torch's sampler
    does not follow its own density); entered outside the particle plate by every run."""

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["args"] or msg["kwargs"]:
            return
        fn = _lkj_base(msg["fn"])
        if fn is not None:
            msg["value"] = _lkj_cholesky_draw(fn).expand(msg["fn"].batch_shape + msg["fn"].event_shape)


class _VmapSampling(Messenger):
    """Draws the model's latent values in ways ``torch.func.vmap`` batches (see
    :class:`_OutOfPlaceRandomness` and :func:`_dirichlet_draw`)."""

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        value = None if msg["args"] or msg["kwargs"] else _dirichlet_draw(msg["fn"])
        msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"]) if value is None else value


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, pyro))


def _describe(e: BaseException) -> str:
    """``e``'s own message (without the trace-shape table Pyro appends) and the model statement
    that raised it: the innermost traceback frame outside torch, Pyro and this module."""
    while e.__cause__ is not None:  # Pyro re-raises with the trace shapes appended
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not frame.filename.startswith(_LIBRARY_DIRS) and frame.filename != __file__:
            return f"{text} at {frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return text


class ModelSimulator:
    """Draws ``(z, x) ~ p(z, x)`` from a model with its observations removed, and evaluates
    ``log p(z, x)``, batched over particles when the model allows it.

    Strategies (:data:`STRATEGIES`), tried cheapest first on the first use:

    - ``"plate"``: the model runs once inside ``pyro.plate("_pyro_struct_particles", n)`` placed
      left of every batch dimension it uses (models whose every statement broadcasts);
    - ``"vmap"``: ``torch.func.vmap`` over single runs of the model, with different randomness per
      particle: each run sees unbatched tensors, so ordinary code (``X @ w``, ``torch.stack`` of
      loop variables, ``.T``, indexing, the model's own plates) works as written. Pyro's
      validation is off inside (it branches on tensor values). A model that writes sampled
      values into a preallocated tensor (``h = torch.zeros(T); h[t] = ...``) is retried with
      its preallocations batched (:class:`_BatchedFactories`);
    - ``"loop"``: one run per particle, only for what cannot be batched (Python control flow on a
      sampled value, ``.item()``), with a one-time warning naming the model statement that failed.

    A strategy is taken when every site comes back ``(n, *site_shape)`` and its log density (both
    from the simulation and from :meth:`log_joint`) agrees with one-at-a-time evaluation (a model
    that sums over its own batch would mix particles under the plate).

    Args:
        model: the Pyro model.
        bn: its :class:`~pyro_struct.BayesNet` (gives the sites and their shapes).
        model_args, model_kwargs: the arguments the model runs with.
        vectorize: ``None`` (detect), ``True`` (detect, but raise instead of falling back to the
            loop), ``False`` (loop), or a strategy name (forced, unchecked).
        covariates: names of covariate arguments (sites of ``bn`` that are model arguments, not
            sample sites): their values in this call are attached to every simulation
            ``(n, *shape)`` and ignored by :meth:`log_joint`.

    Attributes:
        strategy: the strategy in use (``None`` until decided).
        vectorized: ``strategy != "loop"`` (``None`` until decided).

    Raises:
        ModelStructureError: (from :meth:`simulate` / :meth:`log_joint`) a run of the model has a
            sample site the traced model does not have, or lacks one (dynamic structure).
    """

    def __init__(self, model: Callable, bn, model_args: Sequence = (), model_kwargs: Mapping | None = None, vectorize: bool | str | None = None,
                 covariates: Sequence[str] = ()):
        if vectorize not in (None, True, False) + STRATEGIES:
            raise ValueError(f"vectorize must be None, True, False or one of {STRATEGIES}; got {vectorize!r}")
        self.model = model
        self.bn = bn
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.covariates = covariate_values(model, self.model_args, self.model_kwargs, tuple(covariates), "simulation")
        self.site_shapes = {name: tuple(int(s) for s in info.shape) for name, info in bn.sites.items() if name not in self.covariates}
        self.strategy = "loop" if vectorize is False else (vectorize if isinstance(vectorize, str) else None)
        self._strict = vectorize is True
        self._batch_ndim = None
        self._warned = False
        self._validated = False
        self._batch_factories = False  # see _BatchedFactories; tried only when plain vmap fails

    @property
    def vectorized(self) -> bool | None:
        """Whether simulation is batched (``strategy != "loop"``); ``None`` until decided."""
        return None if self.strategy is None else self.strategy != "loop"

    # ------------------------------------------------------------- internals
    def _run(self, fn, *, particles: int | None = None, validate: bool | None = None):
        """Trace ``fn`` (hidden from outer handlers), inside the particle plate if ``particles``."""
        # argument validation is checked while deciding; later runs skip it: it costs more than
        # the model itself on small models (and it cannot run under vmap)
        validate = not self._validated if validate is None else validate
        # outside the particle plate, so that it sees each site's distribution broadcast over particles
        with poutine.block(), _LKJSampling(), pyro.validation_enabled(validate):
            if particles is None:
                tr = poutine.trace(fn).get_trace(*self.model_args, **self.model_kwargs)
            else:
                with pyro.plate(_PARTICLE_PLATE, particles, dim=-(self._batch_ndim + 1)):
                    tr = poutine.trace(fn).get_trace(*self.model_args, **self.model_kwargs)
        self._check_sites(tr)
        return tr

    def _check_sites(self, tr) -> None:
        """Every random sample site of this run must be one the traced model has."""
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or name in self.site_shapes:
                continue
            infer = site["infer"] or {}
            if infer.get("_deterministic") or infer.get("is_auxiliary"):
                continue
            if site["is_observed"] and site.get("mask") is False:
                continue
            raise ModelStructureError(
                f"site {name!r} appeared in a run of the model but not when it was traced (dynamic "
                "structure): pyro_struct needs the same sample sites in every run. Sample it "
                "unconditionally (mask it with poutine.mask where it should not count), or raise "
                "num_probes so that tracing sees every branch."
            )

    def _prototype(self) -> None:
        with torch.no_grad():
            tr = self._run(_uncondition(self.model))
        ndim = 0
        self._event_dims = {}
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                self._event_dims[name] = site["fn"].event_dim
                ndim = max(ndim, site["value"].dim() - site["fn"].event_dim, len(getattr(site["fn"], "batch_shape", ())))
                for frame in site["cond_indep_stack"]:
                    if frame.dim is not None:
                        ndim = max(ndim, -frame.dim)
        self._batch_ndim = ndim

    def _site_value(self, tr, name: str):
        site = tr.nodes.get(name)
        if site is None or site["type"] != "sample":
            raise ModelStructureError(
                f"site {name!r} was traced but is missing from a run of the model (dynamic structure): "
                "pyro_struct needs the same sample sites in every run; sample it unconditionally"
            )
        return site["value"]

    def _strip_particles(self, name: str, v: torch.Tensor, n: int) -> torch.Tensor:
        shape = self.site_shapes[name]
        if v.dim() < 1 or v.shape[0] != n:
            raise _NotVectorizable(f"site {name!r} has shape {tuple(v.shape)} inside a particle plate of size {n}")
        rest = tuple(v.shape[1:])
        extra = len(rest) - len(shape)
        if extra < 0 or any(s != 1 for s in rest[:extra]) or rest[extra:] != shape:
            raise _NotVectorizable(f"site {name!r} has shape {tuple(v.shape)}; expected ({n}, ..., {shape})")
        return v.reshape((n,) + shape)

    def _simulate_plate(self, n: int) -> Simulations:
        try:
            tr = self._run(_uncondition(self.model), particles=n)
        except (_NotVectorizable, ModelStructureError):
            raise
        except Exception as e:
            raise _NotVectorizable(_describe(e)) from e
        values = {name: self._strip_particles(name, self._site_value(tr, name), n) for name in self.site_shapes}
        return Simulations(values, _site_log_probs(tr, n))

    def _one_run(self, model: Callable):
        """One unbatched run of ``model``: every site's value ``site_shape`` and ``log p`` ``()``."""
        with pyro.validation_enabled(False):  # its NaN checks branch on tensor values
            tr = self._run(model, validate=False)
            log_p = _site_log_probs(tr, None)
        return {name: self._site_value(tr, name).reshape(shape) for name, shape in self.site_shapes.items()}, log_p

    @staticmethod
    def _vmapped(fn: Callable, *args):
        """``torch.func.vmap(fn)(*args)`` with per-particle randomness; failures are _NotVectorizable."""
        try:
            return torch.func.vmap(fn, randomness="different")(*args)
        except (_NotVectorizable, ModelStructureError):
            raise
        except Exception as e:
            raise _NotVectorizable(_describe(e)) from e

    def _factories(self, carrier: torch.Tensor | None):
        """:class:`_BatchedFactories` where the model needs them (decided once), else nothing."""
        return _BatchedFactories(carrier) if self._batch_factories and carrier is not None else contextlib.nullcontext()

    def _simulate_vmap(self, n: int) -> Simulations:
        model = _VmapSampling()(_uncondition(self.model))

        def one(carrier):
            with self._factories(carrier):
                return self._one_run(model)

        with _OutOfPlaceRandomness():
            values, log_joint = self._vmapped(one, torch.zeros(n))
        return Simulations(values, log_joint)

    def _simulate_loop(self, n: int) -> Simulations:
        parts, lps = [], []
        for _ in range(n):
            tr = self._run(_uncondition(self.model))
            parts.append({name: self._site_value(tr, name).reshape(shape) for name, shape in self.site_shapes.items()})
            lps.append(_site_log_probs(tr, None))
        return Simulations({k: torch.stack([p[k] for p in parts]) for k in self.site_shapes}, torch.stack(lps))

    def _padded(self, name: str, v: torch.Tensor, n: int) -> torch.Tensor:
        shape = self.site_shapes[name]
        event_dim = self._event_dims.get(name, 0)
        pad = self._batch_ndim - (len(shape) - event_dim)
        return v.reshape((n,) + (1,) * max(pad, 0) + shape)

    def _log_joint_plate(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        data = {name: self._padded(name, v, n) for name, v in values.items()}
        try:
            tr = self._run(poutine.condition(self.model, data=data), particles=n)
        except ModelStructureError:
            raise
        except Exception as e:
            raise _NotVectorizable(_describe(e)) from e
        return _site_log_probs(tr, n)

    def _log_joint_vmap(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        def one(data):
            with pyro.validation_enabled(False), self._factories(next(iter(data.values()), None)):
                return _site_log_probs(self._run(poutine.condition(self.model, data=data), validate=False), None)

        return self._vmapped(one, {k: v.reshape((n,) + tuple(v.shape[1:])) for k, v in values.items()})

    def _log_joint_loop(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        out = []
        for i in range(n):
            tr = self._run(poutine.condition(self.model, data={k: v[i] for k, v in values.items()}))
            out.append(_site_log_probs(tr, None))
        return torch.stack(out)

    def _simulator(self, strategy: str) -> Callable:
        return {"plate": self._simulate_plate, "vmap": self._simulate_vmap, "loop": self._simulate_loop}[strategy]

    def _scorer(self, strategy: str) -> Callable:
        return {"plate": self._log_joint_plate, "vmap": self._log_joint_vmap, "loop": self._log_joint_loop}[strategy]

    def _check(self, strategy: str) -> str | None:
        """Why ``strategy`` does not work for this model (``None`` when it does), from 3 draws."""
        try:
            with torch.no_grad():
                sims = self._simulator(strategy)(3)
                loop = self._log_joint_loop(sims, 3)
                vec = self._scorer(strategy)(sims, 3)
        except _NotVectorizable as e:
            return str(e)
        scale = 1e-3 * (1 + loop.abs())
        if not (torch.isfinite(loop).all() and ((vec - loop).abs() <= scale).all() and ((sims.log_joint - loop).abs() <= scale).all()):
            return "its batched log density differs from one-at-a-time evaluation (does it reduce over a batch dimension?)"
        return None

    def prepare(self) -> None:
        """Decide (once) how the model is batched (:attr:`strategy`); later calls do nothing."""
        self._decide()

    def _decide(self) -> None:
        if self._batch_ndim is None:
            self._prototype()
        if self.strategy is not None:
            self._validated = True
            return
        reasons = []
        # plain vmap first: preallocations made batched cost memory and are only needed by models
        # that write sampled values into them
        for strategy, batch_factories in (("plate", False), ("vmap", False), ("vmap", True)):
            self._batch_factories = batch_factories
            reasons.append(self._check(strategy))
            if reasons[-1] is None:
                self.strategy = strategy
                break
        else:
            self._batch_factories = False
            # plain vmap runs the model as written, so its failure names what cannot be batched
            if self._strict:
                raise ValueError(f"vectorize=True, but the model cannot be batched over particles: {reasons[1]}")
            self.strategy = "loop"
        self._validated = True
        if self.strategy == "loop" and not self._warned:
            self._warned = True
            warnings.warn(
                f"the model could not be vectorised ({reasons[1]}); simulating one sample at a "
                "time, which is much slower. Python control flow on a sampled value (`if z > 0`, "
                "`.item()`) cannot be batched: torch.where computes both branches and can.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- public
    _SAME = object()

    def at_arguments(self, updates: Mapping[str, Any], vectorize: bool | str | None = _SAME) -> "ModelSimulator":
        """A simulator of the same model run with the arguments ``updates`` replaced by name (a
        drawn plate size, another design of a covariate), its site shapes read from one trace at
        those arguments; ``vectorize`` defaults to this simulator's decided strategy (reused unchecked)."""
        args, kwargs = with_arguments(self.model, self.model_args, self.model_kwargs, updates)
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(self.model).get_trace(*args, **kwargs)
        # the simulator needs only each site's value shape at these arguments (covariates are arguments, not sites)
        sites = {name: types.SimpleNamespace(shape=tuple(tr.nodes[name]["value"].shape)) for name in self.site_shapes}
        vectorize = self.strategy if vectorize is ModelSimulator._SAME else vectorize
        sim = ModelSimulator(self.model, types.SimpleNamespace(sites=sites), args, kwargs, vectorize=vectorize,
                             covariates=tuple(self.covariates))
        sim._batch_factories = self._batch_factories
        return sim

    def simulate(self, n: int) -> Simulations:
        """``n`` joint draws ``(z, x) ~ p``: site -> ``(n, *site_shape)`` plus ``.log_joint`` ``(n,)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of simulations must be a positive int; got {n!r}")
        self._decide()
        with torch.no_grad():
            sims = self._simulator(self.strategy)(n)
        for name, value in self.covariates.items():  # the same design for every simulation
            sims[name] = value.detach().expand((n,) + tuple(value.shape))
        return sims

    def simulate_in_chunks(self, n: int, chunk: int = 4096) -> Simulations:
        """:meth:`simulate` of ``n`` draws in chunks of at most ``chunk`` (bounded peak memory)."""
        parts = [self.simulate(min(chunk, n - i)) for i in range(0, n, chunk)]
        return parts[0] if len(parts) == 1 else Simulations.concat(parts)

    def log_joint(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log p(z, x)`` ``(n,)`` of values site -> ``(n, *site_shape)``, differentiable in the
        values (objectives backpropagate through it into guide samples).

        Every latent and observed site must be given (covariates are ignored: the model runs with
        this simulator's arguments).
        """
        values = {k: v for k, v in values.items() if k not in self.covariates}
        missing = [s for s in self.site_shapes if s not in values]
        if missing:
            raise ValueError(f"log_joint needs a value for every site; missing {missing[0]!r}")
        n = next(iter(values.values())).shape[0]
        self._decide()
        return self._scorer(self.strategy)(values, n)
