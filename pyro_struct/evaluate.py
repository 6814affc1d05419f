"""Evaluating a learned model and its amortised encoder on data: importance-weighted log-likelihood and reconstruction error.

Data points are read as in ``fit(data=...)`` (:func:`pyro_struct.likelihood.point_data`): a flat
guide's data point is one run of the model, a plate guide's one member of the data plate.

Example:
    >>> nll(model, guide, {"x": x_test}, num_samples=500)            # doctest: +SKIP
    36.2
    >>> reconstruction_error(model, guide, {"x": x_test})            # doctest: +SKIP
    3.9
"""

from __future__ import annotations

from typing import Callable, Mapping

import pyro.poutine as poutine
import torch

from .likelihood import iwae, log_weights, point_data, point_model, point_simulator
from .threads import torch_threads

__all__ = ["nll", "log_likelihood", "reconstruction_error", "reconstructions"]

#: samples x data points evaluated in one batched run of the model
MAX_PAIRS = 1 << 15


def log_likelihood(model: Callable, guide, data: Mapping[str, torch.Tensor], num_samples: int = 500) -> torch.Tensor:
    """Importance-weighted estimates of ``log p(x_b)`` ``(N,)``, one per data point.

    ``log (1/K) sum_k p(x_b, z_k) / q(z_k | x_b)`` with ``K = num_samples`` draws of the guide
    (Burda et al. 2016; SIReN-VAE's test log-likelihood uses ``K = 500``): a lower bound in
    expectation that tightens as ``K`` grows. ``model`` gives ``p`` (usually ``guide.model``:
    the model as trained, parameters in Pyro's parameter store).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    points = point_data(guide, data)
    simulator = point_simulator(guide, model)
    chunk = max(1, MAX_PAIRS // num_samples)
    out = []
    with torch.no_grad(), torch_threads():
        for start in range(0, points.num, chunk):
            batch = points.select(torch.arange(start, min(start + chunk, points.num)))
            out.append(iwae(log_weights(guide, simulator, batch.values, num_samples)))
    return torch.cat(out)


def nll(model: Callable, guide, data: Mapping[str, torch.Tensor], num_samples: int = 500) -> float:
    """The test negative log-likelihood in nats per data point: ``-mean_b log p(x_b)`` from
    :func:`log_likelihood` (``num_samples`` importance samples per point)."""
    return float(-log_likelihood(model, guide, data, num_samples).mean())


def reconstructions(model: Callable, guide, data: Mapping[str, torch.Tensor], num_samples: int = 100) -> dict[str, torch.Tensor]:
    """Each data point's reconstruction: the mean of every observed site under the model with the
    latents at their posterior mean (estimated from ``num_samples`` guide draws).

    Returns:
        observed site -> ``(N, *point_shape)``, like the data points of :func:`~pyro_struct.likelihood.point_data`.
    """
    points = point_data(guide, data)
    fn = point_model(model, guide)
    with torch.no_grad(), torch_threads():
        means = guide.posterior(points.values, num_moment_samples=num_samples).mean
        out = {name: [] for name in guide.observed_sites}
        # one run per data point: the model's own broadcasting is not assumed
        for b in range(points.num):
            with poutine.block():
                tr = poutine.trace(poutine.condition(fn, data={k: v[b] for k, v in means.items()})).get_trace(
                    *guide.model_args, **guide.model_kwargs)
            for name in out:
                out[name].append(tr.nodes[name]["fn"].mean.expand(points.values[name].shape[1:]))
    return {name: torch.stack(v) for name, v in out.items()}


def reconstruction_error(model: Callable, guide, data: Mapping[str, torch.Tensor], num_samples: int = 100) -> float:
    """Mean over data points of the squared error summed over observed coordinates,
    ``mean_b ||x_b - x_hat_b||^2``, with ``x_hat`` from :func:`reconstructions`."""
    points = point_data(guide, data)
    rec = reconstructions(model, guide, data, num_samples)
    err = sum((points.values[k] - rec[k]).pow(2).reshape(points.num, -1).sum(1) for k in rec)
    return float(err.mean())
