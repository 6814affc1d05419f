"""Compiling a model: trace -> invert -> flow and layouts, the one path every guide, CLI command and benchmark takes."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .covariates import check_covariates, covariate_model, mark_covariates
from .errors import ModelStructureError
from .graph import BayesNet
from .inversion import INVERSE_KINDS, INVERSION_MODES, InverseStructure, inverse_structure
from .chain_layout import ChainLayout
from .chains import ChainCouplingError, ChainInverse, chain_elimination, chain_inverse, detect_chain
from .inversion import ordered_inverse
from .layout import LatentLayout, NestedPlateLayout, ObservedLayout, PlateLayout
from .plates import NestedPlateInverse, PlateCouplingError, PlateInverse, nested_plate_inverse, nested_plates, plate_inverse
from .threads import torch_threads
from .trace import find_observed_candidates, trace_model
from .trace.template import trace_plate_template

__all__ = ["FLOWS", "STRUCTURES", "PLATE_MODES", "PLATE_FLOW_OPTIONS", "CHAIN_MODES", "CHAIN_FLOW_OPTIONS",
           "CONSTRAINED_NORMALIZERS", "latent_scale_sites", "CompiledModel", "CompiledPlate", "CompiledChain", "compile_model", "compile_plate",
           "compile_chain", "flow_class", "build_flow"]

#: flow name -> (module, class) of the conditional flow compiled over the inverse structure
FLOWS: dict[str, tuple[str, str]] = {
    "straf": ("pyro_struct.flows.straf", "StrAF"),
    "grf": ("pyro_struct.flows.grf", "GraphicalResidualFlow"),
    "cnf": ("pyro_struct.flows.cnf", "StructuredCNF"),
}
#: inverse-structure kinds a model can be compiled with
STRUCTURES = INVERSE_KINDS
#: ``plates=``: ``None`` (one flow coordinate per plate member) or ``"auto"`` (shared-weight plate flow where it applies)
PLATE_MODES = (None, "auto")
#: options of the plate flow's DeepSet pooling (the rest go to its StrAFs)
PLATE_FLOW_OPTIONS = ("pool_dim", "pool_hidden")
#: ``chains=``: ``None`` (one flow coordinate per time step) or ``"auto"`` (shared-weight chain flow where it applies)
CHAIN_MODES = (None, "auto")
#: options of the chain flow's summaries (the rest go to its step, boundary and globals' flows)
CHAIN_FLOW_OPTIONS = ("decays", "rnn_hidden", "pool_dim", "pool_hidden")
#: the StrAF normalisers (one per layer) of a per-coordinate guide whose model has a constrained latent
#: (positive, interval, simplex, ...) or a latent whose scale is set by another latent (a funnel), when
#: neither ``normalizer`` nor ``num_layers`` is given; otherwise one affine layer (exact for
#: linear-Gaussian conditionals)
CONSTRAINED_NORMALIZERS = ("spline", "affine")


def latent_scale_sites(bn) -> list[str]:
    """Latent sites of ``bn`` whose distribution's scale depends on another latent site (funnel
    geometry: ``z ~ Normal(0, exp(v / 2))``), in trace order."""
    latent = set(bn.latent_sites)
    return [s for s in bn.latent_sites if any(p in latent for p in bn.sites[s].scale_parents)]


def flow_class(flow: str):
    """The flow class registered as ``flow`` (``"straf"``, ``"grf"``, ``"cnf"``)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
    module, name = FLOWS[flow]
    return getattr(importlib.import_module(module), name)


def build_flow(flow: str, inverse: InverseStructure, **flow_options):
    """The flow of family ``flow`` on ``inverse``'s adjacency ``(d, d + c)``; bad options name the flow."""
    cls = flow_class(flow)
    A = torch.as_tensor(inverse.adjacency()).bool()
    try:
        return cls(A, context_dim=A.shape[1] - A.shape[0], **flow_options)
    except TypeError as e:
        raise ValueError(
            f"bad option for flow {flow!r} ({cls.__name__}): {e}. See help(pyro_struct.flows.{cls.__name__}) for its options."
        ) from e


