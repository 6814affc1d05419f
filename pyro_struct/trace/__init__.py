"""Trace a Pyro model into a scalar Bayesian network (DESIGN.md section 3).

Stages: probe the model (:mod:`.probe`, with provenance from :mod:`.provenance`), resolve the
observed sites and refuse what cannot be traced, find element-level dependencies from Jacobian
sparsity over several prior draws (:mod:`.sparsity`), turn site pairs into edges and build the
BayesNet (:mod:`.assemble`). :func:`find_observed_candidates` (:mod:`.probe`) finds the
sites a ``def model(data=None)`` model observes once given data.
"""

from __future__ import annotations

import gc
import warnings
from typing import Callable, Iterable, Mapping

import pyro
import pyro.util
import torch

from ..errors import ModelStructureError
from ..graph import BayesNet
from .assemble import build_bayesnet, check_acyclic, resolve_dependencies
from .probe import (
    Probe,
    check_same_structure,
    elementwise_log_prob,
    find_observed_candidates,
    is_discrete,
    run_probe,
    run_structure,
    site_layout,
    strip_wrappers,
)
from .provenance import positions
from .sparsity import PairMask, accumulate_sparsity

__all__ = ["trace_model", "structure_runs", "find_observed_candidates"]


def trace_model(
    model: Callable,
    *args,
    observed: Iterable[str] | str | None = None,
    granularity: str = "element",
    num_probes: int = 3,
    dependencies: Mapping[str, Iterable[str]] | None = None,
    seed: int | None = 0,
    **kwargs,
) -> BayesNet:
    """Trace a Pyro model into a :class:`~pyro_struct.graph.BayesNet` over scalar coordinates.

    The model is run ``num_probes`` times with every sample site (observed ones included)
    drawn from its prior (the first run plain, the others spread into the tails as below).
    Which sites feed which comes from provenance tracking (exact for any torch op, and for
    values that escape to Python control flow); which *elements* feed which comes from
    batched gradients of each site's per-element log density with respect to its parents'
    values, united over the draws. A site pair with provenance but no non-zero gradient
    (rounding, comparisons, integer indexing) is connected all-to-all. A child reached by
    control flow or a non-differentiable path (``torch.where(t < tau, r1, r2)``), whose
    element-level dependencies may change with the values, gets ``structure_runs(num_probes)``
    gradient draws instead.

    Dynamic structure: when a sampled value reaches Python control flow (``if z < 0``,
    ``int(n)``) or a value-dependent shape (``z[z > 0]``), the model is also run
    :func:`structure_runs` ``(num_probes)`` more times (16 by default) cheaply, without
    provenance or gradients, with values spread over the prior and its tails (in every four
    runs each site is drawn twice from the prior, once at a low and once at a high extreme
    quantile, or the least likely of several draws); every run must give the same sites in
    the same order with the same shapes. Without such an escape the sites cannot change from
    run to run, and these runs are skipped.

    Nodes are ordered site by site in trace order, row-major within a site, and labelled
    with :func:`~pyro_struct.graph.node_label` (``"z"``, ``"z[3]"``, ``"L[1,0]"``).

    Cost: sites with few events share batched backward passes (sites whose inputs do not
    overlap are differentiated together); a site with many events (a large plate) is
    differentiated with forward passes for its small parents and compressed reverse passes
    (about ``2 sqrt(events)``) for its large ones, so a plate of ``N`` costs ``O(N^1.5)``
    rather than ``O(N^2)``. Further gradient draws are skipped when there are no gradients to
    read, e.g. for a Python-loop HMM of scalar sites.

    A parent site that reaches a child through any op that gradients cannot see through
    (rounding, comparisons, casts to integers, ``detach``, ``torch.no_grad``) is connected
    all-to-all even if other paths are differentiable (``z[0] + torch.round(z[1])``).

    - ``Independent``/``to_event`` events that factorise give one node per element; a joint
      event (``MultivariateNormal``, ``Dirichlet``, ...) is a block: its elements share their
      parents and each depends on the earlier ones. Latents whose support's bijection mixes
      elements (simplex, correlation Cholesky, ...) are blocks over their unconstrained
      coordinates (``SiteInfo.node_shape``, e.g. ``(K - 1,)`` for a ``K``-simplex).
    - ``pyro.deterministic`` and ``Delta`` sites are spliced out: their inputs pass through.
    - Auxiliary sites and observed sites masked with ``mask=False`` are ignored.

    Args:
        model: a Pyro model.
        *args, **kwargs: passed to the model on every run.
        observed: names of the observed sites. Default: the model's ``observed_sites``
            attribute if it declares one (the example models in :mod:`pyro_struct.models` do,
            so they can be traced without data), else the sites called with ``obs=``.
            Observed sites called without a value are drawn from the prior while tracing.
            Every other non-deterministic sample site is a latent.
        granularity: ``"element"`` (default) or ``"site"``: every site is one block and
            every node of a parent site feeds every node of a child site.
        num_probes: the number of prior draws whose gradients are read (default 3; each
            costs a model run plus backward passes); structure checks use
            ``max(16, 4 * num_probes)`` further cheap runs. Raise it for models whose
            element-level dependencies or sites change with the sampled values.
        dependencies: extra site-level edges ``{child_site: [parent_site, ...]}`` (every
            node of each parent to every node of the child).
        seed: seed of the prior draws; the global RNG state (torch, random, numpy) is
            restored afterwards.

    Model keyword arguments named like the options above cannot be passed through; wrap
    the model in a closure instead.

    Returns:
        The ``BayesNet``.

    Raises:
        ModelStructureError: discrete latent sites, sites whose set or shapes change between
            draws, observed sites missing from the trace, no latent site, a model that raises.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=torch.tensor(0.5))
        >>> sorted(trace_model(model).graph.edges)
        [('z', 'x')]
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model; got {type(model).__name__}")
    if granularity not in ("element", "site"):
        raise ValueError(f"granularity must be 'element' or 'site'; got {granularity!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int; got {num_probes!r}")
    seed = 0 if seed is None else int(seed)
    if observed is None:
        observed = getattr(model, "observed_sites", None)

    rng_state = pyro.util.get_rng_state()
    # the provenance run keeps every intermediate tensor alive; cyclic GC passes over them
    # would dominate the tracing time of large models
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        first = _probe_model(model, args, kwargs, seed, num_probes)
        layouts = _resolve_sites(first, observed, granularity)
        deps = _element_dependencies(model, args, kwargs, first, layouts, granularity, num_probes, seed)
    finally:
        pyro.util.set_rng_state(rng_state)
        if gc_was_enabled:
            gc.enable()
    names = [r.name for r in first.records]
    return build_bayesnet(layouts, _site_pairs(deps, names, dependencies))


# ----------------------------------------------------------------------------- stages
def structure_runs(num_probes: int) -> int:
    """How many cheap structure runs :func:`trace_model` makes for a model whose sampled values
    reach Python control flow or tensor shapes: ``max(16, 4 * num_probes)``."""
    return max(16, 4 * num_probes)


def _probe_model(model: Callable, args: tuple, kwargs: dict, seed: int, num_probes: int) -> Probe:
    """Stage 1: the provenance run (sites, their site-level parents and Python escapes) and,
    when sampled values reach Python control flow or shapes, cheap structure runs spread over
    the prior and its tails that must all give the same sites with the same shapes."""
    pyro.set_rng_seed(seed)
    first = run_probe(model, args, kwargs, with_provenance=True)
    if first.value_dependent:
        for k in range(structure_runs(num_probes)):
            # seeds apart from those of the gradient probes (seed + 1, ...)
            run = run_structure(model, args, kwargs, k, seed + 100_003 + k)
            check_same_structure(first, run, f"structure run {k}")
    return first


def _resolve_sites(first: Probe, observed, granularity: str) -> list:
    """Stage 2: decide which sites are observed, refuse what cannot be a guide's latent, and lay
    out every site's nodes (``SiteLayout`` list in trace order, node offsets set)."""
    records = first.records
    names = [r.name for r in records]
    observed_names = _resolve_observed(observed, first)
    for r in records:
        if r.name not in observed_names and is_discrete(r.fn, r.value):
            raise ModelStructureError(
                f"latent site {r.name!r} is discrete ({type(strip_wrappers(r.fn)).__name__} with support "
                f"{r.fn.support}); pyro_struct guides need continuous latents. Marginalise it out "
                "analytically, relax it to a continuous distribution, or list it in observed=."
            )
    if all(n in observed_names for n in names):
        raise ModelStructureError(
            f"the model has no latent site: every sample site ({names}) is observed; "
            "there is no posterior to approximate. Pass observed= without the sites to infer."
        )
    transforms: dict = {}
    layouts = [site_layout(r, i, r.name in observed_names, granularity, transforms) for i, r in enumerate(records)]
    for i, (lay, r) in enumerate(zip(layouts, records)):
        lay.scale_parents = tuple(records[u].name for u in positions(r.scale_prov) if u != i)
    offset = 0
    for lay in layouts:
        lay.node_offset, offset = offset, offset + lay.n_nodes
    return layouts


