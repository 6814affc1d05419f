"""Simulation from a Pyro model: joint draws ``(z, x) ~ p(z, x)`` and ``log p(z, x)``, vectorised over particles."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .errors import ModelStructureError

__all__ = ["ModelSimulator", "Simulations"]

_PARTICLE_PLATE = "_pyro_struct_particles"


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


class _NotVectorizable(Exception):
    pass


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
    total = 0.0
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


class ModelSimulator:
    """Draws ``(z, x) ~ p(z, x)`` from a model with its observations removed, and evaluates
    ``log p(z, x)``, vectorised over a particle plate when the model allows it.

    The model is vectorised by running it inside ``pyro.plate("_pyro_struct_particles", n)``
    placed left of every batch dimension the model uses. The first use checks that every
    site then has shape ``(n, *site_shape)`` and that the vectorised log density agrees with
    one-at-a-time evaluation (a model that sums over its own batch would mix particles); if
    not, or if the vectorised run raises (``.item()``, Python control flow on a sampled value),
    it falls back to a Python loop with a one-time warning.

    Args:
        model: the Pyro model.
        bn: its :class:`~pyro_struct.BayesNet` (gives the sites and their shapes).
        model_args, model_kwargs: the arguments the model runs with.
        vectorize: ``None`` (detect), ``True`` (force, errors propagate) or ``False`` (loop).

    Raises:
        ModelStructureError: (from :meth:`simulate` / :meth:`log_joint`) a run of the model has a
            sample site the traced model does not have, or lacks one (dynamic structure).
    """

    def __init__(self, model: Callable, bn, model_args: Sequence = (), model_kwargs: Mapping | None = None, vectorize: bool | None = None):
        self.model = model
        self.bn = bn
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.site_shapes = {name: tuple(int(s) for s in info.shape) for name, info in bn.sites.items()}
        self.vectorized = vectorize
        self._batch_ndim = None
        self._warned = False
        self._validated = False

    # ------------------------------------------------------------- internals
    def _run(self, fn, *, particles: int | None = None):
        """Trace ``fn`` (hidden from outer handlers), inside the particle plate if ``particles``."""
        # argument validation is checked once (by _decide's runs); later runs skip it: it costs
        # more than the model itself on small models
        with poutine.block(), pyro.validation_enabled(self.vectorized is None or not self._validated):
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

    def _simulate_vectorized(self, n: int) -> Simulations:
        try:
            tr = self._run(_uncondition(self.model), particles=n)
        except (_NotVectorizable, ModelStructureError):
            raise
        except Exception as e:
            raise _NotVectorizable(f"{type(e).__name__}: {e}") from e
        values = {name: self._strip_particles(name, self._site_value(tr, name), n) for name in self.site_shapes}
        return Simulations(values, _site_log_probs(tr, n))

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

    def _log_joint_vectorized(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        data = {name: self._padded(name, v, n) for name, v in values.items()}
        try:
            tr = self._run(poutine.condition(self.model, data=data), particles=n)
        except ModelStructureError:
            raise
        except Exception as e:
            raise _NotVectorizable(f"{type(e).__name__}: {e}") from e
        return _site_log_probs(tr, n)

    def _log_joint_loop(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        out = []
        for i in range(n):
            tr = self._run(poutine.condition(self.model, data={k: v[i] for k, v in values.items()}))
            out.append(_site_log_probs(tr, None))
        return torch.stack(out)

    def prepare(self) -> None:
        """Decide (once) whether the model vectorises; later calls do nothing."""
        self._decide()

    def _decide(self) -> None:
        if self._batch_ndim is None:
            self._prototype()
        if self.vectorized is not None:
            return
        reason = None
        try:
            with torch.no_grad():
                sims = self._simulate_vectorized(3)
                loop = self._log_joint_loop(sims, 3)
                vec = self._log_joint_vectorized(sims, 3)
            scale = 1e-3 * (1 + loop.abs())
            if not (torch.isfinite(loop).all() and ((vec - loop).abs() <= scale).all() and ((sims.log_joint - loop).abs() <= scale).all()):
                reason = "its vectorised log density differs from one-at-a-time evaluation (does it reduce over a batch dimension?)"
        except _NotVectorizable as e:
            reason = str(e)
        self.vectorized = reason is None
        self._validated = True
        if reason is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"the model could not be vectorised over a particle plate ({reason}); simulating one "
                "sample at a time, which is much slower. Make every sample statement broadcast over "
                "leading batch dimensions to speed training up.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- public
    def simulate(self, n: int) -> Simulations:
        """``n`` joint draws ``(z, x) ~ p``: site -> ``(n, *site_shape)`` plus ``.log_joint`` ``(n,)``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of simulations must be a positive int; got {n!r}")
        self._decide()
        with torch.no_grad():
            if self.vectorized:
                return self._simulate_vectorized(n)
            return self._simulate_loop(n)

    def simulate_in_chunks(self, n: int, chunk: int = 4096) -> Simulations:
        """:meth:`simulate` of ``n`` draws in chunks of at most ``chunk`` (bounded peak memory)."""
        parts = [self.simulate(min(chunk, n - i)) for i in range(0, n, chunk)]
        return parts[0] if len(parts) == 1 else Simulations.concat(parts)

    def log_joint(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log p(z, x)`` ``(n,)`` of values site -> ``(n, *site_shape)`` (differentiable in the values).

        Every latent and observed site must be given.
        """
        missing = [s for s in self.site_shapes if s not in values]
        if missing:
            raise ValueError(f"log_joint needs a value for every site; missing {missing[0]!r}")
        n = next(iter(values.values())).shape[0]
        self._decide()
        if self.vectorized:
            return self._log_joint_vectorized(values, n)
        return self._log_joint_loop(values, n)