@dataclass
class CompiledModel:
    """Everything compiled for one model: ``G``, ``H``, the flow and the two layouts.

    Attributes:
        bn: the traced :class:`~pyro_struct.BayesNet`.
        inverse: the :class:`~pyro_struct.InverseStructure` compiled into the flow.
        flow: the conditional flow over the latent layout's ``d`` coordinates (or ``None``).
        latent_layout: latent sites <-> the flow's vector.
        observed_layout: observed sites -> the flow's context.
        options: the compile options (enough to compile the same model again).
    """

    bn: BayesNet
    inverse: InverseStructure
    flow: torch.nn.Module | None
    latent_layout: LatentLayout
    observed_layout: ObservedLayout
    options: dict = field(default_factory=dict)
    plate: "CompiledPlate | None" = None
    plate_note: str | None = None
    chain: "CompiledChain | None" = None
    chain_note: str | None = None


# ---------------------------------------------------------------- plates
@dataclass
class CompiledPlate:
    """The shared-weight plate flow of a model with one data plate (or two nested plates).

    Attributes:
        template: the one-member :class:`~pyro_struct.plates.PlateInverse` (nested plates: the
            :class:`~pyro_struct.plates.NestedPlateInverse`).
        layout: the :class:`~pyro_struct.layout.PlateLayout` (site values <-> globals and members, any ``N``;
            nested plates: the :class:`~pyro_struct.layout.NestedPlateLayout`, any ``G`` and ``M``).
        flow: the :class:`~pyro_struct.flows.plated.PlatedStrAF` (nested: :class:`~pyro_struct.flows.nested.NestedPlatedStrAF`).
        trace_note: how the network was traced: with the plate shrunk to a few members (checked
            against the full size), or every member and why (``None`` when the plate is small).
        site_shapes: site -> value shape at the traced arguments (the full plate size).
    """

    template: PlateInverse | NestedPlateInverse
    layout: PlateLayout | NestedPlateLayout
    flow: torch.nn.Module
    trace_note: str | None = None
    site_shapes: dict | None = None


def _plate_refusal(bn: BayesNet, inverse: InverseStructure, flow: str | None) -> tuple[str | None, str | None]:
    """``(plate, why the plate flow does not apply or None)``; ``(None, None)`` without plates."""
    names = sorted({p[0] for s in bn.sites.values() for p in s.plates})
    if not names:
        return None, None
    if len(names) > 1:
        nested = sorted({tuple(sorted(p[0] for p in s.plates)) for s in bn.sites.values() if len(s.plates) > 1})
        if nested:
            return names[0], (f"plates {list(nested[0])} are crossed or nested more than two deep; the shared-weight plate "
                              "flow handles one plate or two nested plates (groups with members inside each group)")
        return names[0], (f"the model has the side-by-side plates {names}; the shared-weight plate flow handles one plate "
                          "or two nested plates")
    plate = names[0]
    if flow is None:
        return plate, "no flow (flow=None) to share across the plate's members"
    for s in bn.sites.values():
        if s.plate_position(plate) is not None and (s.block or s.node_shape != s.shape):
            return plate, f"site {s.name!r} in plate {plate!r} is a joint block (its coordinates are not elementwise)"
    return plate, None


def _plate_adjacencies(template: PlateInverse, layout: PlateLayout):
    """The plate flow's ``(g, g + cg)``, ``(g, ko)`` and ``(k, k + g + cg + ko)`` adjacencies from the template."""
    gi = {v: i for i, v in enumerate(layout.global_labels)}
    ci = {v: i for i, v in enumerate(layout.global_observed_labels)}
    mi = {v: i for i, v in enumerate(layout.member_labels)}
    oi = {v: i for i, v in enumerate(layout.member_observed_labels)}
    g, cg, k, ko = len(gi), len(ci), len(mi), len(oi)
    Ag, P, Am = torch.zeros(g, g + cg, dtype=torch.bool), torch.zeros(g, ko, dtype=torch.bool), torch.zeros(k, k + g + cg + ko, dtype=torch.bool)
    for v, (outside, pooled) in template.global_parents.items():
        for p in outside:
            Ag[gi[v], gi[p] if p in gi else g + ci[p]] = True
        for p in pooled:
            P[gi[v], oi[p]] = True
    for v, (outside, own) in template.member_parents.items():
        for p in outside:
            Am[mi[v], k + gi[p] if p in gi else k + g + ci[p]] = True
        for p in own:
            Am[mi[v], mi[p] if p in mi else k + g + cg + oi[p]] = True
    return Ag, P, Am