def _resolve_observed(observed, first: Probe) -> set:
    names = [r.name for r in first.records]
    if observed is None:
        return {r.name for r in first.records if r.was_observed}
    if isinstance(observed, str):
        observed = [observed]
    observed = list(observed)
    for o in observed:
        if not isinstance(o, str):
            raise TypeError(f"observed must be site names (str); got {o!r}")
        if o in first.spliced:
            raise ModelStructureError(
                f"observed site {o!r} is {first.spliced[o]}, not a random variable; "
                "remove it from observed="
            )
        if o not in names:
            raise ModelStructureError(
                f"observed site {o!r} is missing from the model's trace; its sample sites are {names}. "
                "Fix the name in observed= (site names, not argument names)."
            )
    return set(observed)


def _element_dependencies(model, args, kwargs, first: Probe, layouts: list, granularity: str, num_probes: int, seed: int) -> dict:
    """Stage 3: site-level parents (data flow, control flow, non-differentiable paths) and, for
    pairs whose element-level answer is not already all-to-all, the element pairs with a
    non-zero gradient in any of ``num_probes`` prior draws (the first plain, the others spread
    into the tails; ``structure_runs(num_probes)`` draws for children reached by control flow or
    non-differentiable paths).

    Returns ``{"parents", "control", "nondiff"}`` (child pos -> parent positions) and
    ``"masks"`` ((child, parent) -> ``PairMask``).
    """
    records = first.records
    parents = {d: [u for u in positions(r.prov) if u != d] for d, r in enumerate(records)}
    control = {d: [u for u in positions(r.taint) if u != d] for d, r in enumerate(records)}
    nondiff = {d: [u for u in positions(r.nondiff) if u != d] for d, r in enumerate(records)}
    grad_parents: dict[int, list[int]] = {}
    if granularity == "element":
        for d, us in parents.items():
            for u in us:
                par = layouts[u]
                single_parent_unit = par.n_values == 1 or (par.mixing and par.n_groups == 1)
                if layouts[d].n_groups <= 1 and single_parent_unit:
                    continue
                if records[u].value.requires_grad:
                    grad_parents.setdefault(d, []).append(u)
    masks = {(d, u): PairMask(layouts[d].n_events, layouts[u].n_values) for d, us in grad_parents.items() for u in us}
    _gradient_sparsity(first.records, grad_parents, masks)
    # children reached by control flow or a non-differentiable path (torch.where, rounding)
    # may have element-level dependencies that change with the values (a change point):
    # they get as many draws as the structure runs, all spread into the tails
    varying = {d: us for d, us in grad_parents.items() if control[d] or nondiff[d]}
    n_draws = structure_runs(num_probes) if varying else num_probes if grad_parents else 1
    for p in range(1, n_draws):
        probe = run_structure(model, args, kwargs, p - 1, seed + p, grad=True)
        check_same_structure(first, probe, f"probe {p}")
        _gradient_sparsity(probe.records, grad_parents if p < num_probes else varying, masks)
        del probe
    return {"parents": parents, "control": control, "nondiff": nondiff, "masks": masks}


