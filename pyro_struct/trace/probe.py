"""Model runs for tracing: the probe messenger, the per-site records of a run, site layouts, and the
search for sites a model observes only when given data."""

from __future__ import annotations

import inspect
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pyro.util
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Distribution, Independent, biject_to, transform_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import IndependentTransform, Transform

from ..errors import ModelStructureError
from .provenance import ProvenanceMode, object_bits

__all__ = [
    "Record",
    "Probe",
    "SiteLayout",
    "run_probe",
    "run_structure",
    "tail_draw",
    "TailPlan",
    "site_layout",
    "check_same_structure",
    "strip_wrappers",
    "is_discrete",
    "elementwise_log_prob",
    "find_observed_candidates",
]


def strip_wrappers(fn: Distribution) -> Distribution:
    """The distribution under ``Independent``/``to_event``, ``mask`` and ``expand`` wrappers.

    Its ``log_prob`` gives one density per factorised element (or per joint event).
    """
    while True:
        if isinstance(fn, Independent):
            fn = fn.base_dist
        elif isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
            fn = fn.base_dist
        else:
            return fn


def _is_delta(fn: Distribution) -> bool:
    return isinstance(strip_wrappers(fn), dist.Delta)


def is_discrete(fn: Distribution, value: torch.Tensor) -> bool:
    """Whether a site of distribution ``fn`` with value ``value`` is discrete (discrete or
    enumerable support, or a non-floating value)."""
    support = getattr(fn, "support", None)
    if support is not None and getattr(support, "is_discrete", False):
        return True
    if getattr(fn, "has_enumerate_support", False):
        return True
    return not (value.is_floating_point() or value.is_complex())


def elementwise_log_prob(fn: Distribution, value: torch.Tensor) -> torch.Tensor:
    """Flat per-event log density: factorised elements separately, joint events as one entry."""
    base = strip_wrappers(fn)
    ed = base.event_dim
    batch = value.shape[: value.dim() - ed]
    lp = base.log_prob(value)
    if lp.shape != batch:
        lp = lp.expand(batch)
    return lp.reshape(-1)


@dataclass
class Record:
    """One sample site of one model run."""

    name: str
    fn: Distribution
    value: torch.Tensor  # the leaf the model saw
    was_observed: bool  # carried obs= (or a conditioned value) in the model call
    prov: int = 0  # provenance bits of the distribution (site level)
    nondiff: int = 0  # the part of prov reached through ops that gradients cannot see through
    taint: int = 0  # provenance of values that escaped to Python before this site
    scale_prov: int = 0  # provenance bits of the distribution's scale parameter (``scale``, ``scale_tril``)
    plates: tuple = ()  # (name, dim, size) of each vectorised plate the site is in

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape)


@dataclass
class Probe:
    """The sites of one model run, in trace order, and the sites passed through."""

    records: list = field(default_factory=list)
    spliced: dict = field(default_factory=dict)  # name -> why it is not a node
    # (provenance run only) whether sampled values reached Python control flow or shapes
    value_dependent: bool = False