def _nested_adjacencies(template: NestedPlateInverse, layout: NestedPlateLayout):
    """The nested plate flow's six adjacencies (see :class:`~pyro_struct.flows.nested.NestedPlatedStrAF`) from the template."""
    (t, h, k), (cg, ch, ko) = layout.dims, layout.obs_dims
    lat = [{v: i for i, v in enumerate(labels)} for labels in layout.labels]
    obs = [{v: i for i, v in enumerate(labels)} for labels in layout.observed_labels]
    # column offsets of each level's (latents, observations) in the three conditioners' inputs
    offsets = {0: ((0, t), None, None), 1: ((h, h + t), (0, h + t + cg), None), 2: ((k + h, k + h + t), (k, k + h + t + cg), (0, k + h + t + cg + ch))}
    widths = {0: t + cg, 1: h + t + cg + ch, 2: k + h + t + cg + ch + ko}
    rows = {0: t, 1: h, 2: k}
    A = {lv: torch.zeros(rows[lv], widths[lv], dtype=torch.bool) for lv in range(3)}
    Pth, Ptm, Phm = (torch.zeros(t, ch, dtype=torch.bool), torch.zeros(t, ko, dtype=torch.bool), torch.zeros(h, ko, dtype=torch.bool))
    pooled = {(0, 1): Pth, (0, 2): Ptm, (1, 2): Phm}
    tables = (template.global_parents, template.group_parents, template.member_parents)
    for lv, table in enumerate(tables):
        for v, by_level in table.items():
            for plv, parents in enumerate(by_level):
                for p in parents:
                    if plv > lv:  # pooled from the deeper level (observed coordinates only)
                        pooled[(lv, plv)][lat[lv][v], obs[plv][p]] = True
                    elif p in lat[plv]:
                        A[lv][lat[lv][v], offsets[lv][plv][0] + lat[plv][p]] = True
                    else:
                        A[lv][lat[lv][v], offsets[lv][plv][1] + obs[plv][p]] = True
    return A[0], Pth, Ptm, A[1], Phm, A[2]


def _compile_nested(bn: BayesNet, inverse: InverseStructure, flow: str | None, plates: tuple, traced_sizes: dict | None,
                    **flow_options) -> tuple[CompiledPlate | None, str | None]:
    """The nested plate flow of ``inverse`` for ``plates = (outer, inner)``, or ``None`` and why not."""
    from .flows.nested import NestedPlatedStrAF

    names = f"nested plates {plates[0]!r}/{plates[1]!r}"
    if flow is None:
        return None, f"{names}: no flow (flow=None) to share across the groups and members"
    for s in bn.sites.values():
        if s.plates and (s.block or s.node_shape != s.shape):
            return None, f"{names}: site {s.name!r} is a joint block (its coordinates are not elementwise)"
        if getattr(s, "covariate", False):
            return None, f"{names}: covariates (here {s.name!r}) are not supported by the nested plate flow yet"
    try:
        template = nested_plate_inverse(inverse, *plates)
    except PlateCouplingError as e:
        return None, f"{names}: {e}"
    if min(template.sizes) < 2:
        return None, f"{names} were traced with {template.sizes} (groups, members); trace at least 2 of each to check that they are exchangeable"
    if traced_sizes:
        template = dataclasses.replace(template, sizes=tuple(int(traced_sizes.get(p, n)) for p, n in zip(plates, template.sizes)))
    layout = NestedPlateLayout(bn, template)
    try:
        built = NestedPlatedStrAF(*_nested_adjacencies(template, layout), group_obs_dim=layout.obs_dims[1],
                                  member_obs_dim=layout.obs_dims[2], family=flow_class(flow), **flow_options)
    except TypeError as e:
        raise ValueError(f"bad option for the nested plate flow (NestedPlatedStrAF, flow={flow!r}): {e}") from e
    return CompiledPlate(template, layout, built), None


