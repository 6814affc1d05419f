"""The amortised structured guide (a Pyro guide with the model's signature), its posteriors and the decorator."""

from __future__ import annotations

import functools
import itertools
import math
import os
import types
import warnings
from contextlib import ExitStack
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from .amortizer import ChainAmortizer, FlatAmortizer, NestedPlateAmortizer, PlateAmortizer
from .compile import FLOWS, STRUCTURES, compile_model
from .covariates import covariate_values
from .errors import ModelStructureError
from .io import GUIDE_FORMAT, atomic_save, check_compatible, read_payload
from .simulation import ModelSimulator
from .threads import torch_threads
from .training import fit as _fit

__all__ = ["StructuredGuide", "Posterior", "AmortizedModel", "amortize", "summarize_samples", "FLOWS", "STRUCTURES"]

_instance_counter = itertools.count()
#: elements (samples x batch x latent coordinates) one sampling pass may hold; larger requests are chunked
#: (2^26: 1,000 x 1,000 samples of 64 latents in one pass; each chunk costs a copy of the samples)
MAX_SAMPLE_ELEMENTS = 1 << 26


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
        # a plate guide's latent vector has as many coordinates as this context's plate has members
        super().__init__(torch.Size(batch_shape), torch.Size((guide._amortizer.latent_dim(context),)), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _ConditionedFlowDistribution(self._guide, self._context, torch.Size(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        flat, log_q = self._guide._sample_flat(self._context, math.prod(shape), torch.Size())
        flat = flat.reshape(shape + self.event_shape)
        self._cache = (flat, log_q.reshape(shape))
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

    The model is compiled by :func:`~pyro_struct.compile_model`: traced into a scalar
    :class:`~pyro_struct.BayesNet`, inverted (:func:`~pyro_struct.inverse_structure`) and a
    conditional flow of the chosen family is built over the unconstrained latent vector with the
    inverse's adjacency (:class:`~pyro_struct.layout.LatentLayout`); the context is the flattened,
    standardised observed values (:class:`~pyro_struct.layout.ObservedLayout`).

    Calling the guide with the model's arguments (``guide(*args, **kwargs)``) reads this call's
    observed values from the model, conditions the flow on them and samples every latent site in
    constrained space with the right log density, with the hooks of Pyro's ``AutoContinuous``
    (``get_posterior``, ``sample_latent``, ``_unpack_latent``, ``_create_plates``, ``median``,
    ``quantiles``); it therefore works with ``SVI``/``Trace_ELBO`` and ``Predictive``.

    Args:
        model: a Pyro model.
        flow: ``"straf"`` (default), ``"grf"`` or ``"cnf"``.
        structure: ``"faithful"`` (default), ``"dense"``, ``"moralized"``, ``"random"`` or
            ``"meanfield"`` (see :func:`~pyro_struct.inverse_structure`).
        observed: names of observed sites (default: the sites with ``obs=`` in the traced model).
        model_args, model_kwargs: arguments the model is traced (and simulated) with.
        structure_seed: seed of the ``"random"`` structure.
        inversion_mode: ``"auto"``, ``"top"`` or ``"bottom"`` (see :func:`~pyro_struct.faithful_inverse`).
        num_probes: prior draws the tracer uses to find dependencies and dynamic structure
            (default: the tracer's).
        plates: ``None`` (default: one flow coordinate per plate member, the traced data-set
            size only) or ``"auto"``: a model with one data plate whose inverse has a one-member
            template gets the shared-weight plate flow (of the ``flow`` family), whose parameters do not
            depend on the plate's size and whose :meth:`posterior` answers observations with any
            number of members; where that does not apply, a one-time warning names the plate and
            ``guide.plate_note`` says why (the per-coordinate flow is built instead). Every flow
            family (StrAF, GRF, CNF) has a plate flow; side-by-side plates fall back with that
            warning. Two nested plates (groups with members inside each group) get the nested
            plate flow (:class:`~pyro_struct.flows.nested.NestedPlatedStrAF`: any numbers of groups
            and members, equal members per group; no subsampling or covariates). A plate of more than 4 members is traced with 4 (its
            subsample indices shrunk) and checked against every member, so compiling does not
            grow with the plate's size (``guide.plate_trace_note`` says how it was traced;
            ``guide.bn``/``guide.inverse`` are then the template's, ``guide.site_shapes`` the full shapes).
        covariates: names of tensor model arguments (``["X"]``, keyword or positional) that
            condition the flow like observations (:mod:`pyro_struct.covariates`): pass their values
            to :meth:`posterior` by name (``posterior(y=..., X=...)``); a guide call reads them from
            its arguments. Rows of a covariate inside the data plate are per-member inputs of a plate
            guide. ``fit(simulate_with={"X": ...})`` trains over designs; without it, over the traced one.
        chains: ``None`` (default) or ``"auto"``: a model whose sites form a time chain (a Python loop
            of sites ``z_0..z_{T-1}``, ``x_0..x_{T-1}``, with or without ``pyro.markov``) gets the
            shared-weight chain flow (:mod:`pyro_struct.flows.chain`): one step flow for every ``t``,
            conditioned on the next step, the globals and a recurrent summary of the observations, so
            its parameters do not depend on ``T`` and :meth:`posterior` answers chains of any length
            (``guide.chain_summarised`` says which inverse parents the summaries replace). Where the sites do not form
            such a chain, a one-time warning names them and ``guide.chain_note`` says why.
        **flow_options: passed to the flow class (e.g. ``num_layers``, ``hidden_sizes``). The default
            StrAF has one affine layer, or, where a latent site is constrained (a positive scale, an
            interval, a simplex) or a latent's scale is set by another latent (a funnel,
            :func:`~pyro_struct.compile.latent_scale_sites`) and neither ``normalizer`` nor ``num_layers``
            is given, a spline layer on the base noise then an affine layer
            (:data:`~pyro_struct.compile.CONSTRAINED_NORMALIZERS`): measured on eight schools, the affine
            flow alone cannot skew ``log tau`` (its sd stayed 1.7x NUTS's).

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
        num_probes: int | None = None,
        plates: str | None = None,
        covariates: Sequence[str] | str | None = None,
        chains: str | None = None,
        **flow_options,
    ):
        if not callable(model):
            raise ValueError(f"model must be a callable Pyro model; got {type(model).__name__}")
        if flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
        super().__init__(name=f"pyro_struct_guide_{next(_instance_counter)}")
        compiled = compile_model(
            model, *model_args, flow=flow, structure=structure, observed=observed, structure_seed=structure_seed,
            inversion_mode=inversion_mode, num_probes=num_probes, model_kwargs=model_kwargs, plates=plates,
            covariates=covariates, chains=chains, **flow_options,
        )
        # a tuple keeps a PyroModule/nn.Module model out of this module's parameters
        self._model = (model,)
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.options = compiled.options
        self.covariates = tuple(compiled.options["covariates"])
        self.bn, self.inverse = compiled.bn, compiled.inverse
        self.flow = compiled.flow
        self.latent_layout = compiled.latent_layout
        self.observed_layout = compiled.observed_layout
        # ---- plates (issue #11): the flat and the plate path behind one amortizer interface
        self.plate_note = compiled.plate_note
        self.plate_layout = None if compiled.plate is None else compiled.plate.layout
        # site -> value shape at the traced arguments (a plate template's bn has fewer members)
        full = None if compiled.plate is None else compiled.plate.site_shapes
        self.site_shapes = dict(full) if full else {name: tuple(info.shape) for name, info in self.bn.sites.items()}
        self.plate_trace_note = None if compiled.plate is None else compiled.plate.trace_note
        # ---- time chains: the shared-weight chain flow behind the same interface
        self.chain_note = compiled.chain_note
        self.chain_layout = None if compiled.chain is None else compiled.chain.layout
        self.chain_summarised = None if compiled.chain is None else compiled.chain.summarised
        if compiled.chain is not None:
            self._amortizer = ChainAmortizer(self.flow, self.chain_layout)
        elif compiled.plate is None:
            self._amortizer = FlatAmortizer(self.flow, self.latent_layout, self.observed_layout)
        else:  # (nested plates: a layout of groups and members)
            nested = hasattr(self.plate_layout, "inner_plate")
            self._amortizer = (NestedPlateAmortizer if nested else PlateAmortizer)(self.flow, self.plate_layout)
        if self.plate_note is not None:
            warnings.warn(f"{self.plate_note}; the guide uses one flow coordinate per plate member instead", stacklevel=2)
        if self.chain_note is not None:
            warnings.warn(f"{self.chain_note}; the guide uses one flow coordinate per time step instead", stacklevel=2)
        # ----
        self.register_buffer("standardized", torch.tensor(False))
        self.history: list[float] = []
        self.validation_history: list[float] = []
        self._structure_view = None
        self._simulator = None

    # ------------------------------------------------------------------ facts
    @property
    def model(self) -> Callable:
        """The Pyro model this guide was compiled for."""
        return self._model[0]

    @property
    def latent_dim(self) -> int:
        """Number of unconstrained latent coordinates ``d`` (a plate guide's at its traced size)."""
        L = self.plate_layout
        if L is not None and hasattr(L, "inner_plate"):
            return L.latent_dim(L.traced_sizes)
        return self.latent_layout.dim if L is None else L.num_globals + L.traced_size * L.member_dim

    @property
    def context_dim(self) -> int:
        """Number of observed coordinates (the flow's context size; a plate guide's at its traced size)."""
        L = self.plate_layout
        if L is None:
            return self.observed_layout.dim
        if hasattr(L, "inner_plate"):
            return L.context_dim(L.traced_sizes)
        return len(L.global_observed_labels) + L.traced_size * len(L.member_observed_labels)

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
            from .inspect import CompiledStructure

            # (a plate flow has no per-coordinate adjacency: the view shows its template's H, and its masks)
            self._structure_view = CompiledStructure(bn=self.bn, inverse=self.inverse, flow=self.flow, guide=self)
            # why a plate did not get the shared-weight flow (None when it did, or without plates)
            self._structure_view.plate_note = self.plate_note
        return self._structure_view

    # ---------------------------------------------------------- densities
    def condition(self, observations: Mapping[str, Any], where: str = "simulations", check_finite: bool = False):
        """The flow's context (the standardised ``(*batch, c)`` tensor or ``None``; a
        :class:`~pyro_struct.amortizer.PlateContext` for a plate flow) and ``batch`` for observed
        values site -> ``(*batch, *site_shape)``."""
        return self._amortizer.condition(observations, where, check_finite)

    def _sample_flat(self, context, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised ``u`` ``(n, *batch, d)`` (trace order) and ``log q(u)`` ``(n, *batch)``."""
        return self._amortizer.sample_flat(context, n, batch_shape, common_noise)

    def _flat_log_prob(self, flat: torch.Tensor, context) -> torch.Tensor:
        """``log q(u | x)`` of the flat unconstrained vector ``(*batch, d)`` (trace order)."""
        return self._amortizer.flat_log_prob(flat, context)

    def log_q(self, latents: Mapping[str, torch.Tensor], context, batch_shape: torch.Size) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of constrained latents site -> ``(*batch, *site_shape)``,
        Jacobians included; ``-inf`` outside a site's support."""
        return self._amortizer.log_q(latents, context, batch_shape)

    def rsample_q(self, context, n: int, batch_shape: torch.Size, common_noise: bool = False):
        """Reparameterised constrained samples site -> ``(n, *batch, *site_shape)`` and ``log q`` ``(n, *batch)``."""
        return self._amortizer.rsample(context, n, batch_shape, common_noise)

    @torch.no_grad()
    def set_standardization(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Set the context and latent standardisation from simulations site -> ``(n, *site_shape)``.

        The flow models the unconstrained latent vector standardised by its prior mean and sd (a
        diagonal affine map, which keeps the compiled sparsity), so an untrained flow starts at a
        moment-matched prior.
        """
        self._amortizer.set_standardization(simulations)
        self.standardized.fill_(True)

    @torch.no_grad()
    def set_observed_standardization(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by data, observed site -> ``(n, *site_shape)`` (a plate guide:
        members along the plate dimension, or a leading batch of data sets); the latents are left
        unstandardised (mean 0, sd 1). What ``fit(data=...)`` does by default."""
        self._amortizer.set_observed_statistics(observations)
        self.standardized.fill_(True)

    # ------------------------------------------------------------ Pyro hooks
    def _prototype(self, args, kwargs):
        """One trace of the model with these arguments (blocked, no gradients); covariates checked first."""
        if self.covariates:
            self._check_covariates(covariate_values(self.model, args, kwargs, self.covariates, "guide call"), "guide call")
        with torch.no_grad(), poutine.block():
            return poutine.trace(self.model).get_trace(*args, **kwargs)

    def _observed_from_call(self, trace, args=(), kwargs=None) -> dict[str, torch.Tensor]:
        values = covariate_values(self.model, args, kwargs or {}, self.covariates, "guide call")
        for b in self.observed_layout.blocks:
            if b.name in values:
                continue
            site = trace.nodes.get(b.name)
            if site is None or site["type"] != "sample":
                raise ValueError(f"guide call: the model has no sample site {b.name!r} with these arguments; call the guide with the same arguments as the model")
            if not site["is_observed"]:
                raise ValueError(f"guide call: observed site {b.name!r} got no observed value from the model's arguments; pass its data (shape {self.site_shapes.get(b.name, b.shape)}) to the model and the guide")
            # (a plate guide's layout checks the shapes itself: the plate's size may differ)
            if self.plate_layout is None and tuple(site["value"].shape) != b.shape:
                raise ValueError(
                    f"guide call: observed site {b.name!r} has shape {tuple(site['value'].shape)} but the guide was compiled "
                    f"for shape {b.shape}; build the guide with model_args/model_kwargs shaped like this data"
                )
            values[b.name] = site["value"]
        return values

    def _check_covariates(self, values: Mapping[str, Any], where: str) -> None:
        """A missing covariate, or one whose shape differs from the traced one (the plate dimension
        aside for a plate guide), is an error naming the argument and the expected shape."""
        for name in self.covariates:
            info = self.bn.sites[name]
            pos = None if self.plate_layout is None else info.plate_position(self.plate_layout.plate)
            want = tuple("N" if i == pos else d for i, d in enumerate(info.shape))
            if values.get(name) is None:
                raise ValueError(f"{where}: missing covariate {name!r} (a model argument of shape {want}); pass {name}=...")
            shape = tuple(torch.as_tensor(values[name]).shape)
            tail = shape[len(shape) - len(want):] if len(shape) >= len(want) else None
            if tail is None or any(w != "N" and w != t for w, t in zip(want, tail)):
                raise ValueError(
                    f"{where}: covariate {name!r} has shape {shape} but the guide expects shape {want} "
                    "(optionally with leading batch dimensions)"
                )

    def _conditioned(self, trace, args=(), kwargs=None) -> TorchDistribution:
        context, _ = self.condition(self._observed_from_call(trace, args, kwargs), "guide call", True)
        full = self._subsampled_plate_size(trace)
        if full is not None:
            context = self._amortizer.subsampled(context, full)
        return _ConditionedFlowDistribution(self, context)

    def _subsampled_plate_size(self, trace) -> int | None:
        """The full size of the data plate when this call subsamples it (``None`` otherwise)."""
        if self.plate_layout is None:
            return None
        for plate in getattr(self.plate_layout, "plates", (self.plate_layout.plate,)):
            site = trace.nodes.get(plate)
            if site is None or not site_is_subsample(site):
                continue
            full, size = int(site["fn"].size), int(site["value"].numel())
            if full != size:
                return full
        return None

    def get_posterior(self, *args, **kwargs) -> TorchDistribution:
        """The flow conditioned on this call's observations (and covariates): a distribution over the
        flat unconstrained latent vector ``(latent_dim,)`` (trace order), as in ``AutoContinuous``."""
        return self._conditioned(self._prototype(args, kwargs), args, kwargs)

    def _sample_latent(self, posterior: TorchDistribution) -> torch.Tensor:
        pyro.module(self._pyro_name, self.flow)
        return pyro.sample(f"_{self._pyro_name}_latent", posterior, infer={"is_auxiliary": True})

    def sample_latent(self, *args, **kwargs) -> torch.Tensor:
        """The auxiliary latent sample ``(*particles, latent_dim)`` of this call."""
        return self._sample_latent(self.get_posterior(*args, **kwargs))

    def _node_shapes(self, latent_dim: int, trace) -> dict[str, tuple]:
        """Site -> node shape of a flat latent vector with ``latent_dim`` coordinates (trace order)."""
        if self.plate_layout is None:
            return {b.name: b.node_shape for b in self.latent_layout.blocks}
        L = self.plate_layout
        if hasattr(L, "inner_plate"):  # (G and M: read from the call's sites, one number cannot tell both)
            return L.node_shapes({name: tuple(site["value"].shape) for name, site in trace.nodes.items()
                                  if site["type"] == "sample" and name in self.bn.sites})
        n = (latent_dim - L.num_globals) // L.member_dim if L.member_dim else L.traced_size
        return {s.name: tuple(n if i == s.pos else d for i, d in enumerate(s.shape)) for s in L.latent}

    def _unpack_latent(self, latent: torch.Tensor, trace):
        """``(site, unconstrained value)`` per latent site, shaped for plates outside the model (particles)."""
        batch_shape = latent.shape[:-1]
        offset = 0
        for b, node_shape in zip(self.latent_layout.blocks, self._node_shapes(latent.shape[-1], trace).values()):
            site = trace.nodes[b.name]
            event_dim = site["fn"].event_dim + len(b.node_shape) - len(b.shape)
            shape = torch.broadcast_shapes(node_shape, batch_shape + (1,) * event_dim)
            size = math.prod(node_shape)
            yield site, latent[..., offset : offset + size].reshape(shape)
            offset += size

    def _create_plates(self, trace) -> dict[str, pyro.plate]:
        """The plates of the latent sites, created as ``AutoGuide._create_plates`` does (full size,
        subsample size, dim), so the model replays the guide's subsample indices."""
        plates = {}
        for name in self.latent_sites:
            for frame in trace.nodes[name]["cond_indep_stack"]:
                if frame.vectorized and frame.dim is not None and frame.name not in plates:
                    full = frame.full_size or frame.size
                    if full == frame.size:
                        plates[frame.name] = pyro.plate(frame.name, full, dim=frame.dim, subsample_size=frame.size)
                    elif self.plate_layout is not None and frame.name == self.plate_layout.plate:
                        # the subsample this call's observations were read at: the model replays these indices
                        indices = trace.nodes[frame.name]["value"]
                        plates[frame.name] = pyro.plate(frame.name, full, dim=frame.dim, subsample=indices)
                    else:
                        raise ModelStructureError(
                            f"latent site {name!r} is in the subsampled plate {frame.name!r}: this guide compiles one "
                            "flow coordinate per plate member; use StructuredGuide(..., plates='auto') for a shared-weight "
                            "guide that subsamples, or subsample only plates without latent sites"
                        )
        return plates

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """A Pyro guide with the model's signature: samples every latent site given this call's data.

        Returns:
            site -> sampled constrained value.
        """
        trace = self._prototype(args, kwargs)
        latent = self._sample_latent(self._conditioned(trace, args, kwargs))
        plates = self._create_plates(trace)
        result = {}
        for site, u in self._unpack_latent(latent, trace):
            b = next(blk for blk in self.latent_layout.blocks if blk.name == site["name"])
            value = b.transform(u)
            fn_event_dim = site["fn"].event_dim
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                log_density = b.transform.inv.log_abs_det_jacobian(value, u)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + fn_event_dim)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.name in plates:
                        stack.enter_context(plates[frame.name])
                result[site["name"]] = pyro.sample(site["name"], Delta(value, log_density=log_density, event_dim=fn_event_dim))
        return result

    def _posterior_of_call(self, args, kwargs) -> "Posterior":
        observed = self._observed_from_call(self._prototype(args, kwargs), args, kwargs)
        return self.posterior(observed)

    def median(self, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median of each latent site for the data of this call (model arguments),
        estimated coordinatewise from ``num_samples`` samples (a flow has no closed-form median)."""
        return self._posterior_of_call(args, kwargs).median(num_samples)

    def quantiles(self, quantiles, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior quantiles site -> ``(len(quantiles), *site_shape)`` for the data of this call,
        estimated from ``num_samples`` samples (``AutoContinuous.quantiles``'s signature)."""
        return self._posterior_of_call(args, kwargs).quantiles(quantiles, num_samples)

    # -------------------------------------------------------------- amortised
    def posterior(self, *args: Mapping[str, Any], num_moment_samples: int = 1000, **observations) -> "Posterior":
        """The amortised posterior for observed values (no optimisation happens).

        Args:
            *args: optionally one dict ``{site: value}``.
            num_moment_samples: samples used to estimate ``.mean`` and ``.std``.
            **observations: observed site name -> value ``(*batch, *site_shape)``, and each
                covariate (by argument name) -> value ``(*batch, *shape)``.

        Returns:
            a :class:`Posterior` with batch shape ``batch``.

        Raises:
            ValueError: unknown or missing sites or covariates, wrong shapes, non-finite values
                (naming the site or argument and the expected shape).
        """
        if len(args) > 1 or (args and not isinstance(args[0], Mapping)):
            raise ValueError("posterior takes observations as keyword arguments or one dict {site: value}")
        values = dict(args[0]) if args else {}
        overlap = set(values) & set(observations)
        if overlap:
            raise ValueError(f"posterior: observation {sorted(overlap)[0]!r} given twice")
        values.update(observations)
        self._check_covariates(values, "posterior")
        context, batch_shape = self.condition(values, "posterior", check_finite=True)
        return Posterior(self, context, batch_shape, values, num_moment_samples)

    def fit(self, num_steps: int | None = None, objective: str = "skl", checks: Sequence[str] = (), **options):
        """Train the guide on simulations of its model; see :func:`pyro_struct.training.fit` for the options.

        Args:
            checks: diagnostics to run once training ends, recorded in ``result.checks`` and
                ``result.report()``: ``"skl"`` (a symmetrised-KL estimate on fresh simulations),
                ``"calibration"`` (simulation-based calibration over 100 simulations).

        Returns:
            a :class:`~pyro_struct.training.FitResult`: the loss history (over every ``fit`` of
            this guide) with ``validation_history``, ``checks`` and ``report()``.
        """
        from .diagnostics.after_fit import CHECKS, run_checks

        names = [checks] if isinstance(checks, str) else list(checks)
        unknown = [n for n in names if n not in CHECKS]
        if unknown:  # before training, not after
            raise ValueError(f"unknown check {unknown[0]!r}; use any of {sorted(CHECKS)}")
        result = _fit(self, num_steps=num_steps, objective=objective, **options)
        result.checks = run_checks(self, names)
        return result

    def simulator(self, covariates: Mapping[str, torch.Tensor] | None = None) -> ModelSimulator:
        """The :class:`~pyro_struct.simulation.ModelSimulator` used for training (created once), or
        with ``covariates`` (argument name -> value of the traced shape) one that runs the model
        with those values instead (the model density at another design or size; created per call)."""
        if self._simulator is None:
            sites = types.SimpleNamespace(sites={k: types.SimpleNamespace(shape=v) for k, v in self.site_shapes.items()})
            self._simulator = ModelSimulator(self.model, sites, self.model_args, self.model_kwargs, covariates=self.covariates)
        return self._simulator.at_arguments(dict(covariates)) if covariates else self._simulator

    # ------------------------------------------------------------ save / load
    def state_payload(self) -> dict:
        """Everything :meth:`load` needs, as a ``torch.save``-able dict."""
        o = self.options
        return {
            "format": GUIDE_FORMAT,
            "flow": o["flow"], "flow_options": o["flow_options"], "structure": o["structure"],
            "structure_seed": o["structure_seed"], "inversion_mode": o["inversion_mode"],
            "observed": self.observed_sites,
            "bn": self.bn.to_dict(),
            "order": list(self.inverse.order),
            "observed_nodes": list(self.inverse.observed),
            "adjacency": torch.as_tensor(self.inverse.adjacency()).bool().clone(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "history": [float(h) for h in self.history],
            "plates": o.get("plates"),
            "chains": o.get("chains"),
            "covariates": list(self.covariates),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the guide (structure, parameters, standardisation, history) to ``path`` atomically."""
        atomic_save(self.state_payload(), path)

    def check_compatible(self, payload: Mapping) -> None:
        """Raise a ``ValueError`` naming what differs if ``payload`` was saved for another structure."""
        check_compatible(payload, self.bn.to_dict(), self.inverse.order, self.inverse.observed, self.inverse.adjacency())

    def load_payload(self, payload: Mapping) -> None:
        """Restore parameters, standardisation and history from a :meth:`state_payload` dict."""
        self.check_compatible(payload)
        self.load_state_dict(payload["state_dict"])
        self.history = [float(h) for h in payload.get("history", [])]

    @classmethod
    def load(cls, path: str | os.PathLike, model: Callable, *, model_args: Sequence = (), model_kwargs: Mapping | None = None,
             map_location=None) -> "StructuredGuide":
        """Rebuild a guide saved with :meth:`save` for ``model`` (on ``map_location``, default the CPU).

        Raises:
            ValueError: the model's traced structure differs from the saved one (the message
                names the site or edges that differ).
        """
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        # read on the CPU, where save puts every tensor (the compatibility check reads values), then moved
        payload = read_payload(path, map_location=None if device is not None else map_location)
        guide = cls(
            model, flow=payload["flow"], structure=payload["structure"], observed=payload["observed"],
            model_args=model_args, model_kwargs=model_kwargs, structure_seed=payload["structure_seed"],
            inversion_mode=payload["inversion_mode"], plates=payload.get("plates"),
            covariates=payload.get("covariates"), chains=payload.get("chains"), **payload["flow_options"],
        )
        guide.load_payload(payload)
        return guide.to(device) if device is not None else guide

    def extra_repr(self) -> str:
        return (
            f"flow={self.options['flow']!r}, structure={self.options['structure']!r}, latent_dim={self.latent_dim}, "
            f"context_dim={self.context_dim}, latent_sites={self.latent_sites}, observed_sites={self.observed_sites}"
        )


class Posterior:
    """The amortised posterior ``q(z | x)`` for one observation or a batch of observations.

    Created by :meth:`StructuredGuide.posterior`. Sampling runs the flow once for the whole
    batch (in chunks of at most :data:`MAX_SAMPLE_ELEMENTS` values); nothing is optimised.

    Attributes:
        guide: the guide.
        context: the flow's standardised context ``(*batch, context_dim)`` (``None`` without observations).
        batch_shape: leading batch shape of the observations (``()`` for one data set).
        observations: the observations it answers (site -> value).
    """

    def __init__(self, guide: StructuredGuide, context, batch_shape, observations, num_moment_samples: int = 1000):
        self.guide = guide
        self.context = context
        self.batch_shape = torch.Size(batch_shape)
        self.observations = dict(observations)
        self.num_moment_samples = int(num_moment_samples)
        self._moments = None

    def _chunks(self, n: int) -> list[int]:
        per_sample = max(1, math.prod(self.batch_shape) * max(self.guide._amortizer.latent_dim(self.context), 1))
        size = max(1, MAX_SAMPLE_ELEMENTS // per_sample)
        return [min(size, n - i) for i in range(0, n, size)]

    def sample_and_log_prob(self, n: int = 1, common_noise: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Samples and their log density without gradients.

        Returns:
            site -> ``(n, *batch, *site_shape)`` and ``(n, *batch)``.
        """
        _check_n(n)
        parts = []
        with torch.no_grad(), torch_threads():
            for m in self._chunks(n):
                parts.append(self.guide.rsample_q(self.context, m, self.batch_shape, common_noise))
        if len(parts) == 1:
            return parts[0]
        values = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        return values, torch.cat([p[1] for p in parts])

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
        _check_n(n)
        with torch.no_grad(), torch_threads():
            return self.guide._sample_flat(self.context, n, self.batch_shape, common_noise)[0]

    def log_prob(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(z | x)`` of constrained values, Jacobians included (``-inf`` outside a site's support).

        Args:
            values: every latent site -> ``(*sample, *batch, *site_shape)`` (like :meth:`sample`'s output).

        Returns:
            ``(*sample, *batch)`` log densities.
        """
        shapes = self.guide._amortizer.latent_batch_shapes(values, self.context, "log_prob")
        try:
            lead = torch.broadcast_shapes(self.batch_shape, *shapes)
        except RuntimeError:
            raise ValueError(f"log_prob: value shapes {shapes} do not broadcast with the batch shape {tuple(self.batch_shape)}") from None
        return self.guide.log_q(values, self.context, lead)

    def _estimate_moments(self):
        if self._moments is None:
            samples = self.sample(self.num_moment_samples)
            self._moments = ({k: v.mean(0) for k, v in samples.items()}, {k: v.std(0) for k, v in samples.items()})
        return self._moments

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean per latent site ``(*batch, *site_shape)``: the average of ``num_moment_samples``
        samples (default 1000, set in :meth:`StructuredGuide.posterior`), drawn once and cached."""
        return self._estimate_moments()[0]

    @property
    def std(self) -> dict[str, torch.Tensor]:
        """Posterior sd per latent site ``(*batch, *site_shape)``, from the same cached samples as :attr:`mean`."""
        return self._estimate_moments()[1]

    def quantiles(self, quantiles: Sequence[float], num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Coordinatewise quantiles site -> ``(len(quantiles), *batch, *site_shape)`` from ``num_samples`` samples."""
        q = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if q.numel() == 0 or (q < 0).any() or (q > 1).any():
            raise ValueError(f"quantiles must be numbers in [0, 1]; got {quantiles!r}")
        samples = self.sample(num_samples)
        return {k: torch.quantile(v.to(torch.float64), q, dim=0).to(v.dtype) for k, v in samples.items()}

    def median(self, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Coordinatewise median site -> ``(*batch, *site_shape)`` from ``num_samples`` samples."""
        return {k: v[0] for k, v in self.quantiles([0.5], num_samples).items()}

    def summary(self, level: float = 0.9, num_samples: int = 1000, truth: Mapping[str, Any] | None = None) -> list[dict]:
        """Mean, sd and central ``level`` interval of every latent coordinate (one observation).

        Returns:
            one dict per coordinate with ``name``, ``mean``, ``sd``, ``lower``, ``upper`` (and
            ``true``, ``inside`` when ``truth`` gives the true latents).
        """
        if self.batch_shape:
            raise ValueError(f"summary: one observation at a time; this posterior has batch shape {tuple(self.batch_shape)}")
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1; got {level!r}")
        return summarize_samples(self.sample(num_samples), truth, level)

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


def summarize_samples(samples: Mapping[str, torch.Tensor], truth: Mapping[str, Any] | None = None, level: float = 0.9) -> list[dict]:
    """Mean, sd and central ``level`` interval per coordinate of samples site -> ``(n, *site_shape)``.

    Returns:
        one dict per coordinate (labelled as BayesNet nodes, ``"z[1]"``) with ``name``, ``mean``,
        ``sd``, ``lower``, ``upper``, and ``true``/``inside`` for the sites ``truth`` gives.
    """
    from .graph import node_label

    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    rows = []
    for site, value in samples.items():
        v = value.detach().to("cpu", torch.float64)
        shape, flat = tuple(v.shape[1:]), v.reshape(v.shape[0], -1)
        lo, hi = torch.quantile(flat, q, dim=0)
        t = None if truth is None or site not in truth else torch.as_tensor(truth[site]).detach().to("cpu", torch.float64).reshape(-1)
        for k, idx in enumerate(itertools.product(*(range(s) for s in shape))):
            row = {"name": node_label(site, idx, shape), "mean": float(flat[:, k].mean()),
                   "sd": float(flat[:, k].std()) if flat.shape[0] > 1 else 0.0, "lower": float(lo[k]), "upper": float(hi[k])}
            if t is not None:
                row["true"] = float(t[k])
                row["inside"] = bool(row["lower"] <= row["true"] <= row["upper"])
            rows.append(row)
    return rows


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")


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

    def fit(self, num_steps: int | None = None, objective: str = "skl", **options):
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


def amortize(model: Callable | None = None, *, flow: str = "straf", observed: Sequence[str] | str | None = None,
             structure: str = "faithful", **options):
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
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; use one of {list(STRUCTURES)}")
    guide_options = dict(flow=flow, observed=observed, structure=structure, **options)

    def wrap(fn: Callable) -> AmortizedModel:
        if not callable(fn):
            raise ValueError(f"amortize decorates a callable model; got {type(fn).__name__}")
        return AmortizedModel(fn, guide_options)

    return wrap(model) if model is not None else wrap
