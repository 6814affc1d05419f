"""Linear-Gaussian Bayesian networks (bnlearn JSON format) with closed-form posteriors.

Each node is ``v = intercept + sum(coef * parent) + sd * eps`` with ``eps ~ N(0, 1)``. With
the leaves observed and every other node latent, the posterior is Gaussian and known
exactly, so KL divergences to it can be computed exactly.

Example:
    >>> net = LinearGaussianNetwork.random(6, seed=0)
    >>> obs = net.sample_observations(2)          # dict site -> (2,)
    >>> mean, cov = net.exact_posterior(obs)      # (2, d), (d, d)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import networkx as nx
import pyro
import pyro.distributions as dist
import torch

__all__ = ["LinearGaussianNetwork", "gaussian_kl", "data_dir"]


def data_dir() -> Path:
    """The reference data shipped with the package (``bnlearn/ecoli70.json``, ``bnlearn/magic-niab.json``);
    ``$PYRO_STRUCT_DATA`` points elsewhere."""
    env = os.environ.get("PYRO_STRUCT_DATA")
    return Path(env) if env else Path(__file__).resolve().parent / "data"


def _site_names(names: list[str]) -> dict[str, str]:
    """Valid, distinct Pyro site names for arbitrary node names."""
    out, used = {}, set()
    for n in names:
        s = re.sub(r"\W", "_", str(n))
        if not s or s[0].isdigit():
            s = "v_" + s
        base, k = s, 1
        while s in used:
            s, k = f"{base}_{k}", k + 1
        used.add(s)
        out[n] = s
    return out


def gaussian_kl(mean_p: torch.Tensor, cov_p: torch.Tensor, mean_q: torch.Tensor, cov_q: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean_p, cov_p) || N(mean_q, cov_q))`` in nats.

    Args:
        mean_p, mean_q: ``(*batch, d)``.
        cov_p, cov_q: ``(*batch, d, d)`` (broadcast).

    Returns:
        ``(*batch,)``.
    """
    d = mean_p.shape[-1]
    Lq = torch.linalg.cholesky(cov_q)
    Lp = torch.linalg.cholesky(cov_p)
    diff = (mean_q - mean_p).unsqueeze(-1)
    Lq, Lp = torch.broadcast_tensors(Lq, Lp)
    M = torch.linalg.solve_triangular(Lq, Lp, upper=False)
    trace = (M * M).sum((-1, -2))
    y = torch.linalg.solve_triangular(Lq.expand(diff.shape[:-2] + Lq.shape[-2:]), diff, upper=False)
    maha = (y * y).sum((-1, -2))
    logdet = 2 * (torch.log(torch.diagonal(Lq, dim1=-2, dim2=-1)).sum(-1) - torch.log(torch.diagonal(Lp, dim1=-2, dim2=-1)).sum(-1))
    return 0.5 * (trace + maha - d + logdet)