class _ProbeMessenger(Messenger):
    """Samples every site from the prior (observed ones too) as a fresh leaf and records it."""

    def __init__(self, mode: ProvenanceMode | None, tails: TailPlan | None = None, grad: bool = True):
        super().__init__()
        self.mode = mode
        self.tails = tails  # values pushed into the tails with this generator
        self.grad = grad  # floating leaves require grad
        self.probe = Probe()
        self._names: set = set()
        self._pending: dict = {}

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        name = msg["name"]
        infer = msg.get("infer") or {}
        fn = msg["fn"]
        if infer.get("is_auxiliary"):
            self.probe.spliced[name] = "an auxiliary site"
            return
        if infer.get("_deterministic") or _is_delta(fn):
            self.probe.spliced[name] = "a deterministic (Delta) site"
            return
        if msg["is_observed"] and msg.get("mask") is False:
            self.probe.spliced[name] = "an observed site masked out with mask=False"
            return
        if isinstance(strip_wrappers(fn), dist.Unit):
            raise ModelStructureError(
                f"site {name!r} is a pyro.factor: a factor couples its inputs without being a "
                "variable, which pyro_struct cannot place in a Bayesian network. Write it as an "
                "observed sample site instead (pyro.sample(name, Distribution(...), obs=value))."
            )
        if name in self._names:
            raise ModelStructureError(
                f"site name {name!r} is used twice in one model run; give every sample site a unique name"
            )
        self._names.add(name)
        was_observed = bool(msg["is_observed"])
        self._pending[name] = (was_observed, msg["value"] if was_observed else None)
        if was_observed:
            # probes draw observed sites from the prior too: they may be parents of latents
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False
        if self.tails is not None and not msg["done"]:
            msg["value"] = tail_draw(fn, *self.tails.next(), msg["args"], msg["kwargs"])
            msg["done"] = True
        elif self.mode is not None and not msg["done"]:
            # draw the value here, out of provenance tracking: it is replaced by a fresh leaf
            # anyway, and the samplers' own ops and Python escapes are not the model's
            with torch._C.DisableTorchFunction():
                msg["value"] = fn(*msg["args"], **msg["kwargs"])
            msg["done"] = True

    def _pyro_post_sample(self, msg):
        pending = self._pending.pop(msg["name"], None)
        if pending is None:
            return
        was_observed, obs = pending
        fn = msg["fn"]
        value = msg["value"]
        if was_observed and isinstance(obs, torch.Tensor) and obs.shape != value.shape:
            # an observation broadcast against the distribution: draw the observation's shape
            try:
                with torch._C.DisableTorchFunction():
                    value = fn.expand(obs.shape[: obs.dim() - fn.event_dim]).sample()
            except (ValueError, RuntimeError):
                value = obs
        with torch._C.DisableTorchFunction():
            # a fresh tensor object: the leaf must not alias the user's observation
            leaf = value.detach().clone() if value is obs else value.detach()
            if leaf.is_floating_point() and self.grad:
                leaf.requires_grad_(True)
        msg["value"] = leaf
        plates = tuple(
            (f.name, int(f.dim), int(f.size)) for f in msg["cond_indep_stack"] if f.vectorized and f.dim is not None
        )
        record = Record(msg["name"], fn, leaf, was_observed, plates=plates)
        mode = self.mode
        if mode is not None:
            record.prov, record.nondiff = object_bits(fn, mode)
            record.scale_prov = _scale_bits(fn, mode)
            record.taint = mode.taint
            mode.tag(leaf, 1 << len(self.probe.records))
        self.probe.records.append(record)


def _scale_bits(fn: Distribution, mode: ProvenanceMode) -> int:
    """Provenance of the scale parameter of ``fn`` (under its wrappers): which sites set how wide
    it is, as opposed to where it is (a funnel: ``z ~ Normal(0, exp(v / 2))``)."""
    base = strip_wrappers(fn)
    bits = 0
    for name in ("scale", "scale_tril"):
        try:
            value = getattr(base, name, None)
        except Exception:  # noqa: BLE001 -- a lazily computed parameter that fails to compute carries no scale
            value = None
        if isinstance(value, torch.Tensor):
            bits |= object_bits(value, mode)[0]
    return bits


class _TailFailure(Exception):
    """The model raised in a run with values pushed into the tails."""


# Tail pushes of structure runs: quantiles between these two (log-uniformly), or the most
# extreme of this many prior draws for distributions without an inverse cdf.
_TAIL_QUANTILES = (1e-4, 1e-2)
_TAIL_DRAWS = 16


class TailPlan:
    """Where the sites of structure run ``index`` are drawn: ``next()`` gives the next site's
    ``(side, q)``. Within each block of four runs every site is drawn twice from the prior,
    once in its low tail and once in its high tail (``side`` 0, 0, -1, +1), in an order shifted
    per site and per block so that the sites' tails meet in changing combinations; ``q`` is
    log-uniform in ``_TAIL_QUANTILES`` (from ``seed``)."""

    def __init__(self, index: int, seed: int):
        self.index = index
        self.block = index // 4
        self.rng = random.Random(seed)
        self.site = 0

    def next(self) -> tuple[int, float]:
        # the site's phase in this block: a hash of ints is the same in every process
        phase = hash((self.block, self.site, 0x5EED)) >> 7
        self.site += 1
        side = (0, 0, -1, 1)[(self.index + phase) % 4]
        lo, hi = (math.log10(q) for q in _TAIL_QUANTILES)
        return side, 10 ** (lo + (hi - lo) * self.rng.random())