def compile_plate(bn: BayesNet, inverse: InverseStructure, flow: str | None, traced_size: int | None = None,
                  traced_sizes: dict | None = None, **flow_options) -> tuple[CompiledPlate | None, str | None]:
    """The shared-weight plate flow of ``inverse``, or ``None`` and the reason it does not apply.

    ``traced_size``: the plate's size at the model's arguments when ``bn`` is a template traced
    with fewer members (:func:`~pyro_struct.trace.template.trace_plate_template`); ``traced_sizes``:
    plate -> that size for every shrunk plate (nested plates).

    Returns:
        ``(CompiledPlate, None)``; ``(None, reason)`` (the reason names the plate) when the model
        has several plates, no flow, or the inverse couples members or treats them
        differently (:class:`~pyro_struct.plates.PlateCouplingError`); ``(None, None)`` without plates.
    """
    from .flows.plated import PlatedStrAF

    nested = nested_plates(bn)
    if nested is not None:
        return _compile_nested(bn, inverse, flow, nested, traced_sizes, **flow_options)
    plate, reason = _plate_refusal(bn, inverse, flow)
    if plate is None or reason is not None:
        return None, reason
    try:
        template = plate_inverse(inverse, plate)
    except PlateCouplingError as e:
        return None, f"plate {plate!r}: {e}"
    if template.size < 2:
        return None, f"plate {plate!r} was traced with one member; trace it with at least 2 to check that members are exchangeable"
    if traced_size is not None:
        template = dataclasses.replace(template, size=int(traced_size))
    layout = PlateLayout(bn, template)
    Ag, P, Am = _plate_adjacencies(template, layout)
    try:
        built = PlatedStrAF(Ag, P, Am, member_obs_dim=P.shape[1], family=flow_class(flow), **flow_options)
    except TypeError as e:
        raise ValueError(f"bad option for the plate flow (PlatedStrAF, flow={flow!r}): {e}") from e
    return CompiledPlate(template, layout, built), None


# ---------------------------------------------------------------- chains
@dataclass
class CompiledChain:
    """The shared-weight chain flow of a model with a time chain.

    Attributes:
        template: the one-step :class:`~pyro_struct.chains.ChainInverse`.
        layout: the :class:`~pyro_struct.chain_layout.ChainLayout` (site values <-> globals and steps, any ``T``).
        flow: the :class:`~pyro_struct.flows.chain.ChainFlow`.
        summarised: what the summaries stand for, in words (which inverse parents they replace).
    """

    template: ChainInverse
    layout: ChainLayout
    flow: torch.nn.Module
    summarised: str = ""


def _summarised(template: ChainInverse) -> str:
    c = template.chain
    x0, xt = ("/".join(f"{s}{i}" for s in c.observed_stems) or "(none)" for i in ("0", "t"))
    z = "/".join(f"{s}t" for s in c.latent_stems)
    return (f"the inverse's parents {x0}..{xt} of {z} (steps <= t) go through the recurrent summary h_t; "
            f"the globals' parents among the chain observations go through a pooled summary of all {c.length} steps")


def compile_chain(bn: BayesNet, flow: str | None, structure: str = "faithful", **flow_options
                  ) -> tuple[CompiledChain | None, InverseStructure | None, str | None]:
    """The shared-weight chain flow of ``bn``, its filtering inverse, or ``None`` and the reason it does not apply.

    Returns:
        ``(CompiledChain, inverse, None)``; ``(None, None, reason)`` when ``bn`` has indexed sites that do
        not form a chain, no flow, or another structure than ``"faithful"``; ``(None, None, None)`` without a chain.
    """
    from .flows.chain import ChainFlow

    chain, why = detect_chain(bn)
    if chain is None:
        return None, None, why
    sites = f"sites {', '.join(chain.sites[s][0] for s in chain.sites)}.. ({chain.length} steps)"
    if flow is None or structure != "faithful":
        return None, None, f"the chain of {sites} needs a flow and structure='faithful' for the chain flow"
    inverse = ordered_inverse(bn, chain_elimination(chain))
    try:
        template = chain_inverse(inverse, chain)
    except ChainCouplingError as e:
        return None, None, f"the chain of {sites}: {e}"
    t = template
    try:
        built = ChainFlow(torch.cat([t.within, t.neighbour, t.step_globals, t.step_observed], 1), t.step_summary,
                          torch.cat([t.boundary_within, t.boundary_globals, t.boundary_observed], 1), t.boundary_summary,
                          t.global_adjacency, t.global_pooled, obs_dim=len(chain.obs_coords), family=flow_class(flow),
                          length=chain.length, **flow_options)
    except TypeError as e:
        raise ValueError(f"bad option for the chain flow (ChainFlow, flow={flow!r}): {e}") from e
    return CompiledChain(template, ChainLayout(bn, template), built, _summarised(template)), inverse, None


def _check_options(flow: str | None, structure: str, inversion_mode: str, plates=None, chains=None) -> None:
    if chains not in CHAIN_MODES:
        raise ValueError(f"unknown chains={chains!r}; use None (one flow coordinate per time step) or 'auto'")
    if plates not in PLATE_MODES:
        raise ValueError(f"unknown plates={plates!r}; use None (one flow coordinate per member) or 'auto'")
    if flow is not None and flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; use one of {list(STRUCTURES)}")
    if inversion_mode not in INVERSION_MODES:
        raise ValueError(f"unknown inversion_mode {inversion_mode!r}; use one of {list(INVERSION_MODES)}")