class LinearGaussianNetwork:
    """A linear-Gaussian Bayesian network whose leaves are observed.

    Args:
        nodes: node names.
        parents: ``node -> {parent: coefficient}``.
        intercept: ``node -> intercept``.
        variance: ``node -> noise variance``.
        observed: observed nodes (default: the leaves).

    Attributes:
        site_names: ``node -> Pyro site name`` (valid and distinct).
        order: nodes in topological order (file order breaking ties).
        latent_sites, observed_sites: Pyro site names of latent / observed nodes in ``order``.
        model: the Pyro model ``model(**observations)`` (keyword = observed site name).
    """

    def __init__(self, nodes, parents, intercept, variance, observed=None):
        self.nodes = list(nodes)
        self.parents = {n: dict(parents.get(n, {})) for n in self.nodes}
        self.intercept = {n: float(intercept.get(n, 0.0)) for n in self.nodes}
        self.variance = {n: float(variance[n]) for n in self.nodes}
        for n, v in self.variance.items():
            if not v > 0:
                raise ValueError(f"node {n!r} has a non-positive noise variance {v}")
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for n, ps in self.parents.items():
            for p in ps:
                if p not in g:
                    raise ValueError(f"node {n!r} has unknown parent {p!r}")
                g.add_edge(p, n)
        if not nx.is_directed_acyclic_graph(g):
            raise ValueError("the network has a cycle")
        position = {n: i for i, n in enumerate(self.nodes)}
        self.graph = g
        self.order = list(nx.lexicographical_topological_sort(g, key=position.__getitem__))
        if observed is None:
            observed = [n for n in self.order if g.out_degree(n) == 0]
        self.observed = [n for n in self.order if n in set(observed)]
        self.latent = [n for n in self.order if n not in set(observed)]
        if not self.latent:
            raise ValueError("the network has no latent node")
        self.site_names = _site_names(self.order)
        self.latent_sites = [self.site_names[n] for n in self.latent]
        self.observed_sites = [self.site_names[n] for n in self.observed]
        self._build_joint()
        self.model = self._make_model()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_json(cls, path, observed=None) -> "LinearGaussianNetwork":
        """Read a network in the bnlearn/pgmpy JSON format (``nodes``, ``arcs``, ``cpds``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a network from {path}: {e}") from e
        return cls.from_dict(data, observed=observed)

    @classmethod
    def from_dict(cls, data: Mapping, observed=None) -> "LinearGaussianNetwork":
        """Build from the parsed JSON structure."""
        try:
            nodes = list(data["nodes"])
            cpds = data["cpds"]
            parents, intercept, variance = {}, {}, {}
            for n in nodes:
                cpd = cpds[n]
                coef = cpd["coefficients"]
                intercept[n] = float(_scalar(coef.get("(Intercept)", 0.0)))
                parents[n] = {p: float(_scalar(coef[p])) for p in cpd.get("parents", [k for k in coef if k != "(Intercept)"])}
                variance[n] = float(_scalar(cpd["variance"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed network description: missing {e}") from e
        return cls(nodes, parents, intercept, variance, observed=observed)

    @classmethod
    def from_name(cls, name: str) -> "LinearGaussianNetwork":
        """A bnlearn network shipped with the package (``data_dir() / "bnlearn"``) by file stem, e.g. ``"ecoli70"``."""
        return cls.from_json(data_dir() / "bnlearn" / f"{name}.json")

    @classmethod
    def random(cls, num_nodes: int, edge_prob: float = 0.4, seed: int = 0, max_parents: int = 3) -> "LinearGaussianNetwork":
        """A random network over ``num_nodes`` nodes with at least one latent and one leaf."""
        g = torch.Generator().manual_seed(seed)
        nodes = [f"v{i}" for i in range(num_nodes)]
        parents, intercept, variance = {}, {}, {}
        for i, n in enumerate(nodes):
            cand = [j for j in range(i) if torch.rand((), generator=g) < edge_prob][-max_parents:]
            if i > 0 and not cand:
                cand = [int(torch.randint(0, i, (), generator=g))]
            sign = lambda: 1.0 if torch.rand((), generator=g) < 0.5 else -1.0  # noqa: E731
            parents[n] = {nodes[j]: sign() * float(0.5 + torch.rand((), generator=g)) for j in cand}
            intercept[n] = float(torch.randn((), generator=g))
            variance[n] = float(0.2 + 0.8 * torch.rand((), generator=g)) ** 2
        return cls(nodes, parents, intercept, variance)

    # --------------------------------------------------------------- joint Gaussian
    def _build_joint(self):
        idx = {n: i for i, n in enumerate(self.order)}
        D = len(self.order)
        B = torch.zeros(D, D, dtype=torch.float64)
        c = torch.zeros(D, dtype=torch.float64)
        s = torch.zeros(D, dtype=torch.float64)
        for n in self.order:
            c[idx[n]] = self.intercept[n]
            s[idx[n]] = math.sqrt(self.variance[n])
            for p, w in self.parents[n].items():
                B[idx[n], idx[p]] = w
        L = torch.linalg.inv(torch.eye(D, dtype=torch.float64) - B)  # v = L (c + s * eps)
        self.joint_mean = L @ c
        self.joint_cov = (L * s**2) @ L.T
        lat = [idx[n] for n in self.latent]
        obs = [idx[n] for n in self.observed]
        S_zz = self.joint_cov[lat][:, lat]
        S_zx = self.joint_cov[lat][:, obs]
        S_xx = self.joint_cov[obs][:, obs]
        self._gain = torch.linalg.solve(S_xx, S_zx.T).T  # (d_z, d_x)
        self._mu_z = self.joint_mean[lat]
        self._mu_x = self.joint_mean[obs]
        cov = S_zz - self._gain @ S_zx.T
        self.posterior_cov = 0.5 * (cov + cov.T)

    # -------------------------------------------------------------------- the model
    def _make_model(self):
        order = self.order
        names = self.site_names
        parents = self.parents
        intercept = self.intercept
        scale = {n: math.sqrt(self.variance[n]) for n in order}
        observed_sites = set(self.observed_sites)

        def model(**observations):
            unknown = set(observations) - observed_sites
            if unknown:
                raise ValueError(
                    f"unknown observed site(s) {sorted(unknown)}; this network observes {sorted(observed_sites)}"
                )
            values = {}
            for n in order:
                mean = torch.tensor(intercept[n])
                for p, w in parents[n].items():
                    mean = mean + w * values[p]
                site = names[n]
                obs = observations.get(site) if site in observed_sites else None
                if obs is not None and not isinstance(obs, torch.Tensor):
                    obs = torch.as_tensor(obs, dtype=torch.get_default_dtype())
                values[n] = pyro.sample(site, dist.Normal(mean, scale[n]), obs=obs)
            return values

        model.__name__ = "linear_gaussian_network"
        model.observed_sites = list(self.observed_sites)
        return model

    # ------------------------------------------------------------------ utilities
    def sample_joint(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Ancestral samples of every node: ``site -> (n,)`` in the default dtype."""
        values = {}
        for v in self.order:
            mean = torch.full((n,), self.intercept[v], dtype=torch.float64)
            for p, w in self.parents[v].items():
                mean = mean + w * values[p]
            values[v] = mean + math.sqrt(self.variance[v]) * torch.randn(n, generator=generator, dtype=torch.float64)
        dtype = torch.get_default_dtype()
        return {self.site_names[v]: x.to(dtype) for v, x in values.items()}

    def sample_observations(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``n`` simulated observations: ``observed site -> (n,)``."""
        joint = self.sample_joint(n, generator)
        return {s: joint[s] for s in self.observed_sites}

    def _stack_observed(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [s for s in self.observed_sites if s not in obs]
        if missing:
            raise ValueError(f"missing observed site(s) {missing}")
        cols = [torch.as_tensor(obs[s], dtype=torch.float64) for s in self.observed_sites]
        return torch.stack(torch.broadcast_tensors(*cols), -1)

    def exact_posterior(self, obs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ``p(z | x)`` over :attr:`latent_sites` (float64).

        Args:
            obs: observed site -> value of shape ``(*batch,)``.

        Returns:
            mean ``(*batch, d)`` and covariance ``(d, d)`` (the same for every observation).
        """
        x = self._stack_observed(obs)
        mean = self._mu_z + (x - self._mu_x) @ self._gain.T
        return mean, self.posterior_cov

    def posterior_log_prob(self, obs: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(z | x)``; ``z`` is ``(n, *batch, d)`` in :attr:`latent_sites` order -> ``(n, *batch)``."""
        mean, cov = self.exact_posterior(obs)
        return dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(z.to(torch.float64))

    def sample_posterior(self, obs: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """``n`` exact posterior samples ``(n, *batch, d)`` (float64)."""
        mean, cov = self.exact_posterior(obs)
        return dist.MultivariateNormal(mean, covariance_matrix=cov).sample((n,))

    def kl_to_posterior(self, obs: Mapping[str, torch.Tensor], mean_q: torch.Tensor, cov_q: torch.Tensor) -> torch.Tensor:
        """Exact ``KL(p(z|x) || N(mean_q, cov_q))`` for a Gaussian approximation; ``(*batch,)``."""
        mean, cov = self.exact_posterior(obs)
        return gaussian_kl(mean, cov, mean_q.to(torch.float64), cov_q.to(torch.float64))

    def forward_kl(self, obs: Mapping[str, torch.Tensor], log_q, num_samples: int = 2000) -> torch.Tensor:
        """Exact-sample estimate of ``KL(p(z|x) || q(z|x))`` per observation ``(*batch,)``.

        Args:
            obs: observed site -> ``(*batch,)``.
            log_q: ``z (n, *batch, d) -> log q(z | x) (n, *batch)``, ``z`` in :attr:`latent_sites` order.
            num_samples: exact posterior samples per observation.
        """
        z = self.sample_posterior(obs, num_samples)
        with torch.no_grad():
            lq = log_q(z)
        return (self.posterior_log_prob(obs, z) - lq.double()).mean(0)

    def reverse_kl(self, obs: Mapping[str, torch.Tensor], sample_q, num_samples: int = 2000) -> torch.Tensor:
        """Estimate of ``KL(q(z|x) || p(z|x))`` per observation ``(*batch,)`` from ``sample_q(n) ->
        (z (n, *batch, d), log q (n, *batch))``, with the exact ``log p(z | x)``."""
        with torch.no_grad():
            z, lq = sample_q(num_samples)
        return (lq.double() - self.posterior_log_prob(obs, z.double())).mean(0)

    def posterior_kl(self, posterior, obs: Mapping[str, torch.Tensor], num_samples: int = 2000) -> torch.Tensor:
        """:meth:`forward_kl` of a posterior object with ``log_prob(site -> (n, *batch))`` (e.g. a
        ``pyro_struct.Posterior`` of these observations); ``(*batch,)``."""
        dtype = torch.get_default_dtype()
        return self.forward_kl(obs, lambda z: posterior.log_prob({s: z[..., i].to(dtype) for i, s in enumerate(self.latent_sites)}), num_samples)

    def stack_latents(self, samples: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Stack a dict of latent site samples ``site -> (n, *batch)`` into ``(n, *batch, d)``."""
        return torch.stack([samples[s] for s in self.latent_sites], -1)

    def __repr__(self):
        return (
            f"LinearGaussianNetwork({len(self.order)} nodes, {self.graph.number_of_edges()} arcs, "
            f"{len(self.latent)} latent, {len(self.observed)} observed)"
        )


def _scalar(v):
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise TypeError(f"expected a one-element list, got {v}")
        return v[0]
    return v