def _gradient_sparsity(records: list, grad_parents: dict, masks: dict) -> None:
    """Accumulate the non-zero gradients of each child's per-event log density with respect to
    its parents' values in one run into ``masks``."""
    lps: dict[int, torch.Tensor] = {}
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for d in grad_parents:
            r = records[d]
            try:
                lp = elementwise_log_prob(r.fn, r.value)
            except Exception:  # noqa: BLE001 -- a density we cannot evaluate falls back to site-level edges
                continue
            if lp.requires_grad:
                lps[d] = lp
        values = {u: records[u].value for us in grad_parents.values() for u in us}
        accumulate_sparsity(lps, {d: grad_parents[d] for d in lps}, values, masks)


def _site_pairs(deps: dict, names: list[str], dependencies) -> dict:
    """Stage 4: ``(child, parent) -> (m, 2)`` element pairs found by gradients, or ``None`` for
    all-to-all (no non-zero gradient, control flow, non-differentiable paths, ``dependencies=``)."""
    parents, control, nondiff, masks = deps["parents"], deps["control"], deps["nondiff"], deps["masks"]
    extra = resolve_dependencies(dependencies, names)
    if extra:
        traced = [(d, u) for table in (parents, control) for d, us in table.items() for u in us]
        check_acyclic(traced, extra, names)
    site_pairs: dict = {}
    for d in range(len(names)):
        for u in parents[d]:
            mask = masks.get((d, u))
            found = mask.pairs() if mask is not None else None
            # no non-zero gradient at all: the path is not differentiable, connect all
            site_pairs[(d, u)] = found if found is not None and found.shape[0] else None
        for u in control[d] + nondiff[d]:
            site_pairs[(d, u)] = None
    for d, u in extra:
        site_pairs[(d, u)] = None
    return site_pairs
