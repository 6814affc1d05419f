"""Bounds on log p(x) of data points: importance weights log p(x, z_k) - log q(z_k | x), the ELBO and the IWAE bound.

A data set is read as independent *data points* of a *point model*:

- a guide with one flow coordinate per latent (the flat path) treats one run of the model as
  one data point: ``data[site]`` is ``(N, *site_shape)``, the data points along the first
  dimension (a VAE written for one data point, or replicates of a whole model);
- a shared-weight plate guide (``plates="auto"``) treats one member of the data plate as one
  data point: ``data[site]`` has the site's shape with the plate dimension of size ``N``, and the
  point model is the model with that plate cut to one member (:class:`OneMember`). Every latent
  must then be inside the plate (a global latent couples the data points).

Both the training objectives of ``fit(data=...)`` and :mod:`pyro_struct.evaluate` use the one
estimator here, :func:`log_weights`: ``K`` reparameterised draws of ``q(z | x_b)`` per data point
and the model's ``log p(x_b, z)`` at them, evaluated for all ``K x B`` pairs in one batched run.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Mapping

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .simulation import ModelSimulator

__all__ = ["OneMember", "PointData", "point_data", "point_shapes", "point_model", "point_simulator", "log_weights", "elbo", "iwae",
           "negative_elbo_on_data", "negative_iwae", "DATA_OBJECTIVES"]


class OneMember(Messenger):
    """Runs a model with its plate ``plate`` cut to one member (index 0), unscaled.

    The plate's subsample site is set to ``[0]``, and the ``size / subsample_size`` scale Pyro
    gives sites in a subsampled plate is undone, so a run scores one data point. Observed
    values are meant to be conditioned from outside (the model's own data argument is not used
    by the sites this handler scores).
    """

    def __init__(self, plate: str):
        super().__init__()
        self.plate = plate

    def _pyro_sample(self, msg) -> None:
        if site_is_subsample(msg):
            if msg["name"] == self.plate:
                wanted = getattr(msg["fn"], "subsample_size", None)
                if wanted not in (None, 1) and wanted != getattr(msg["fn"], "size", None):
                    raise ValueError(
                        f"plate {self.plate!r} subsamples itself (subsample_size={wanted}); fit(data=...) and "
                        "pyro_struct.evaluate choose the data points themselves: pass the subsample size as a model "
                        "argument and set it to None in the guide's model_args/model_kwargs"
                    )
                msg["value"] = torch.zeros(1, dtype=torch.long)
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate and frame.full_size:
                msg["scale"] = msg["scale"] * frame.size / frame.full_size


class PointData:
    """Data points site -> ``(N, *point_shape)``: a training pool (``num``, ``select``)."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        self.values = dict(values)

    @property
    def num(self) -> int:
        return int(next(iter(self.values.values())).shape[0])

    def select(self, index: torch.Tensor) -> "PointData":
        return PointData({k: v[index] for k, v in self.values.items()})


def _plate_sites(guide) -> dict[str, int]:
    """Observed site -> position of its plate dimension (plate guides; errors for global sites)."""
    L = guide.plate_layout
    if hasattr(L, "inner_plate"):
        raise ValueError(
            f"data: fit(data=...) and pyro_struct.evaluate split data into independent points of one plate; the nested "
            f"plates {L.plates[0]!r}/{L.plates[1]!r} are not supported there yet: train on simulations (objective "
            "'skl'/'fkl', simulate_with=...) or run pyro.infer.SVI with the guide on the data"
        )
    if L.num_globals:
        names = sorted({s.name for s in L.latent if s.pos is None})
        raise ValueError(
            f"data: the latent sites {names} are outside plate {L.plate!r} and couple its members, so the "
            "members are not independent data points; fit(data=...) and pyro_struct.evaluate need every latent "
            "inside the data plate (or a guide with plates=None, whose data points are whole runs of the model)"
        )
    out = {}
    for s in L.observed:
        if s.pos is None:
            raise ValueError(f"data: observed site {s.name!r} is outside plate {L.plate!r}; every observed site must be in the data plate")
        out[s.name] = s.pos
    return out


def point_shapes(guide) -> dict[str, tuple]:
    """Site -> shape of one data point's value (plate dimension of size 1 for a plate guide)."""
    shapes = {name: tuple(int(s) for s in info.shape) for name, info in guide.bn.sites.items()}
    if guide.plate_layout is None:
        return shapes
    for s in guide.plate_layout.latent + guide.plate_layout.observed:
        if s.pos is not None:
            shapes[s.name] = tuple(1 if i == s.pos else d for i, d in enumerate(s.shape))
    return shapes


