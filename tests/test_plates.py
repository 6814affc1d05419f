"""Plate templates: the inverse of one member, expanded, equals the inverse of the expanded network."""

import random

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct import faithful_inverse, trace_model
from pyro_struct.plates import PlateCouplingError, expand_plate_inverse, member_index, plate_inverse


def random_plated_model(seed: int, broadcast: bool = False):
    """Globals, then a data plate with local latents and observations; random sparse dependencies.
    ``broadcast``: the means broadcast against the plate instead of being built with ``N`` members."""
    rng = random.Random(seed)
    n_glob, n_loc, n_obs = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
    gpar = [[p for p in range(k) if rng.random() < 0.5] for k in range(n_glob)]
    lpar = [([p for p in range(n_glob) if rng.random() < 0.6], [p for p in range(j) if rng.random() < 0.5]) for j in range(n_loc)]
    opar = [([p for p in range(n_glob) if rng.random() < 0.3], sorted({rng.randrange(n_loc)} | {p for p in range(n_loc) if rng.random() < 0.4}))
            for _ in range(n_obs)]

    def model(N=3):
        g = []
        for k in range(n_glob):
            g.append(pyro.sample(f"g{k}", dist.Normal(sum((g[p] for p in gpar[k]), torch.tensor(0.0)), 1.0)))
        with pyro.plate("data", N):
            loc = []
            zero = torch.tensor(0.0) if broadcast else torch.zeros(N)
            for j, (gp, lp) in enumerate(lpar):
                mean = sum((g[p] for p in gp), zero) + sum((0.5 * loc[p] for p in lp), zero)
                loc.append(pyro.sample(f"l{j}", dist.Normal(mean, 1.0)))
            for m, (gp, lp) in enumerate(opar):
                mean = sum((g[p] for p in gp), zero) + sum((loc[p] for p in lp), zero)
                pyro.sample(f"x{m}", dist.Normal(mean, 1.0), obs=torch.zeros(N))

    return model, [f"x{m}" for m in range(n_obs)]


def parents(inv):
    return {v: sorted(inv.parents(v)) for v in inv.order}


def test_template_inverse_expands_to_the_inverse_of_the_expanded_network():
    compared = 0
    for seed in range(30):
        model, observed = random_plated_model(seed)
        try:
            template = plate_inverse(faithful_inverse(trace_model(model, 2, observed=observed)), "data")
        except PlateCouplingError:
            continue
        compared += 1
        for n in (3, 5):
            direct = parents(faithful_inverse(trace_model(model, n, observed=observed)))
            expanded = {v: sorted(p) for v, p in expand_plate_inverse(template, n).items()}
            assert expanded == direct, (seed, n)
    # the property is checked on most random plated networks, not vacuously
    assert compared >= 20


def test_hierarchical_template_is_the_amortised_factorisation():
    def model(N=4):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(mu, tau))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.zeros(N))

    inv = faithful_inverse(trace_model(model))
    template = plate_inverse(inv, "data")
    # q(mu, tau | x_1..N) prod_i q(z_i | mu, tau, x_i)
    assert template.member_parents == {"z[0]": (["mu", "tau"], ["x[0]"])}
    assert set(template.global_order) == {"mu", "tau"}
    assert all(pooled == ["x[0]"] for _, pooled in template.global_parents.values())
    assert member_index(inv.bn, "z[3]", "data") == 3 and member_index(inv.bn, "mu", "data") is None


def test_coupled_members_are_refused():
    def model(N=3):
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Normal(torch.zeros(N), 1.0))
        # an observation of the sum couples every member
        pyro.sample("s", dist.Normal(z.sum(-1), 1.0), obs=torch.tensor(0.0))

    with pytest.raises(PlateCouplingError, match="couples members|differently|after member"):
        plate_inverse(faithful_inverse(trace_model(model, observed=["s"])), "data")
    with pytest.raises(ValueError, match="no site of the model is in a plate named 'nope'"):
        plate_inverse(faithful_inverse(trace_model(model, observed=["s"])), "nope")
