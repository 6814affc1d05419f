"""Compiling a model: trace -> invert -> flow and layouts, the one path every guide, CLI command and benchmark takes."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .errors import ModelStructureError
from .graph import BayesNet
from .inversion import INVERSE_KINDS, INVERSION_MODES, InverseStructure, inverse_structure
from .layout import LatentLayout, ObservedLayout
from .trace import trace_model

__all__ = ["FLOWS", "STRUCTURES", "CompiledModel", "compile_model", "flow_class", "build_flow"]

#: flow name -> (module, class) of the conditional flow compiled over the inverse structure
FLOWS: dict[str, tuple[str, str]] = {
    "straf": ("pyro_struct.flows.straf", "StrAF"),
    "grf": ("pyro_struct.flows.grf", "GraphicalResidualFlow"),
    "cnf": ("pyro_struct.flows.cnf", "StructuredCNF"),
}
#: inverse-structure kinds a model can be compiled with
STRUCTURES = INVERSE_KINDS


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


def _check_options(flow: str | None, structure: str, inversion_mode: str) -> None:
    if flow is not None and flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; use one of {sorted(FLOWS)}")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; use one of {list(STRUCTURES)}")
    if inversion_mode not in INVERSION_MODES:
        raise ValueError(f"unknown inversion_mode {inversion_mode!r}; use one of {list(INVERSION_MODES)}")


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
    **flow_options,
) -> CompiledModel:
    """Trace ``model(*args, **model_kwargs)``, invert it and build the flow and layouts.

    Args:
        model: a Pyro model.
        *args, model_kwargs: the arguments the model is traced with.
        flow: ``"straf"``, ``"grf"``, ``"cnf"``, or ``None`` for no flow (structure only).
        structure: an inverse kind (:data:`STRUCTURES`).
        observed: observed site names (default: see :func:`~pyro_struct.trace_model`).
        structure_seed: seed of the ``"random"`` structure.
        inversion_mode: ``"auto"``, ``"top"`` or ``"bottom"``.
        num_probes: prior draws used by the tracer (``None``: its default).
        granularity: ``"element"`` or ``"site"`` (see :func:`~pyro_struct.trace_model`).
        **flow_options: passed to the flow class.

    Returns:
        a :class:`CompiledModel`; its flow has ``d = latent_layout.dim`` latents and
        ``observed_layout.dim`` context columns.

    Raises:
        ModelStructureError: an observed name that is not a site, no latent site, and every
            refusal of the tracer.
    """
    _check_options(flow, structure, inversion_mode)
    if isinstance(observed, str):
        observed = [observed]
    trace_options = {"granularity": granularity}
    if num_probes is not None:
        trace_options["num_probes"] = num_probes
    bn = trace_model(model, *args, observed=None if observed is None else list(observed), **trace_options, **dict(model_kwargs or {}))
    if not bn.latent_sites:
        raise ModelStructureError("the model has no latent sample site: there is nothing to infer")
    inverse = inverse_structure(bn, kind=structure, seed=structure_seed, mode=inversion_mode)
    latent_layout = LatentLayout(bn, inverse.order)
    observed_layout = ObservedLayout(bn, inverse.observed)
    built = None if flow is None else build_flow(flow, inverse, **flow_options)
    options = dict(flow=flow, structure=structure, observed=observed, structure_seed=structure_seed,
                   inversion_mode=inversion_mode, num_probes=num_probes, flow_options=dict(flow_options))
    return CompiledModel(bn, inverse, built, latent_layout, observed_layout, options)