def _as_points(name: str, v: torch.Tensor, shape: tuple, pos: int | None) -> torch.Tensor:
    """A data tensor -> ``(N, *point_shape)``; the error names the site and the expected shape."""
    if pos is None:
        if v.dim() != len(shape) + 1 or tuple(v.shape[1:]) != shape:
            raise ValueError(
                f"data[{name!r}] has shape {tuple(v.shape)}, but observed site {name!r} has shape {shape}: pass "
                f"(N, {', '.join(map(str, shape))}{',' if len(shape) == 1 else ''}) with the N data points along the first dimension"
            )
        return v
    rest = [d for i, d in enumerate(shape) if i != pos]
    ok = v.dim() == len(shape) and all(a == b for i, (a, b) in enumerate(zip(v.shape, shape)) if i != pos)
    if not ok:
        want = tuple("N" if i == pos else d for i, d in enumerate(shape))
        raise ValueError(
            f"data[{name!r}] has shape {tuple(v.shape)}, but observed site {name!r} of the plate guide has member "
            f"shape {tuple(rest)}: pass shape {want} with the N data points along the plate dimension"
        )
    return v.movedim(pos, 0).unsqueeze(pos + 1)


def point_data(guide, data: Mapping[str, Any]) -> PointData:
    """Check ``data`` (observed site -> tensor) against the guide and split it into data points.

    Raises:
        ValueError: not a dict, a missing or unknown site, a shape that does not match the
            observed site, non-finite values or sites with different numbers of data points
            (the message names the site).
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"data must be a non-empty dict {{observed site: tensor}}; got {type(data).__name__}")
    observed = list(guide.observed_sites)
    unknown = [k for k in data if k not in observed]
    if unknown:
        raise ValueError(f"data: {unknown[0]!r} is not an observed site of the model; observed sites are {observed}")
    missing = [s for s in observed if s not in data]
    if missing:
        raise ValueError(f"data: missing observed site {missing[0]!r}; pass data={{{missing[0]!r}: tensor, ...}}")
    positions = _plate_sites(guide) if guide.plate_layout is not None else {}
    shapes = {name: tuple(int(s) for s in guide.bn.sites[name].shape) for name in observed}
    points, sizes = {}, {}
    for name in observed:
        v = torch.as_tensor(data[name], dtype=torch.get_default_dtype())
        if not torch.isfinite(v).all():
            raise ValueError(f"data[{name!r}] has non-finite values")
        points[name] = _as_points(name, v, shapes[name], positions.get(name))
        sizes[name] = points[name].shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"data: the observed sites have different numbers of data points {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError("data: no data points")
    return PointData(points)


def point_model(model: Callable, guide) -> Callable:
    """The model of one data point: ``model`` itself (flat guide) or cut to one plate member."""
    return model if guide.plate_layout is None else OneMember(guide.plate_layout.plate)(model)


def point_simulator(guide, model: Callable | None = None) -> ModelSimulator:
    """A :class:`~pyro_struct.simulation.ModelSimulator` of the point model (``model`` defaults to the guide's)."""
    model = guide.model if model is None else model
    if guide.plate_layout is None and model is guide.model:
        return guide.simulator()
    sites = types.SimpleNamespace(sites={k: types.SimpleNamespace(shape=v) for k, v in point_shapes(guide).items()})
    return ModelSimulator(point_model(model, guide), sites, guide.model_args, guide.model_kwargs)


def log_weights(guide, simulator, points: Mapping[str, torch.Tensor], num_samples: int) -> torch.Tensor:
    """``log p(x_b, z_bk) - log q(z_bk | x_b)`` ``(K, B)`` at ``K`` reparameterised draws per data point.

    Args:
        guide: an amortised guide (``condition``, ``rsample_q``).
        simulator: the point model's simulator (:func:`point_simulator`): its ``log_joint``.
        points: observed site -> ``(B, *point_shape)``.
        num_samples: ``K``.
    """
    B, K = next(iter(points.values())).shape[0], int(num_samples)
    context, _ = guide.condition(points, "data", False)
    z, log_q = guide.rsample_q(context, K, torch.Size((B,)))
    values = {k: v.reshape((K * B,) + v.shape[2:]) for k, v in z.items()}
    values.update({k: v.expand((K,) + v.shape).reshape((K * B,) + v.shape[1:]) for k, v in points.items()})
    return simulator.log_joint(values).reshape(K, B) - log_q


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """The ELBO per data point ``(B,)`` of log weights ``(K, B)``: their mean over the ``K`` draws."""
    return log_w.mean(0)


def iwae(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound per data point ``(B,)``: ``log (1/K) sum_k exp(log_w[k])``
    (Burda et al. 2016); at least :func:`elbo` of the same weights, equal for ``K = 1``."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def negative_elbo_on_data(guide, simulator, points: Mapping[str, torch.Tensor], num_particles: int = 1) -> torch.Tensor:
    """Training loss: the negative ELBO in nats per data point, averaged over the batch."""
    return -elbo(log_weights(guide, simulator, points, num_particles)).mean()


def negative_iwae(guide, simulator, points: Mapping[str, torch.Tensor], num_particles: int = 8) -> torch.Tensor:
    """Training loss: the negative IWAE bound (``K = num_particles``) in nats per data point, averaged over the batch."""
    return -iwae(log_weights(guide, simulator, points, num_particles)).mean()


#: data objective name -> (loss, default number of particles K)
DATA_OBJECTIVES: dict[str, tuple[Callable, int]] = {"elbo": (negative_elbo_on_data, 1), "iwae": (negative_iwae, 8)}
