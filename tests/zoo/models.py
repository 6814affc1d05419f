"""The zoo's models, written the way Pyro users write them, each with one fixed observed data set.

Synthetic data sets are drawn once from stated true values with a seeded generator (the NUTS
references in ``references.json`` store the observations too, and ``tests/test_zoo.py`` checks that
these functions still produce them); eight schools and baseball use their classic data.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from .registry import ZooModel

__all__ = ["MODELS", "get"]


# ------------------------------------------------------------------ eight schools (Rubin 1981)
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        return pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _centered_from_noncentered(s):
    return {"mu": s["mu"], "tau": s["tau"], "theta": s["mu"][:, None] + s["tau"][:, None] * s["eta"]}


# ------------------------------------------------------------------ Neal's funnel with observed children
def funnel(y=None):
    """Neal's funnel ``v ~ N(0, 3)``, ``z_k ~ N(0, exp(v / 2))``, each ``z_k`` seen through ``y_k ~ N(z_k, 1)``."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("k", 4):
        z = pyro.sample("z", dist.Normal(0.0, torch.exp(v / 2)))
        return pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def funnel_noncentered(y=None):
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("k", 4):
        z_raw = pyro.sample("z_raw", dist.Normal(0.0, 1.0))
        return pyro.sample("y", dist.Normal(torch.exp(v / 2) * z_raw, 1.0), obs=y)


def _funnel_from_noncentered(s):
    return {"v": s["v"], "z": torch.exp(s["v"][:, None] / 2) * s["z_raw"]}


# ------------------------------------------------------------------ regressions
def linear_regression(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w + b, sigma), obs=y)


