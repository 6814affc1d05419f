"""Structured amortised guides: a model's faithful inverse compiled into a conditional flow, usable as a Pyro guide."""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import tempfile
from contextlib import ExitStack
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from torch.distributions import biject_to, constraints

from .errors import ModelStructureError
from .inversion import INVERSE_KINDS

__all__ = ["StructuredGuide", "Posterior", "AmortizedModel", "amortize", "FLOWS", "STRUCTURES"]

#: flow name -> (module, class) of the conditional flow compiled over the inverse structure
FLOWS: dict[str, tuple[str, str]] = {
    "straf": ("pyro_struct.flows.straf", "StrAF"),
    "grf": ("pyro_struct.flows.grf", "GraphicalResidualFlow"),
    "cnf": ("pyro_struct.flows.cnf", "StructuredCNF"),
}
#: inverse-structure kinds accepted by :class:`StructuredGuide`
STRUCTURES = INVERSE_KINDS

_FILE_FORMAT = "pyro_struct.StructuredGuide/1"
_instance_counter = itertools.count()


def _flow_class(flow: str):
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
    module, name = FLOWS[flow]
    return getattr(importlib.import_module(module), name)


def _check_structure_kind(structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; use one of {list(STRUCTURES)}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sum_to_batch(t: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Sum a per-element tensor ``(*batch, *rest)`` (or a broadcastable one) down to ``batch_shape``."""
    k = len(batch_shape)
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    while t.dim() < k:
        t = t.unsqueeze(0)
    t = t.reshape(t.shape[:k] + (-1,)).sum(-1)
    return t.expand(batch_shape)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _SiteBlock:
    """One site's slice of the flat latent (unconstrained) or observed vector."""

    def __init__(self, info):
        self.name = info.name
        self.shape = tuple(int(s) for s in info.shape)
        self.node_shape = tuple(int(s) for s in info.node_shape)
        self.offset = int(info.offset)
        self.size = _numel(self.node_shape)
        self.support = info.support
        self.event_dim = int(getattr(info, "event_dim", 0) or 0)
        self.transform = None if info.observed else biject_to(info.support)


class _ConditionedFlowDistribution(TorchDistribution):
    """The guide's flow conditioned on one context, as a distribution over the flat
    unconstrained latent vector (trace order): the auxiliary site of a guide call.

    It caches the log density computed while sampling, so Pyro's ELBO does not invert the
    flow (an iterative solve for residual flows, an ODE solve for CNFs) to score its own sample.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, guide: "StructuredGuide", context: torch.Tensor | None, batch_shape=torch.Size()):
        self._guide = guide
        self._context = context
        self._cache = None
        super().__init__(torch.Size(batch_shape), torch.Size((guide.latent_dim,)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _ConditionedFlowDistribution(self._guide, self._context, torch.Size(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = _numel(shape)
        flat, log_q = self._guide._sample_flat(self._context, n, torch.Size())
        flat = flat.reshape(shape + (self._guide.latent_dim,))
        log_q = log_q.reshape(shape)
        self._cache = (flat, log_q)
        return flat

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        return self._guide._flat_log_prob(value, self._context)


class StructuredGuide(PyroModule):
    """An amortised guide ``q(z | x)``: the model's faithful inverse compiled into a conditional flow.

    The model is traced into a scalar :class:`~pyro_struct.BayesNet`, inverted
    (:func:`~pyro_struct.inverse_structure`) and a conditional flow of the chosen family is
    built over the unconstrained latent vector with the inverse's adjacency. Each latent
    site is mapped to unconstrained space with ``biject_to(support)``; the flow's coordinate
    ``k`` is the inverse's node ``order[k]``; the flow's context is the flattened observed
    values in ``inverse.observed`` order, standardised with statistics from simulations.

    Calling the guide with the model's arguments (``guide(*args, **kwargs)``) reads this
    call's observed values from the model, conditions the flow on them and samples every
    latent site in constrained space with the right log density, like Pyro's
    ``AutoContinuous``; it therefore works with ``SVI``/``Trace_ELBO`` and ``Predictive``.

    Args:
        model: a Pyro model.
        flow: ``"straf"`` (default), ``"grf"`` or ``"cnf"``.
        structure: ``"faithful"`` (default), ``"dense"``, ``"moralized"``, ``"random"`` or
            ``"meanfield"`` (see :func:`~pyro_struct.inverse_structure`).
        observed: names of observed sites (default: the sites with ``obs=`` in the traced model).
        model_args, model_kwargs: arguments the model is traced (and simulated) with.
        structure_seed: seed of the ``"random"`` structure.
        inversion_mode: ``"auto"``, ``"top"`` or ``"bottom"`` (see :func:`~pyro_struct.faithful_inverse`).
        **flow_options: passed to the flow class (e.g. ``num_layers``, ``hidden_sizes``).

    Shapes: :meth:`posterior` answers observations of shape ``(*batch, *site_shape)``;
    ``posterior(...).sample(n)`` returns ``(n, *batch, *site_shape)`` per latent site.

    Example:
        >>> guide = StructuredGuide(model, observed=["x"])          # doctest: +SKIP
        >>> guide.fit(num_steps=2000)                                # doctest: +SKIP
        >>> guide.posterior(x=torch.tensor(1.0)).sample(100)["z"].shape   # doctest: +SKIP
        torch.Size([100])
    """

    def __init__(
        self,
        model: Callable,
        flow: str = "straf",
        structure: str = "faithful",
        observed: Sequence[str] | str | None = None,
        *,
        model_args: Sequence = (),
        model_kwargs: Mapping | None = None,
        structure_seed: int = 0,
        inversion_mode: str = "auto",
        **flow_options,
    ):
        flow_cls = _flow_class(flow)
        _check_structure_kind(structure)
        if not callable(model):
            raise ValueError(f"model must be a callable Pyro model; got {type(model).__name__}")
        if isinstance(observed, str):
            observed = [observed]
        super().__init__(name=f"pyro_struct_guide_{next(_instance_counter)}")
        from .inversion import inverse_structure
        from .trace import trace_model

        # a tuple keeps a PyroModule/nn.Module model out of this module's parameters
        self._model = (model,)
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.flow_kind = flow
        self.structure_kind = structure
        self.structure_seed = int(structure_seed)
        self.inversion_mode = inversion_mode
        self.flow_options = dict(flow_options)

        bn = trace_model(model, *self.model_args, observed=None if observed is None else list(observed), **self.model_kwargs)
        if observed is not None:
            missing = [o for o in observed if o not in bn.sites]
            if missing:
                raise ModelStructureError(
                    f"observed site {missing[0]!r} is not a sample site of the model; "
                    f"its sites are {list(bn.sites)}. Fix the name in observed=."
                )
        if not bn.latent_sites:
            raise ModelStructureError("the model has no latent sample site: there is nothing to infer")
        if structure == "random":
            inverse = inverse_structure(bn, kind=structure, seed=self.structure_seed, mode=inversion_mode)
        else:
            inverse = inverse_structure(bn, kind=structure, mode=inversion_mode)
        self.bn = bn
        self.inverse = inverse
        self._setup_layout()

        adjacency = torch.as_tensor(inverse.adjacency()).bool()
        try:
            flow_module = flow_cls(adjacency, context_dim=self.context_dim, **self.flow_options)
        except TypeError as e:
            raise ValueError(
                f"bad option for flow {flow!r} ({flow_cls.__name__}): {e}. "
                f"See help(pyro_struct.flows.{flow_cls.__name__}) for its options."
            ) from e
        self.flow = flow_module
        dtype = torch.get_default_dtype()
        self.register_buffer("context_loc", torch.zeros(self.context_dim, dtype=dtype))
        self.register_buffer("context_scale", torch.ones(self.context_dim, dtype=dtype))
        self.register_buffer("latent_loc", torch.zeros(self.latent_dim, dtype=dtype))
        self.register_buffer("latent_scale", torch.ones(self.latent_dim, dtype=dtype))
        self.register_buffer("standardized", torch.tensor(False))
        self.history: list[float] = []
        self._structure_view = None
        self._simulator = None

    # ------------------------------------------------------------------ layout
    def _setup_layout(self) -> None:
        bn, inv = self.bn, self.inverse
        self._latent_blocks = [_SiteBlock(bn.sites[s]) for s in bn.latent_sites]
        self._observed_blocks = [_SiteBlock(bn.sites[s]) for s in bn.observed_sites]
        latent_index = {label: i for i, label in enumerate(bn.latent_nodes)}
        observed_index = {label: i for i, label in enumerate(bn.observed_nodes)}
        order = list(inv.order)
        if sorted(order) != sorted(bn.latent_nodes):
            raise ModelStructureError(
                "the inverse structure's latent order does not cover the model's latent nodes "
                f"({len(order)} vs {len(bn.latent_nodes)}); this is a bug in the inversion"
            )
        perm = torch.tensor([latent_index[label] for label in order], dtype=torch.long)
        self._num_trace_observed = len(bn.observed_nodes)
        unknown = [label for label in inv.observed if label not in observed_index]
        if unknown:
            raise ModelStructureError(f"the inverse structure names observed nodes {unknown[:3]} the model does not have")
        obs_perm = torch.tensor([observed_index[label] for label in inv.observed], dtype=torch.long)
        # flow coordinate k <- trace-order flat coordinate perm[k]; inv_perm undoes it
        self.register_buffer("_perm", perm, persistent=False)
        self.register_buffer("_inv_perm", torch.argsort(perm), persistent=False)
        self.register_buffer("_obs_perm", obs_perm, persistent=False)

    @property
    def model(self) -> Callable:
        """The Pyro model this guide was compiled from."""
        return self._model[0]

    @property
    def latent_dim(self) -> int:
        """Number of unconstrained latent coordinates (the flow's dimension)."""
        return len(self.bn.latent_nodes)

    @property
    def context_dim(self) -> int:
        """Number of observed coordinates the flow is conditioned on."""
        return len(self.inverse.observed)

    @property
    def latent_sites(self) -> list[str]:
        """Latent site names in trace order."""
        return list(self.bn.latent_sites)

    @property
    def observed_sites(self) -> list[str]:
        """Observed site names in trace order."""
        return list(self.bn.observed_sites)

    @property
    def structure(self):
        """The compiled structure (:class:`pyro_struct.CompiledStructure`): graphs, adjacency, masks, plots."""
        if self._structure_view is None:
            try:
                from .inspect import CompiledStructure
            except ImportError as e:  # pragma: no cover - depends on the install
                raise RuntimeError(f"pyro_struct.inspect is not available: {e}") from e
            self._structure_view = CompiledStructure(bn=self.bn, inverse=self.inverse, flow=self.flow, guide=self)
        return self._structure_view

    def _reference(self) -> torch.Tensor:
        return self.latent_loc

    # ---------------------------------------------------------- packing values
    def pack_latents(self, values: Mapping[str, torch.Tensor], batch_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained latent values -> the flat unconstrained vector (trace order).

        Args:
            values: site -> ``(*batch, *site_shape)`` constrained values, every latent site.
            batch_shape: the leading batch shape.

        Returns:
            ``u`` of shape ``(*batch, latent_dim)`` and ``sum log|d value / d u|`` of shape
            ``(*batch,)`` (the Jacobian of the bijections to constrained space).
        """
        batch_shape = torch.Size(batch_shape)
        ref = self._reference()
        parts, ladj = [], torch.zeros(batch_shape, dtype=ref.dtype, device=ref.device)
        for b in self._latent_blocks:
            v = torch.as_tensor(values[b.name], dtype=ref.dtype, device=ref.device)
            v = v.expand(batch_shape + b.shape)
            u = b.transform.inv(v)
            ladj = ladj + _sum_to_batch(b.transform.log_abs_det_jacobian(u, v), batch_shape)
            parts.append(u.reshape(batch_shape + (b.size,)))
        return torch.cat(parts, -1), ladj

    def unpack_latents(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The flat unconstrained vector ``(*batch, latent_dim)`` (trace order) -> constrained values.

        Returns:
            site -> ``(*batch, *site_shape)`` and ``sum log|d value / d u|`` of shape ``(*batch,)``.
        """
        batch_shape = flat.shape[:-1]
        values, ladj = {}, torch.zeros(batch_shape, dtype=flat.dtype, device=flat.device)
        for b in self._latent_blocks:
            u = flat[..., b.offset : b.offset + b.size].reshape(batch_shape + b.node_shape)
            v = b.transform(u)
            ladj = ladj + _sum_to_batch(b.transform.log_abs_det_jacobian(u, v), batch_shape)
            values[b.name] = v
        return values, ladj

    def pack_observed(self, values: Mapping[str, Any], where: str = "posterior") -> tuple[torch.Tensor, torch.Size]:
        """Observed values -> the flat observed vector (trace order) and the batch shape.

        Args:
            values: observed site -> value of shape ``(*batch, *site_shape)``; every observed
                site must be present; leading dimensions beyond the site's shape are a batch
                of independent data sets (batch shapes must broadcast).
            where: what to name in error messages.

        Returns:
            ``(*batch, num_observed_coordinates)`` tensor and ``batch``.
        """
        ref = self._reference()
        known = {b.name for b in self._observed_blocks}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(
                f"{where}: {unknown[0]!r} is not an observed site of the model; observed sites are "
                f"{sorted(known)} (keyed by site name, not by model argument)"
            )
        tensors, batches = {}, []
        for b in self._observed_blocks:
            if b.name not in values or values[b.name] is None:
                raise ValueError(
                    f"{where}: missing observation for site {b.name!r} (expected shape "
                    f"{b.shape} or (*batch, {', '.join(map(str, b.shape))})); pass {b.name}=..."
                )
            v = torch.as_tensor(values[b.name], dtype=ref.dtype, device=ref.device)
            k = len(b.shape)
            if v.dim() < k or tuple(v.shape[v.dim() - k :]) != b.shape:
                raise ValueError(
                    f"{where}: observation for site {b.name!r} has shape {tuple(v.shape)} but the guide "
                    f"was compiled for shape {b.shape} (optionally with leading batch dimensions)"
                )
            tensors[b.name] = v
            batches.append(v.shape[: v.dim() - k])
        try:
            batch_shape = torch.broadcast_shapes(*batches) if batches else torch.Size()
        except RuntimeError:
            raise ValueError(
                f"{where}: the observations' batch shapes {[tuple(s) for s in batches]} do not broadcast"
            ) from None
        parts = [tensors[b.name].expand(batch_shape + b.shape).reshape(batch_shape + (b.size,)) for b in self._observed_blocks]
        if not parts:
            return torch.zeros(batch_shape + (0,), dtype=ref.dtype, device=ref.device), batch_shape
        return torch.cat(parts, -1), batch_shape

    def context(self, observed_flat: torch.Tensor) -> torch.Tensor | None:
        """The flow's standardised context ``(*batch, context_dim)`` from the flat observed vector
        ``(*batch, num_observed_coordinates)`` (trace order); ``None`` without observed sites."""
        if self.context_dim == 0:
            return None
        x = observed_flat.index_select(-1, self._obs_perm)
        return (x - self.context_loc) / self.context_scale

    # ------------------------------------------------------------ flow density
    def _sample_flat(
        self, context: torch.Tensor | None, n: int, batch_shape: torch.Size, common_noise: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised ``u`` ``(n, *batch, latent_dim)`` (trace order) and ``log q(u)`` ``(n, *batch)``."""
        ref = self._reference()
        batch_shape = torch.Size(batch_shape)
        d = self.latent_dim
        if common_noise:
            eps = torch.randn((n,) + (1,) * len(batch_shape) + (d,), dtype=ref.dtype, device=ref.device)
            eps = eps.expand((n,) + batch_shape + (d,))
        else:
            eps = torch.randn((n,) + batch_shape + (d,), dtype=ref.dtype, device=ref.device)
        x = None if context is None else context.expand((n,) + batch_shape + (self.context_dim,))
        y, logdet = self.flow(eps, x)
        log_q = self.flow.base_log_prob(eps) - logdet - self.latent_scale.log().sum()
        u = self.latent_loc + self.latent_scale * y
        return u.index_select(-1, self._inv_perm), log_q

    def _flat_log_prob(self, flat: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``log q(u | x)`` of the flat unconstrained vector ``(*batch, latent_dim)`` (trace order)."""
        y = (flat.index_select(-1, self._perm) - self.latent_loc) / self.latent_scale
        return self.flow.log_prob(y, context) - self.latent_scale.log().sum()

    def log_q(self, latents: Mapping[str, torch.Tensor], context: torch.Tensor | None, batch_shape: torch.Size) -> torch.Tensor:
        """``log q(z | x)`` in constrained space (Jacobians included).

        Args:
            latents: site -> ``(*batch, *site_shape)`` constrained values.
            context: ``(*batch, context_dim)`` standardised context (see :meth:`context`) or None.
            batch_shape: ``batch``.

        Returns:
            ``(*batch,)`` log densities.
        """
        flat, ladj = self.pack_latents(latents, batch_shape)
        return self._flat_log_prob(flat, context) - ladj

    def rsample_q(
        self, context: torch.Tensor | None, n: int, batch_shape: torch.Size, common_noise: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Reparameterised constrained samples and their ``log q(z | x)`` (Jacobians included).

        Returns:
            site -> ``(n, *batch, *site_shape)`` and ``(n, *batch)`` log densities.
        """
        flat, log_q = self._sample_flat(context, n, batch_shape, common_noise)
        values, ladj = self.unpack_latents(flat)
        return values, log_q - ladj

    # --------------------------------------------------------- standardisation
    @torch.no_grad()
    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Set the context and latent standardisation from simulations ``site -> (n, *site_shape)``.

        The context is standardised per coordinate; the flow models the unconstrained latent
        vector standardised by its prior mean and standard deviation (a diagonal affine map,
        which keeps the compiled sparsity), so an untrained flow starts at a moment-matched prior.
        """
        n = next(iter(simulations.values())).shape[0]
        batch = torch.Size((n,))
        flat, _ = self.pack_latents({b.name: simulations[b.name] for b in self._latent_blocks}, batch)
        u = flat.index_select(-1, self._perm)
        loc, scale = self._robust_moments(u)
        self.latent_loc.copy_(loc)
        self.latent_scale.copy_(scale)
        if self.context_dim:
            obs, _ = self.pack_observed({b.name: simulations[b.name] for b in self._observed_blocks}, "standardisation")
            loc, scale = self._robust_moments(obs.index_select(-1, self._obs_perm))
            self.context_loc.copy_(loc)
            self.context_scale.copy_(scale)
        self.standardized.fill_(True)

    @staticmethod
    def _robust_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        finite = torch.isfinite(x).all(-1)
        x = x[finite] if finite.any() else torch.zeros_like(x)
        loc = x.mean(0)
        scale = x.std(0) if x.shape[0] > 1 else torch.ones_like(loc)
        # constant coordinates (or a single draw) would divide by zero
        scale = torch.where(torch.isfinite(scale) & (scale > 1e-6), scale, torch.ones_like(scale))
        return loc, scale

    # ------------------------------------------------------------- guide call
    def _observed_from_call(self, args, kwargs) -> tuple[dict[str, torch.Tensor], Any]:
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        values = {}
        for b in self._observed_blocks:
            site = trace.nodes.get(b.name)
            if site is None or site["type"] != "sample":
                raise ValueError(
                    f"guide call: the model has no sample site {b.name!r} with these arguments; "
                    "call the guide with the same arguments as the model"
                )
            if not site["is_observed"]:
                raise ValueError(
                    f"guide call: observed site {b.name!r} got no observed value from the model's "
                    f"arguments; pass its data (shape {b.shape}) to the model and the guide"
                )
            v = site["value"]
            if tuple(v.shape) != b.shape:
                raise ValueError(
                    f"guide call: observed site {b.name!r} has shape {tuple(v.shape)} but the guide "
                    f"was compiled for shape {b.shape}; build the guide with model_args/model_kwargs "
                    "shaped like this data"
                )
            values[b.name] = v
        return values, trace

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """A Pyro guide with the model's signature: samples every latent site given this call's data.

        Returns:
            site -> sampled constrained value.
        """
        observed, trace = self._observed_from_call(args, kwargs)
        pyro.module(self._pyro_name, self.flow)
        flat_obs, _ = self.pack_observed(observed, "guide call")
        context = self.context(flat_obs)
        latent = pyro.sample(
            f"_{self._pyro_name}_latent", _ConditionedFlowDistribution(self, context), infer={"is_auxiliary": True}
        )
        plates: dict[str, pyro.plate] = {}
        batch_shape = latent.shape[:-1]
        result = {}
        for b in self._latent_blocks:
            site = trace.nodes[b.name]
            fn_event_dim = site["fn"].event_dim
            event_dim = fn_event_dim + len(b.node_shape) - len(b.shape)
            shape = torch.broadcast_shapes(b.node_shape, batch_shape + (1,) * event_dim)
            u = latent[..., b.offset : b.offset + b.size].reshape(shape)
            value = b.transform(u)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                log_density = b.transform.inv.log_abs_det_jacobian(value, u)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + fn_event_dim)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized and frame.dim is not None:
                        if frame.name not in plates:
                            plates[frame.name] = pyro.plate(frame.name, frame.size, dim=frame.dim)
                        stack.enter_context(plates[frame.name])
                result[b.name] = pyro.sample(b.name, Delta(value, log_density=log_density, event_dim=fn_event_dim))
        return result

    # -------------------------------------------------------------- amortised
    def posterior(self, *args: Mapping[str, Any], num_moment_samples: int = 1000, **observations) -> "Posterior":
        """The amortised posterior for observed values (no optimisation happens).

        Args:
            *args: optionally one dict ``{site: value}``.
            num_moment_samples: samples used to estimate ``.mean`` and ``.std``.
            **observations: observed site name -> value ``(*batch, *site_shape)``.

        Returns:
            a :class:`Posterior` with batch shape ``batch``.
        """
        if len(args) > 1 or (args and not isinstance(args[0], Mapping)):
            raise ValueError("posterior takes observations as keyword arguments or one dict {site: value}")
        values = dict(args[0]) if args else {}
        overlap = set(values) & set(observations)
        if overlap:
            raise ValueError(f"posterior: observation {sorted(overlap)[0]!r} given twice")
        values.update(observations)
        flat, batch_shape = self.pack_observed(values, "posterior")
        return Posterior(self, self.context(flat), batch_shape, values, num_moment_samples)

    # ---------------------------------------------------------------- training
    def fit(self, num_steps: int = 1000, objective: str = "skl", **options) -> list[float]:
        """Train the guide from simulations of the model; see :func:`pyro_struct.training.fit`.

        Returns:
            the loss history (one float per step, over every ``fit`` of this guide).
        """
        from .training import fit

        return fit(self, num_steps=num_steps, objective=objective, **options)

    def simulator(self):
        """The :class:`~pyro_struct.objectives.ModelSimulator` used for training (created once)."""
        if self._simulator is None:
            from .objectives import ModelSimulator

            self._simulator = ModelSimulator(self.model, self.bn, self.model_args, self.model_kwargs)
        return self._simulator

    # ------------------------------------------------------------ save / load
    def state_payload(self) -> dict:
        """Everything :meth:`load` needs, as a ``torch.save``-able dict."""
        return {
            "format": _FILE_FORMAT,
            "flow": self.flow_kind,
            "flow_options": self.flow_options,
            "structure": self.structure_kind,
            "structure_seed": self.structure_seed,
            "inversion_mode": self.inversion_mode,
            "observed": self.observed_sites,
            "bn": self.bn.to_dict(),
            "order": list(self.inverse.order),
            "observed_nodes": list(self.inverse.observed),
            "adjacency": torch.as_tensor(self.inverse.adjacency()).bool().clone(),
            "state_dict": {k: v.detach().clone() for k, v in self.state_dict().items()},
            "history": [float(h) for h in self.history],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the guide (structure, parameters, standardisation, history) to ``path`` atomically."""
        atomic_save(self.state_payload(), path)

    @staticmethod
    def read_file(path: str | os.PathLike) -> dict:
        """Read a file written by :meth:`save` (or a training checkpoint)."""
        try:
            payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{os.fspath(path)!r} is not a pyro_struct guide file: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a pyro_struct guide file (format {_FILE_FORMAT})")
        return payload

    def check_compatible(self, payload: Mapping) -> None:
        """Raise a ``ValueError`` naming what differs if ``payload`` was saved for another structure."""
        saved, here = payload["bn"], self.bn.to_dict()
        saved_sites = {s["name"]: s for s in saved["sites"]}
        here_sites = {s["name"]: s for s in here["sites"]}
        if list(saved_sites) != list(here_sites):
            raise ValueError(
                f"the saved guide was compiled for sites {list(saved_sites)} but the model has "
                f"{list(here_sites)}; load it against the model it was trained for"
            )
        for name, s in saved_sites.items():
            h = here_sites[name]
            for key in ("shape", "observed", "support"):
                if s[key] != h[key]:
                    raise ValueError(
                        f"site {name!r}: {key} is {s[key]} in the saved guide but {h[key]} in the model; "
                        "load it against the model it was trained for"
                    )
        saved_edges = {tuple(e) for e in saved["edges"]}
        here_edges = {tuple(e) for e in here["edges"]}
        if saved_edges != here_edges:
            extra = sorted(saved_edges - here_edges)[:3]
            missing = sorted(here_edges - saved_edges)[:3]
            raise ValueError(
                "the model's dependency structure differs from the saved guide's: edges only in the file "
                f"{extra}, edges only in the model {missing}; load it against the model it was trained for"
            )
        if list(payload["order"]) != list(self.inverse.order) or list(payload["observed_nodes"]) != list(self.inverse.observed):
            raise ValueError("the inverse structure's node order differs from the saved guide's")
        if not torch.equal(payload["adjacency"].bool(), torch.as_tensor(self.inverse.adjacency()).bool()):
            raise ValueError("the compiled adjacency differs from the saved guide's (different inversion?)")

    def load_payload(self, payload: Mapping) -> None:
        """Restore parameters, standardisation and history from a :meth:`state_payload` dict."""
        self.check_compatible(payload)
        self.load_state_dict(payload["state_dict"])
        self.history = [float(h) for h in payload.get("history", [])]

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: Callable, *, model_args: Sequence = (), model_kwargs: Mapping | None = None
    ) -> "StructuredGuide":
        """Rebuild a guide saved with :meth:`save` for ``model``.

        Raises:
            ValueError: the model's traced structure differs from the saved one (the message
                names the site or edges that differ).
        """
        payload = cls.read_file(path)
        guide = cls(
            model,
            flow=payload["flow"],
            structure=payload["structure"],
            observed=payload["observed"],
            model_args=model_args,
            model_kwargs=model_kwargs,
            structure_seed=payload["structure_seed"],
            inversion_mode=payload["inversion_mode"],
            **payload["flow_options"],
        )
        guide.load_payload(payload)
        return guide

    def extra_repr(self) -> str:
        return (
            f"flow={self.flow_kind!r}, structure={self.structure_kind!r}, latent_dim={self.latent_dim}, "
            f"context_dim={self.context_dim}, latent_sites={self.latent_sites}, observed_sites={self.observed_sites}"
        )


class Posterior:
    """The amortised posterior ``q(z | x)`` for one observation or a batch of observations.

    Created by :meth:`StructuredGuide.posterior`. Sampling runs the flow once for the whole
    batch; nothing is optimised.

    Attributes:
        batch_shape: leading batch shape of the observations (``()`` for one data set).
        observations: the observations it answers (site -> value).
    """

    def __init__(self, guide: StructuredGuide, context, batch_shape, observations, num_moment_samples: int = 1000):
        self.guide = guide
        self._context = context
        self.batch_shape = torch.Size(batch_shape)
        self.observations = dict(observations)
        self.num_moment_samples = int(num_moment_samples)
        self._moments = None

    def sample_and_log_prob(self, n: int = 1, common_noise: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Samples and their log density without gradients.

        Returns:
            site -> ``(n, *batch, *site_shape)`` and ``(n, *batch)``.
        """
        self._check_n(n)
        with torch.no_grad():
            return self.guide.rsample_q(self._context, n, self.batch_shape, common_noise)

    def sample(self, n: int = 1, common_noise: bool = False) -> dict[str, torch.Tensor]:
        """``n`` posterior samples per observation, in constrained space.

        Args:
            n: samples per observation.
            common_noise: use one base-noise draw ``(n, d)`` for every observation of the batch
                (common random numbers), so that batch element ``i`` equals an unbatched call for
                observation ``i`` under the same seed. Default: independent noise.

        Returns:
            site -> ``(n, *batch, *site_shape)``.
        """
        return self.sample_and_log_prob(n, common_noise)[0]

    def sample_unconstrained(self, n: int = 1, common_noise: bool = False) -> torch.Tensor:
        """Samples of the flat unconstrained latent vector ``(n, *batch, latent_dim)``, in trace order
        (site by site, row-major; ``guide.bn.latent_nodes`` labels the coordinates)."""
        self._check_n(n)
        with torch.no_grad():
            return self.guide._sample_flat(self._context, n, self.batch_shape, common_noise)[0]

    def log_prob(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(z | x)`` of constrained values, Jacobians included.

        Args:
            values: every latent site -> ``(*sample, *batch, *site_shape)`` (like :meth:`sample`'s output).

        Returns:
            ``(*sample, *batch)`` log densities.
        """
        missing = [b.name for b in self.guide._latent_blocks if b.name not in values]
        if missing:
            raise ValueError(f"log_prob: missing value for latent site {missing[0]!r}; pass every latent site")
        shapes = []
        for b in self.guide._latent_blocks:
            v = torch.as_tensor(values[b.name])
            k = len(b.shape)
            if v.dim() < k or tuple(v.shape[v.dim() - k :]) != b.shape:
                raise ValueError(
                    f"log_prob: value of site {b.name!r} has shape {tuple(v.shape)}; expected "
                    f"(*sample, *batch, {', '.join(map(str, b.shape))})"
                )
            shapes.append(v.shape[: v.dim() - k])
        try:
            lead = torch.broadcast_shapes(self.batch_shape, *shapes)
        except RuntimeError:
            raise ValueError(f"log_prob: value shapes {shapes} do not broadcast with the batch shape {tuple(self.batch_shape)}") from None
        return self.guide.log_q(values, self._context, lead)

    def _check_n(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}")

    def _estimate_moments(self):
        if self._moments is None:
            samples = self.sample(self.num_moment_samples)
            self._moments = (
                {k: v.mean(0) for k, v in samples.items()},
                {k: v.std(0) for k, v in samples.items()},
            )
        return self._moments

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean per latent site ``(*batch, *site_shape)``, estimated from samples (cached)."""
        return self._estimate_moments()[0]

    @property
    def std(self) -> dict[str, torch.Tensor]:
        """Posterior standard deviation per latent site ``(*batch, *site_shape)``, estimated from samples (cached)."""
        return self._estimate_moments()[1]

    def importance(self, num_samples: int = 1000, **options):
        """Draws weighted by ``p(z, x) / q(z | x)``: ``.log_weights``, ``.ess``, ``.pareto_k``,
        ``.log_evidence``, ``.resample(n)``; see :func:`pyro_struct.diagnostics.importance`."""
        from .diagnostics import importance

        return importance(self, num_samples, **options)

    def refine(self, num_steps: int = 50, **options) -> "Posterior":
        """A new posterior refined by ``num_steps`` ELBO steps on a copy of the guide (which stays
        unchanged); ``.refinement`` holds the ELBO before and after. See :func:`pyro_struct.diagnostics.refine`."""
        from .diagnostics import refine

        return refine(self, num_steps, **options)

    def __repr__(self) -> str:
        return f"Posterior(batch_shape={tuple(self.batch_shape)}, latent_sites={self.guide.latent_sites})"


class AmortizedModel:
    """A Pyro model with an amortised structured guide attached (what :func:`amortize` returns).

    Calling it runs the model unchanged. The guide is built on first use of :attr:`guide`,
    :meth:`fit`, :meth:`posterior` or :attr:`structure`.
    """

    def __init__(self, model: Callable, guide_options: Mapping):
        functools.update_wrapper(self, model)
        self.model = model
        self._guide_options = dict(guide_options)
        self._guide: StructuredGuide | None = None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def guide(self) -> StructuredGuide:
        """The :class:`StructuredGuide` (built on first access)."""
        if self._guide is None:
            self._guide = StructuredGuide(self.model, **self._guide_options)
        return self._guide

    @property
    def structure(self):
        """The guide's compiled structure (:class:`pyro_struct.CompiledStructure`)."""
        return self.guide.structure

    def fit(self, num_steps: int = 1000, objective: str = "skl", **options) -> list[float]:
        """Train the guide; see :func:`pyro_struct.training.fit`. Returns the loss history."""
        return self.guide.fit(num_steps=num_steps, objective=objective, **options)

    def posterior(self, *args, **observations) -> Posterior:
        """The amortised posterior for observations keyed by site name; see :meth:`StructuredGuide.posterior`."""
        return self.guide.posterior(*args, **observations)

    def save(self, path: str | os.PathLike) -> None:
        """Save the trained guide (see :meth:`StructuredGuide.save`)."""
        self.guide.save(path)

    def load(self, path: str | os.PathLike) -> "AmortizedModel":
        """Replace the guide with one saved at ``path`` (its structure must match this model)."""
        opts = {k: v for k, v in self._guide_options.items() if k in ("model_args", "model_kwargs")}
        self._guide = StructuredGuide.load(path, self.model, **opts)
        return self

    def __repr__(self) -> str:
        return f"AmortizedModel({getattr(self.model, '__name__', self.model)!r}, {self._guide_options})"


def amortize(
    model: Callable | None = None,
    *,
    flow: str = "straf",
    observed: Sequence[str] | str | None = None,
    structure: str = "faithful",
    **options,
):
    """Decorator form of :class:`StructuredGuide`.

    The decorated function still runs as the model and gains ``.fit``, ``.posterior``,
    ``.guide`` and ``.structure``. Options are those of :class:`StructuredGuide`
    (``model_args``, ``model_kwargs``, ``structure_seed`` and flow options included).

    Example:
        >>> @amortize(observed=["x"])                                 # doctest: +SKIP
        ... def model(x=None):
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 0.5), obs=x)
        >>> model.fit(num_steps=500)                                   # doctest: +SKIP
        >>> model.posterior(x=1.0).sample(10)["z"].shape               # doctest: +SKIP
        torch.Size([10])
    """
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
    _check_structure_kind(structure)
    guide_options = dict(flow=flow, observed=observed, structure=structure, **options)

    def wrap(fn: Callable) -> AmortizedModel:
        if not callable(fn):
            raise ValueError(f"amortize decorates a callable model; got {type(fn).__name__}")
        return AmortizedModel(fn, guide_options)

    return wrap(model) if model is not None else wrap