def tail_draw(fn: Distribution, side: int, q: float, args=(), kwargs=None) -> torch.Tensor:
    """A draw of ``fn`` at its prior (``side`` 0) or in its low (-1) or high (+1) tail.

    In a tail: every element at quantile ``q`` or ``1 - q`` (``icdf``) when the distribution
    has an inverse cdf, else the least likely of ``_TAIL_DRAWS`` prior draws. Same shape and
    support as ``fn(*args, **kwargs)``.
    """
    kwargs = kwargs or {}
    with torch._C.DisableTorchFunction(), torch.no_grad():
        value = fn(*args, **kwargs)
        if side == 0:
            return value
        if value.is_floating_point():
            try:
                v = strip_wrappers(fn).icdf(torch.full_like(value, 1 - q if side > 0 else q))
                if v.shape == value.shape and bool(torch.isfinite(v).all()) and bool(fn.support.check(v).all()):
                    return v
            except (NotImplementedError, ValueError, RuntimeError, TypeError, AttributeError):
                pass
        draws = torch.stack([value] + [fn(*args, **kwargs) for _ in range(_TAIL_DRAWS - 1)])
        try:  # the least likely draw
            score = -fn.log_prob(draws).reshape(_TAIL_DRAWS, -1).double().sum(1)
        except (NotImplementedError, ValueError, RuntimeError):
            score = draws.reshape(_TAIL_DRAWS, -1).double().sum(1) * side
        if not bool(torch.isfinite(score).all()):
            return value
        return draws[int(score.argmax())]


def run_structure(model: Callable, args: tuple, kwargs: dict, index: int, seed: int, grad: bool = False) -> Probe:
    """Structure run number ``index``: every value from :func:`tail_draw` as :class:`TailPlan`
    places it (spread over the prior and its tails), without provenance; gradient leaves only
    if ``grad``; seeded with ``seed``. If the model raises at those values, the run is repeated
    with plain prior draws."""
    pyro.set_rng_seed(seed)
    try:
        return run_probe(model, args, kwargs, with_provenance=False, tails=TailPlan(index, seed), grad=grad)
    except _TailFailure:
        pyro.set_rng_seed(seed)
        return run_probe(model, args, kwargs, with_provenance=False, grad=grad)


def run_probe(
    model: Callable, args: tuple, kwargs: dict, with_provenance: bool, tails: TailPlan | None = None,
    grad: bool = True,
) -> Probe:
    """Run ``model(*args, **kwargs)`` once with every site drawn from its prior as a fresh leaf
    (``requires_grad`` for floating sites if ``grad``), with provenance tracking if
    ``with_provenance``; ``tails``: the generator of tail pushes (see :func:`run_structure`).

    Any exception of the model becomes a :class:`ModelStructureError` naming the last site reached.
    """
    mode = ProvenanceMode() if with_provenance else None
    messenger = _ProbeMessenger(mode, tails=tails, grad=grad)
    try:
        with torch.enable_grad(), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with messenger:
                if mode is not None:
                    with mode:
                        model(*args, **kwargs)
                else:
                    model(*args, **kwargs)
    except ModelStructureError:
        raise
    except Exception as e:
        if tails is not None:
            raise _TailFailure() from e
        records = messenger.probe.records
        where = f"after site {records[-1].name!r}" if records else "before its first sample site"
        raise ModelStructureError(
            f"the model raised {type(e).__name__} while being traced ({where}): {e}. "
            "trace_model runs the model with every site drawn from its prior; make sure the model "
            "runs with the given arguments and with observed sites left unset."
        ) from e
    if mode is not None:
        messenger.probe.value_dependent = bool(mode.taint) or mode.value_dependent_shapes
    return messenger.probe