def logistic_regression(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 2.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def hierarchical_regression(group, x, num_groups, y=None):
    """Varying intercepts (radon-style): ``y_i ~ N(a[group_i] + b x_i, sigma_y)``, ``a_j ~ N(mu_a, sigma_a)``."""
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
    with pyro.plate("groups", num_groups):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    with pyro.plate("data", len(x)):
        return pyro.sample("y", dist.Normal(a[group] + b * x, sigma_y), obs=y)


# ------------------------------------------------------------------ time series with a Python loop
def ar1(T=25, y=None):
    """A latent AR(1) state ``x_t ~ N(rho x_{t-1}, sigma)`` seen through ``y_t ~ N(x_t, 0.5)``."""
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    x = 0.0
    for t in pyro.markov(range(T)):
        x = pyro.sample(f"x_{t}", dist.Normal(rho * x, sigma))
        pyro.sample(f"y_{t}", dist.Normal(x, 0.5), obs=None if y is None else y[t])


def stochastic_volatility(T=20, y=None):
    """Log-volatility ``h_t ~ N(mu + phi (h_{t-1} - mu), sigma)`` (stationary start), returns ``y_t ~ N(0, exp(h_t / 2))``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    h = None
    for t in pyro.markov(range(T)):
        if h is None:
            h = pyro.sample(f"h_{t}", dist.Normal(mu, sigma / torch.sqrt(1 - phi**2)))
        else:
            h = pyro.sample(f"h_{t}", dist.Normal(mu + phi * (h - mu), sigma))
        pyro.sample(f"y_{t}", dist.Normal(0.0, torch.exp(h / 2)), obs=None if y is None else y[t])


# NUTS samples the loops as one vectorised, non-centred site each: the same posterior, with two
# sites instead of 2T (Pyro's NUTS pays per site per leapfrog step)
def ar1_vectorised(T=25, y=None):
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    eps = pyro.sample("eps", dist.Normal(0.0, 1.0).expand([T]).to_event(1))
    pyro.sample("y", dist.Normal(_ar1_states(rho, sigma, eps), 0.5).to_event(1), obs=y)


def _ar1_states(rho, sigma, eps):
    x, xs = torch.zeros_like(rho), []
    for t in range(eps.shape[-1]):
        x = rho * x + sigma * eps[..., t]
        xs.append(x)
    return torch.stack(xs, -1)


def _ar1_from_vectorised(s):
    x = _ar1_states(s["rho"][:, None], s["sigma"][:, None], s["eps"][:, None, :])[:, 0]
    return {"rho": s["rho"], "sigma": s["sigma"], **{f"x_{t}": x[:, t] for t in range(x.shape[-1])}}


def stochastic_volatility_vectorised(T=20, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    eps = pyro.sample("eps", dist.Normal(0.0, 1.0).expand([T]).to_event(1))
    pyro.sample("y", dist.Normal(0.0, torch.exp(_sv_states(mu, phi, sigma, eps) / 2)).to_event(1), obs=y)


def _sv_states(mu, phi, sigma, eps):
    h, hs = mu + sigma / torch.sqrt(1 - phi**2) * eps[..., 0], []
    hs.append(h)
    for t in range(1, eps.shape[-1]):
        h = mu + phi * (h - mu) + sigma * eps[..., t]
        hs.append(h)
    return torch.stack(hs, -1)


def _sv_from_vectorised(s):
    h = _sv_states(s["mu"][:, None], s["phi"][:, None], s["sigma"][:, None], s["eps"][:, None, :])[:, 0]
    return {"mu": s["mu"], "phi": s["phi"], "sigma": s["sigma"], **{f"h_{t}": h[:, t] for t in range(h.shape[-1])}}


def _stacked(prefix: str):
    def data(observations):
        return {prefix: torch.stack([observations[f"{prefix}_{t}"] for t in range(len(observations))])}

    return data


# ------------------------------------------------------------------ constrained latents
def dirichlet_beta(successes=None, counts=None):
    """A success rate ``p ~ Beta(2, 2)`` behind 20 trials and category shares ``pi ~ Dirichlet(1, 1, 1)`` behind 30 draws."""
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    pi = pyro.sample("pi", dist.Dirichlet(torch.ones(3)))
    pyro.sample("successes", dist.Binomial(20, probs=p), obs=successes)
    pyro.sample("counts", dist.Multinomial(30, probs=pi), obs=counts)


def lkj_covariance(N=30, d=3, y=None):
    """Pyro's ``examples/lkj.py``: variances ``theta ~ HalfCauchy(1)``, correlations ``L_omega ~ LKJCholesky(d, 2)``."""
    theta = pyro.sample("theta", dist.HalfCauchy(torch.ones(d)).to_event(1))
    L_omega = pyro.sample("L_omega", dist.LKJCholesky(d, torch.tensor(2.0)))
    L_Omega = torch.mm(torch.diag(theta.sqrt()), L_omega)
    with pyro.plate("observations", N):
        return pyro.sample("obs", dist.MultivariateNormal(torch.zeros(d), scale_tril=L_Omega), obs=y)


def gaussian_mixture(N=30, y=None):
    """Two Gaussian components, the assignments marginalised by ``MixtureSameFamily`` (distinct priors: no label switching)."""
    w = pyro.sample("w", dist.Beta(2.0, 2.0))
    loc0 = pyro.sample("loc0", dist.Normal(-2.0, 1.0))
    loc1 = pyro.sample("loc1", dist.Normal(2.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    mix = dist.Categorical(probs=torch.stack([w, 1 - w], -1))
    components = dist.Normal(torch.stack([loc0, loc1], -1), scale)
    with pyro.plate("data", N):
        return pyro.sample("y", dist.MixtureSameFamily(mix, components), obs=y)


# ------------------------------------------------------------------ Pyro's examples/baseball.py
# Efron & Morris (1975): hits in the first 45 at-bats of the 1970 season, 18 players
BASEBALL_HITS = torch.tensor([18.0, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7])
BASEBALL_AT_BATS = torch.full((18,), 45.0)


def baseball(at_bats, hits=None):
    """``partially_pooled_with_logit`` of Pyro's baseball example: player logits ``alpha ~ N(loc, scale)``."""
    num_players = at_bats.shape[0]
    loc = pyro.sample("loc", dist.Normal(-1.0, 1.0))
    scale = pyro.sample("scale", dist.HalfCauchy(1.0))
    with pyro.plate("num_players", num_players):
        alpha = pyro.sample("alpha", dist.Normal(loc, scale))
        return pyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def baseball_noncentered(at_bats, hits=None):
    loc = pyro.sample("loc", dist.Normal(-1.0, 1.0))
    scale = pyro.sample("scale", dist.HalfCauchy(1.0))
    with pyro.plate("num_players", at_bats.shape[0]):
        alpha_raw = pyro.sample("alpha_raw", dist.Normal(0.0, 1.0))
        return pyro.sample("obs", dist.Binomial(at_bats, logits=loc + scale * alpha_raw), obs=hits)


def _baseball_from_noncentered(s):
    return {"loc": s["loc"], "scale": s["scale"], "alpha": s["loc"][:, None] + s["scale"][:, None] * s["alpha_raw"]}


# ------------------------------------------------------------------ the fixed data sets
def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _regression_data():
    g = _rng(1)
    X = torch.randn(20, 3, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.25]) + 0.5 + 0.5 * torch.randn(20, generator=g)
    return X, y


def _logistic_data():
    g = _rng(2)
    X = torch.randn(40, 2, generator=g)
    p = torch.sigmoid(X @ torch.tensor([1.5, -1.0]) - 0.5)
    return X, torch.bernoulli(p, generator=g)


def _hierarchical_data():
    g = _rng(3)
    group = torch.arange(5).repeat_interleave(4)
    x = torch.randn(20, generator=g)
    a = 1.0 + 0.8 * torch.randn(5, generator=g)
    return group, x, a[group] + 0.7 * x + 0.5 * torch.randn(20, generator=g)


def _funnel_data():
    g = _rng(4)  # v = 1: z ~ N(0, e^0.5)
    z = math.exp(0.5) * torch.randn(4, generator=g)
    return z + torch.randn(4, generator=g)


def _ar1_data(T=25):
    g = _rng(5)
    x, ys = 0.0, []
    for _ in range(T):
        x = 0.7 * x + 0.6 * float(torch.randn((), generator=g))
        ys.append(x + 0.5 * float(torch.randn((), generator=g)))
    return torch.tensor(ys)


def _sv_data(T=20):
    g = _rng(6)
    mu, phi, sigma = -0.5, 0.8, 0.4
    h = mu + sigma / math.sqrt(1 - phi**2) * float(torch.randn((), generator=g))
    ys = []
    for t in range(T):
        if t:
            h = mu + phi * (h - mu) + sigma * float(torch.randn((), generator=g))
        ys.append(math.exp(h / 2) * float(torch.randn((), generator=g)))
    return torch.tensor(ys)


def _lkj_data(N=30):
    g = _rng(7)
    corr = torch.tensor([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    sd = torch.tensor([1.0, 2.0, 0.5])
    L = torch.linalg.cholesky(corr * sd[:, None] * sd[None, :])
    return torch.randn(N, 3, generator=g) @ L.T


def _mixture_data(N=30):
    g = _rng(8)
    first = torch.rand(N, generator=g) < 0.4
    loc = torch.where(first, torch.tensor(-1.5), torch.tensor(2.0))
    return loc + 0.8 * torch.randn(N, generator=g)


def _build() -> dict[str, ZooModel]:
    X, y = _regression_data()
    Xl, yl = _logistic_data()
    group, xh, yh = _hierarchical_data()
    ar, sv = _ar1_data(), _sv_data()
    schools = dict(args=(SCHOOLS_SIGMA,), observations={"y": SCHOOLS_Y},
                   nuts_model=eight_schools_noncentered, to_latents=_centered_from_noncentered)
    entries = [
        ZooModel("eight_schools_centered", "eight schools, centred (theta ~ N(mu, tau), tau ~ HalfCauchy(5))",
                 eight_schools_centered, latents=("mu", "tau", "theta"), **schools),
        ZooModel("eight_schools_noncentered", "eight schools, non-centred (theta = mu + tau eta)",
                 eight_schools_noncentered, latents=("mu", "tau", "eta"), args=(SCHOOLS_SIGMA,),
                 observations={"y": SCHOOLS_Y}),
        ZooModel("funnel", "Neal's funnel (v, 4 z's) with an observed child of each z", funnel,
                 observations={"y": _funnel_data()}, latents=("v", "z"),
                 nuts_model=funnel_noncentered, to_latents=_funnel_from_noncentered),
        ZooModel("linear_regression", "linear regression, 20 rows x 3 features, unknown noise", linear_regression,
                 args=(X,), observations={"y": y}, latents=("w", "b", "sigma")),
        ZooModel("logistic_regression", "logistic regression, 40 rows x 2 features", logistic_regression,
                 args=(Xl,), observations={"y": yl}, latents=("w", "b")),
        ZooModel("hierarchical_regression", "varying-intercept regression, 5 groups x 4 rows (group plates)",
                 hierarchical_regression, args=(group, xh, 5), observations={"y": yh},
                 latents=("mu_a", "sigma_a", "b", "sigma_y", "a")),
        ZooModel("ar1", "latent AR(1) state, T = 25, pyro.markov loop, noisy observations", ar1,
                 kwargs={"T": 25}, observations={f"y_{t}": ar[t] for t in range(25)},
                 latents=("rho", "sigma") + tuple(f"x_{t}" for t in range(25)),
                 nuts_model=ar1_vectorised, to_latents=_ar1_from_vectorised, nuts_data=_stacked("y")),
        ZooModel("stochastic_volatility", "stochastic volatility, T = 20, pyro.markov loop", stochastic_volatility,
                 kwargs={"T": 20}, observations={f"y_{t}": sv[t] for t in range(20)},
                 latents=("mu", "phi", "sigma") + tuple(f"h_{t}" for t in range(20)),
                 nuts_model=stochastic_volatility_vectorised, to_latents=_sv_from_vectorised, nuts_data=_stacked("y")),
        ZooModel("dirichlet_beta", "Beta-binomial rate and Dirichlet-multinomial shares", dirichlet_beta,
                 observations={"successes": torch.tensor(13.0), "counts": torch.tensor([6.0, 15.0, 9.0])},
                 latents=("p", "pi")),
        ZooModel("lkj_covariance", "Pyro's examples/lkj.py: 3-d Gaussian, HalfCauchy variances, LKJCholesky(3, 2)",
                 lkj_covariance, kwargs={"N": 30, "d": 3}, observations={"obs": _lkj_data()},
                 latents=("theta", "L_omega")),
        ZooModel("gaussian_mixture", "two-component Gaussian mixture, assignments marginalised (MixtureSameFamily)",
                 gaussian_mixture, kwargs={"N": 30}, observations={"y": _mixture_data()},
                 latents=("w", "loc0", "loc1", "scale")),
        ZooModel("baseball", "Pyro's examples/baseball.py partially_pooled_with_logit, Efron-Morris data",
                 baseball, args=(BASEBALL_AT_BATS,), observations={"obs": BASEBALL_HITS},
                 latents=("loc", "scale", "alpha"), nuts_model=baseball_noncentered,
                 to_latents=_baseball_from_noncentered),
    ]
    return {m.name: m for m in entries}


MODELS: dict[str, ZooModel] = _build()


def get(name: str) -> ZooModel:
    """The zoo model called ``name`` (a clear error listing the names otherwise)."""
    if name not in MODELS:
        raise KeyError(f"no zoo model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]
