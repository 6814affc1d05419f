"""Simulation from a Pyro model and the training objectives of amortised guides (DESIGN.md section 7)."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

__all__ = [
    "ModelSimulator",
    "Simulations",
    "symmetrized_kl",
    "forward_kl",
    "negative_elbo",
    "OBJECTIVES",
    "get_objective",
]

_PARTICLE_PLATE = "_pyro_struct_particles"


class Simulations(dict):
    """Simulated ``(z, x)``: site -> ``(n, *site_shape)`` for every latent and observed site, with
    ``log_joint`` ``(n,)`` = ``log p(z, x)`` of each simulation."""

    def __init__(self, values: Mapping[str, torch.Tensor], log_joint: torch.Tensor):
        super().__init__(values)
        self.log_joint = log_joint

    @property
    def num(self) -> int:
        return int(self.log_joint.shape[0])

    def select(self, index: torch.Tensor) -> "Simulations":
        """The simulations at ``index`` (a LongTensor of positions)."""
        return Simulations({k: v[index] for k, v in self.items()}, self.log_joint[index])

    @staticmethod
    def concat(parts: Sequence["Simulations"]) -> "Simulations":
        keys = list(parts[0])
        return Simulations(
            {k: torch.cat([p[k] for p in parts]) for k in keys}, torch.cat([p.log_joint for p in parts])
        )


class _NotVectorizable(Exception):
    pass


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
                return poutine.trace(fn).get_trace(*self.model_args, **self.model_kwargs)
            with pyro.plate(_PARTICLE_PLATE, particles, dim=-(self._batch_ndim + 1)):
                return poutine.trace(fn).get_trace(*self.model_args, **self.model_kwargs)

    def _prototype(self) -> None:
        with torch.no_grad():
            tr = self._run(poutine.uncondition(self.model))
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

    def _strip_particles(self, name: str, v: torch.Tensor, n: int) -> torch.Tensor:
        shape = self.site_shapes[name]
        if v.dim() < 1 or v.shape[0] != n:
            raise _NotVectorizable(f"site {name!r} has shape {tuple(v.shape)} inside a particle plate of size {n}")
        rest = tuple(v.shape[1:])
        extra = len(rest) - len(shape)
        if extra < 0 or any(s != 1 for s in rest[:extra]) or rest[extra:] != shape:
            raise _NotVectorizable(f"site {name!r} has shape {tuple(v.shape)}; expected ({n}, ..., {shape})")
        return v.reshape((n,) + shape)

    @staticmethod
    def _site_log_probs(tr, n: int | None) -> torch.Tensor:
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

    def _simulate_vectorized(self, n: int) -> Simulations:
        try:
            tr = self._run(poutine.uncondition(self.model), particles=n)
        except _NotVectorizable:
            raise
        except Exception as e:
            raise _NotVectorizable(f"{type(e).__name__}: {e}") from e
        values = {}
        for name in self.site_shapes:
            site = tr.nodes.get(name)
            if site is None:
                raise _NotVectorizable(f"site {name!r} is missing from the vectorised run")
            values[name] = self._strip_particles(name, site["value"], n)
        return Simulations(values, self._site_log_probs(tr, n))

    def _simulate_loop(self, n: int) -> Simulations:
        parts, lps = [], []
        for _ in range(n):
            tr = self._run(poutine.uncondition(self.model))
            values = {}
            for name, shape in self.site_shapes.items():
                site = tr.nodes.get(name)
                if site is None:
                    raise ValueError(f"the model did not sample site {name!r} in this run; its structure changed")
                values[name] = site["value"].reshape(shape)
            parts.append(values)
            lps.append(self._site_log_probs(tr, None))
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
        except Exception as e:
            raise _NotVectorizable(f"{type(e).__name__}: {e}") from e
        return self._site_log_probs(tr, n)

    def _log_joint_loop(self, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        out = []
        for i in range(n):
            tr = self._run(poutine.condition(self.model, data={k: v[i] for k, v in values.items()}))
            out.append(self._site_log_probs(tr, None))
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
        if n < 1:
            raise ValueError(f"number of simulations must be positive; got {n}")
        self._decide()
        with torch.no_grad():
            if self.vectorized:
                return self._simulate_vectorized(n)
            return self._simulate_loop(n)

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


# --------------------------------------------------------------------------- objectives
def _split(guide, sims: Simulations):
    n = sims.num
    latents = {name: sims[name] for name in guide.latent_sites}
    observed = {name: sims[name] for name in guide.observed_sites}
    flat, _ = guide.pack_observed(observed, "simulations")
    return n, latents, observed, guide.context(flat)


def forward_kl(guide, simulator: ModelSimulator, sims: Simulations) -> torch.Tensor:
    """Forward KL objective: ``E_{p(z,x)}[-log q(z|x)]`` (the expected negative log-likelihood of
    the simulated latents, in nats); needs no model density. Equals ``E_x KL(p(z|x) || q(z|x))``
    up to the constant ``E[log p(z|x)]``."""
    n, latents, _, context = _split(guide, sims)
    return -guide.log_q(latents, context, torch.Size((n,))).mean()


def negative_elbo(guide, simulator: ModelSimulator, sims: Simulations) -> torch.Tensor:
    """Amortised reverse KL: ``E_x E_{q(z|x)}[log q(z|x) - log p(z, x)]`` on simulated ``x`` (the
    negative ELBO averaged over simulated data sets), with reparameterised ``z ~ q``."""
    n, _, observed, context = _split(guide, sims)
    z, log_q = guide.rsample_q(context, 1, torch.Size((n,)))
    z = {k: v.squeeze(0) for k, v in z.items()}
    log_p = simulator.log_joint({**z, **observed})
    return (log_q.squeeze(0) - log_p).mean()


def symmetrized_kl(guide, simulator: ModelSimulator, sims: Simulations) -> torch.Tensor:
    """Symmetrised KL (Weilbach et al. 2020), in nats:
    ``0.5 * (E_{p(z,x)}[log p(z,x) - log q(z|x)] + E_{x, q(z|x)}[log q(z|x) - log p(z,x)])``.

    Both terms use the same simulated ``x``, so ``log p(x)`` cancels and the value is an
    unbiased estimate of ``E_x[0.5 (KL(p||q) + KL(q||p))]``: zero at the exact posterior.
    """
    n, latents, observed, context = _split(guide, sims)
    batch = torch.Size((n,))
    forward_term = sims.log_joint - guide.log_q(latents, context, batch)
    z, log_q = guide.rsample_q(context, 1, batch)
    z = {k: v.squeeze(0) for k, v in z.items()}
    reverse_term = log_q.squeeze(0) - simulator.log_joint({**z, **observed})
    return 0.5 * (forward_term.mean() + reverse_term.mean())


#: objective name -> loss function ``(guide, simulator, simulations) -> scalar tensor``
OBJECTIVES: dict[str, Callable] = {"skl": symmetrized_kl, "fkl": forward_kl, "elbo": negative_elbo}


def get_objective(objective: str | Callable) -> Callable:
    """The loss function for an objective name (``"skl"``, ``"fkl"``, ``"elbo"``) or a callable
    with the same signature."""
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective]