@dataclass
class SiteLayout:
    """How one site's values, log-density events and scalar nodes line up."""

    name: str
    pos: int
    shape: tuple
    node_shape: tuple
    observed: bool
    support: Constraint
    event_dim: int  # of the site's distribution
    block: bool
    mixing: bool  # latent whose bijection mixes elements: children see whole groups
    n_values: int
    n_nodes: int
    n_events: int
    n_groups: int
    node_offset: int = 0
    plates: tuple = ()
    scale_parents: tuple = ()  # names of the sites its distribution's scale depends on

    @property
    def events_per_group(self) -> int:
        return self.n_events // self.n_groups if self.n_groups else 0

    @property
    def values_per_group(self) -> int:
        return self.n_values // self.n_groups if self.n_groups else 0

    @property
    def nodes_per_group(self) -> int:
        return self.n_nodes // self.n_groups if self.n_groups else 0


def _prod(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _unconstraining_transform(name: str, support: Constraint, cache: dict | None = None) -> Transform:
    if cache is not None and id(support) in cache:
        return cache[id(support)][1]
    t = _find_transform(name, support)
    if cache is not None:
        cache[id(support)] = (support, t)  # the support is held so that its id stays unique
    return t


def _find_transform(name: str, support: Constraint) -> Transform:
    for factory in (biject_to, transform_to):
        try:
            return factory(support)
        except NotImplementedError:
            continue
    raise ModelStructureError(
        f"latent site {name!r} has support {support}, which has no bijection to unconstrained "
        "space (torch.distributions.biject_to); reparametrise it with a supported support or observe it"
    )


def site_layout(record: Record, pos: int, observed: bool, granularity: str, cache: dict | None = None) -> SiteLayout:
    """The :class:`SiteLayout` of site number ``pos`` (``cache``: support id -> bijection, shared
    across sites). Latents get the node shape of their unconstrained coordinates."""
    fn, shape = record.fn, record.shape
    support = fn.support
    ed = strip_wrappers(fn).event_dim  # joint event dims left after unwrapping Independent
    group_dims = ed
    node_shape = shape
    mixing = False
    if not observed:
        t = _unconstraining_transform(record.name, support, cache)
        node_shape = tuple(int(s) for s in t.inverse_shape(torch.Size(shape)))
        base = t
        while isinstance(base, IndependentTransform):
            base = base.base_transform
        if base.codomain.event_dim > 0 or node_shape != shape:
            mixing = True
            group_dims = max(ed, base.codomain.event_dim)
    group_dims = min(group_dims, len(shape))
    n_values = _prod(shape)
    n_groups = _prod(shape[: len(shape) - group_dims])
    if granularity == "site":
        n_groups = 1 if n_values else 0
    return SiteLayout(
        name=record.name,
        pos=pos,
        shape=shape,
        node_shape=node_shape,
        observed=observed,
        support=support,
        event_dim=int(fn.event_dim),
        block=granularity == "site" or group_dims > 0,
        mixing=mixing,
        n_values=n_values,
        n_nodes=_prod(node_shape),
        n_events=_prod(shape[: len(shape) - min(ed, len(shape))]),
        n_groups=n_groups,
        plates=record.plates,
    )


def check_same_structure(first: Probe, other: Probe, probe: str) -> None:
    """Raise :class:`ModelStructureError` naming the first site whose presence, order or shape
    differs between the run ``probe`` (a label, e.g. ``"probe 2"``; ``other``) and the first
    probe (``first``)."""
    a = [(r.name, r.shape) for r in first.records]
    b = [(r.name, r.shape) for r in other.records]
    if a == b:
        return
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    for (na, sa), (nb, sb) in zip(a, b):
        if na == nb and sa != sb:
            raise ModelStructureError(
                f"site {na!r} has shape {sa} in one prior draw and {sb} in another (dynamic structure). "
                "pyro_struct needs sites with fixed shapes; fix the shape (e.g. pad and mask) or make it "
                "independent of sampled values."
            )
    only_a = [n for n in names_a if n not in set(names_b)]
    only_b = [n for n in names_b if n not in set(names_a)]
    name = (only_a or only_b or [next(na for (na, _), (nb, _) in zip(a, b) if na != nb)])[0]
    raise ModelStructureError(
        f"site {name!r} appears in some prior draws but not in others, or in a different order "
        f"(dynamic structure: {probe} differs from the first probe). pyro_struct needs the same sites "
        "in every run of the model: replace value-dependent control flow by masking (poutine.mask) "
        "or sample every site unconditionally."
    )


# ----------------------------------------------------------------------------- obs=data idiom
# Distinct (shape, dtype) draws tried per model argument: each try is one model run.
_MAX_TRIES = 8


def find_observed_candidates(model: Callable, *args, **kwargs) -> dict[str, str]:
    """Sample sites that carry ``obs=`` once a data argument left at ``None`` is given a value.

    For each parameter of ``model`` whose default is ``None`` and that ``args``/``kwargs`` do
    not set (or set to ``None``), the model is called with that argument set to a prior draw
    of one of its sample sites (one try per distinct shape and dtype, the sites last in trace
    order first), or to the draws of all sites of one shape stacked (``data[t]`` in a loop),
    at most ``_MAX_TRIES`` tries; the sample sites that are observed in that call but
    not in the call as given are reported. Tries where the model raises are skipped. Costs
    one model run plus at most ``_MAX_TRIES`` per such parameter; the global RNG state is
    restored afterwards.

    Args:
        model: a Pyro model.
        *args, **kwargs: the arguments the model is traced with.

    Returns:
        ``{site name: argument name}``, e.g. ``{"x": "data"}`` for
        ``def model(data=None): ... pyro.sample("x", ..., obs=data)``; empty when no such
        parameter exists, the model's signature cannot be read, or nothing becomes observed.
    """
    try:
        # a PyroModule's __call__ takes (*args, **kwargs); its forward names the arguments
        sig = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [
        p.name for p in sig.parameters.values()
        if p.kind in kinds and p.default is None and bound.arguments.get(p.name) is None
    ]
    if not names:
        return {}
    rng_state = pyro.util.get_rng_state()
    try:
        pyro.set_rng_seed(0)
        baseline = _sample_sites(model, bound.args, bound.kwargs)
        if baseline is None:
            return {}
        already = {name for name, (_, observed) in baseline.items() if observed}
        draws = _distinct_draws(baseline)
        found: dict[str, str] = {}
        for arg in names:
            for draw in draws:
                trial = sig.bind_partial(*args, **kwargs)
                trial.arguments[arg] = draw.clone()
                sites = _sample_sites(model, trial.args, trial.kwargs)
                newly = [] if sites is None else [n for n, (_, obs) in sites.items() if obs and n not in already]
                if newly:
                    found.update({n: arg for n in newly if n not in found})
                    break
        return found
    finally:
        pyro.util.set_rng_state(rng_state)


def _sample_sites(model: Callable, args: tuple, kwargs: dict) -> dict | None:
    """``{site: (value, is_observed)}`` of one ordinary model run, or ``None`` if it raised."""
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- a value of the wrong shape for this argument: try another
        return None
    return {
        name: (site["value"], bool(site["is_observed"]))
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and isinstance(site["value"], torch.Tensor)
    }


def _distinct_draws(baseline: dict) -> list[torch.Tensor]:
    """One latent draw per distinct (shape, dtype), the sites last in trace order first; then,
    for each (shape, dtype) shared by several sites, their draws stacked (the data of a Python
    loop indexed as ``data[t]``). At most ``_MAX_TRIES``."""
    groups: dict = {}
    for value, observed in reversed(list(baseline.values())):
        if not observed:
            groups.setdefault((tuple(value.shape), value.dtype), []).append(value.detach())
    singles = [values[0] for values in groups.values()]
    stacks = [torch.stack(values[::-1]) for values in groups.values() if len(values) > 1]
    return (singles + stacks)[:_MAX_TRIES]