def _refuse_unobserved(model: Callable, args: tuple, kwargs: dict) -> None:
    """The ``def model(data=None): ... obs=data`` idiom traced without data observes nothing: say which
    sites look observed instead of compiling a guide of the prior."""
    candidates = find_observed_candidates(model, *args, **kwargs)
    if candidates:
        pairs = ", ".join(f"{site!r} (obs={arg})" for site, arg in candidates.items())
        raise ModelStructureError(
            f"no sample site carries obs= when the model is traced with these arguments, but {pairs} "
            f"become observed once their data argument is given. Pass observed={sorted(candidates)!r} "
            "(or trace the model with data of the right shape via model_args/model_kwargs); "
            "observed=[] builds a guide of the prior on purpose."
        )


def compile_model(
    model: Callable,
    *args,
    flow: str | None = "straf",
    structure: str = "faithful",
    observed: Sequence[str] | str | None = None,
    structure_seed: int = 0,
    inversion_mode: str = "auto",
    num_probes: int | None = None,
    granularity: str = "element",
    model_kwargs: Mapping | None = None,
    plates: str | None = None,
    covariates: Sequence[str] | str | None = None,
    chains: str | None = None,
    **flow_options,
) -> CompiledModel:
    """Trace ``model(*args, **model_kwargs)``, invert it and build the flow and layouts.

    Args:
        model: a Pyro model.
        *args, model_kwargs: the arguments the model is traced with.
        flow: ``"straf"``, ``"grf"``, ``"cnf"``, or ``None`` for no flow (structure only).
        structure: an inverse kind (:data:`STRUCTURES`).
        observed: observed site names (default: see :func:`~pyro_struct.trace_model`; when that
            finds none, a ``ModelStructureError`` names the sites that carry ``obs=`` once their
            data argument is given; ``observed=[]`` compiles a guide of the prior on purpose).
        structure_seed: seed of the ``"random"`` structure.
        inversion_mode: ``"auto"``, ``"top"`` or ``"bottom"``.
        num_probes: prior draws used by the tracer (``None``: its default).
        granularity: ``"element"`` or ``"site"`` (see :func:`~pyro_struct.trace_model`).
        plates: ``None`` (default: one flow coordinate per plate member) or ``"auto"``: a model
            with one data plate whose inverse has a one-member template gets the shared-weight
            :class:`~pyro_struct.flows.plated.PlatedStrAF` (stages of the ``flow`` family), which answers data
            sets of any size; otherwise ``plate_note`` says why not and the per-coordinate flow is built
            (every family; side-by-side plates fall back; two nested plates get the
            :class:`~pyro_struct.flows.nested.NestedPlatedStrAF`, any G x M). A plate of more than
            :data:`~pyro_struct.trace.template.TEMPLATE_MEMBERS` members is traced with that many
            and checked against the full size (:func:`~pyro_struct.trace.template.trace_plate_template`);
            ``bn`` and ``inverse`` are then the template's and ``plate.site_shapes`` the full shapes.
            (A covariate whose rows are the plate's members is cut to the template's rows with the
            plate, :func:`~pyro_struct.covariates.covariate_model`.)
        covariates: names of tensor model arguments traced as observed, non-random sites of
            the same name (:mod:`pyro_struct.covariates`): conditioning inputs of the flow.
        chains: ``None`` (default: one flow coordinate per time step) or ``"auto"``: a model whose
            sites form a time chain (``z_0..z_{T-1}``, ``x_0..x_{T-1}``, :func:`~pyro_struct.chains.detect_chain`)
            is inverted in filtering order and gets the shared-weight
            :class:`~pyro_struct.flows.chain.ChainFlow` (parameters independent of ``T``, any ``T`` at
            ``posterior``); otherwise ``chain_note`` says why not (the plate path, when it applies, comes first).
        **flow_options: passed to the flow class (and ``pool_dim``, ``pool_hidden`` to the plate flow).

    Returns:
        a :class:`CompiledModel`; its flow has ``d = latent_layout.dim`` latents and
        ``observed_layout.dim`` context columns.

    Raises:
        ModelStructureError: an observed name that is not a site, no latent site, and every
            refusal of the tracer.
    """
    _check_options(flow, structure, inversion_mode, plates, chains)
    if isinstance(observed, str):
        observed = [observed]
    trace_options = {"granularity": granularity}
    if num_probes is not None:
        trace_options["num_probes"] = num_probes
    kwargs = dict(model_kwargs or {})
    covariates = check_covariates(model, covariates)
    traced = covariate_model(model, covariates, args, kwargs) if covariates else model
    observed = None if observed is None else list(observed)
    if observed is not None and covariates:
        observed = observed + [c for c in covariates if c not in observed]
    options = dict(flow=flow, structure=structure, observed=observed, structure_seed=structure_seed,
                   inversion_mode=inversion_mode, num_probes=num_probes, flow_options=dict(flow_options), plates=plates,
                   covariates=list(covariates), chains=chains)
    small, trace_note = (None, None)
    if plates == "auto" and flow is not None:
        # a large plate is traced with a few members and checked against the full size (compile time constant in N)
        with torch_threads():  # (small tensors: extra threads only wait on each other, as in training)
            small, trace_note = trace_plate_template(traced, args, kwargs, observed=observed, **trace_options)
        if small is not None:
            mark_covariates(small.bn, covariates)
    if small is not None and (not small.bn.latent_sites or (observed is None and not small.bn.observed_sites)):
        small = None  # the full trace below says what is missing
    if small is not None:
        bn = small.bn
        inverse = inverse_structure(bn, kind=structure, seed=structure_seed, mode=inversion_mode)
        plate, note = compile_plate(bn, inverse, flow, traced_size=small.size, traced_sizes=small.sizes, **flow_options)
        if plate is not None:
            shrunk = " and ".join(f"plate {p!r} shrunk to {small.members} of its {n} members" for p, n in small.sizes.items())
            plate.trace_note = f"traced with {shrunk} (checked against every member at the tracer's prior draws)"
            plate.site_shapes = dict(small.shapes)
            return CompiledModel(bn, inverse, plate.flow, LatentLayout(bn, inverse.order), ObservedLayout(bn, inverse.observed),
                                 options, plate, None)
        trace_note = f"the inverse of the {small.members}-member template was refused ({note})"
    bn = trace_model(traced, *args, observed=observed, **trace_options, **kwargs)
    mark_covariates(bn, covariates)
    if not bn.latent_sites:
        raise ModelStructureError("the model has no latent sample site: there is nothing to infer")
    if observed is None and not bn.observed_sites:
        _refuse_unobserved(model, args, kwargs)
    chain, chain_note = None, None
    if chains == "auto" and not any(s.plates for s in bn.sites.values()):
        chain, chain_inv, chain_note = compile_chain(bn, flow, structure, **flow_options)
        if chain is not None:
            return CompiledModel(bn, chain_inv, chain.flow, LatentLayout(bn, chain_inv.order), ObservedLayout(bn, chain_inv.observed),
                                 options, chain=chain)
    inverse = inverse_structure(bn, kind=structure, seed=structure_seed, mode=inversion_mode)
    latent_layout = LatentLayout(bn, inverse.order)
    observed_layout = ObservedLayout(bn, inverse.observed)
    # (where the template's inverse was refused, the full network's may not be: its min-fill order differs)
    plate, note = (None, None) if plates is None else compile_plate(bn, inverse, flow, **flow_options)
    if plate is not None:
        if trace_note is not None:
            plate.trace_note = f"traced every member of the plate: {trace_note}"
        return CompiledModel(bn, inverse, plate.flow, latent_layout, observed_layout, options, plate, None)
    flat_options = {k: v for k, v in flow_options.items() if k not in PLATE_FLOW_OPTIONS + CHAIN_FLOW_OPTIONS}
    curved = latent_layout.constrained or bool(latent_scale_sites(bn))
    if flow == "straf" and "normalizer" not in flat_options and "num_layers" not in flat_options and curved:
        # measured (benchmarks/results/robust_fit.md): an affine StrAF cannot skew log tau of eight schools'
        # HalfCauchy scale (sd 1.7x NUTS's however long it trains); a spline layer on its noise can (spline
        # first: it acts on N(0, 1) noise inside its [-5, 5] range; spline last broke SVI in tests/test_guide.py).
        # A latent-set scale makes the inverse's conditionals skewed and heavy-tailed alike (the zoo's funnel:
        # importance Pareto-k 0.57 with the affine flow, 0.06 with spline + affine, 60 s each)
        flat_options["normalizer"] = list(CONSTRAINED_NORMALIZERS)
    built = None if flow is None else build_flow(flow, inverse, **flat_options)
    return CompiledModel(bn, inverse, built, latent_layout, observed_layout, options, None, note, None, chain_note)
