"""Plate templates traced with a few members: the same inverse as tracing every member, and every shortcut that cannot apply is detected."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_struct import StructuredGuide, faithful_inverse, trace_model
from pyro_struct.errors import ModelStructureError
from pyro_struct.plates import PlateCouplingError, expand_plate_inverse, plate_inverse
from pyro_struct.trace.template import TEMPLATE_MEMBERS, trace_plate_template

from .test_plates import parents, random_plated_model


def test_the_small_template_expands_to_the_inverse_of_every_member():
    n, compared = 12, 0
    for seed in range(30):
        model, observed = random_plated_model(seed, broadcast=True)
        small, why = trace_plate_template(model, (), {"N": n}, observed=observed)
        assert why is None and small.size == n and small.members == TEMPLATE_MEMBERS, (seed, why)
        assert small.bn.sites["x0"].shape == (TEMPLATE_MEMBERS,) and small.shapes["x0"] == (n,)
        full = faithful_inverse(trace_model(model, n, observed=observed))
        try:
            template = plate_inverse(faithful_inverse(small.bn), "data")
        except PlateCouplingError:
            # (the min-fill order can differ with the size; compile_model then traces every member)
            continue
        compared += 1
        expanded = {v: sorted(p) for v, p in expand_plate_inverse(template, n).items()}
        assert expanded == parents(full), seed
    assert compared >= 15


def hierarchical(N=50, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu, 0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_a_plate_guide_of_a_large_plate_is_compiled_from_the_template():
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 5000}, hidden_sizes=(8,))
    assert "shrunk to 4 of its 5000 members" in guide.plate_trace_note
    assert len(guide.bn) == 1 + 2 * TEMPLATE_MEMBERS and guide.site_shapes["z"] == (5000,)
    assert guide.plate_layout.traced_size == 5000
    sims = guide.simulator().simulate(3)
    assert sims["z"].shape == (3, 5000)
    post = guide.posterior(x=torch.zeros(5000))
    assert post.sample(2)["z"].shape == (2, 5000)


def lagged(N=100):
    """Member 50 also depends on member 49: invisible with four members, a coupling at full size."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        w = torch.zeros(z.shape[-1])
        if w.shape[0] > 50:
            w[50] = 1.0
        pyro.sample("x", dist.Normal(z + w * z.roll(1, -1), 1.0))


def one_member_differs(N=100):
    """Member 50's observation also depends on the second coordinate of its latent."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu, 1.0).expand([2]).to_event(1))
        w = torch.zeros(z.shape[-2])
        if w.shape[0] > 50:
            w[50] = 1.0
        pyro.sample("x", dist.Normal(z[..., 0] + w * z[..., 1], 1.0))


def full_size_data(x=torch.zeros(100)):
    """The usual idiom: the data argument sets the plate's size and is observed."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def full_size_tensor(N=100):
    """A tensor of the plate's full size built by the model itself: it cannot run with fewer members."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Normal(mu + torch.zeros(N), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0))


def test_members_unlike_the_template_are_detected_at_full_size():
    small, why = trace_plate_template(lagged, (), {}, observed=["x"])
    assert small is None and "couples members" in why
    small, why = trace_plate_template(one_member_differs, (), {}, observed=["x"])
    assert small is None and "template lacks" in why


def test_a_coupled_plate_still_falls_back_to_the_per_coordinate_guide():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide = StructuredGuide(lagged, observed=["x"], plates="auto", hidden_sizes=(8,))
    assert guide.plate_layout is None and "data" in guide.plate_note
    assert any("data" in str(w.message) for w in caught)


def test_a_model_that_cannot_shrink_is_traced_in_full():
    small, why = trace_plate_template(full_size_tensor, (), {}, observed=["x"])
    assert small is None and "cannot run with plate 'data' shrunk" in why
    guide = StructuredGuide(full_size_tensor, observed=["x"], plates="auto", hidden_sizes=(8,))
    assert guide.plate_layout is not None and guide.plate_trace_note.startswith("traced every member")
    assert len(guide.bn) == 201


def test_observations_of_every_member_are_cut_to_the_template():
    small, why = trace_plate_template(full_size_data, (), {})
    assert why is None and small.bn.sites["x"].shape == (TEMPLATE_MEMBERS,) and small.shapes["x"] == (100,)
    guide = StructuredGuide(full_size_data, plates="auto", hidden_sizes=(8,))
    assert "shrunk to 4 of its 100 members" in guide.plate_trace_note
    assert guide.posterior(x=torch.ones(7)).sample(2)["z"].shape == (2, 7)


def test_small_plates_and_models_without_plates_are_traced_as_before():
    assert trace_plate_template(hierarchical, (), {"N": TEMPLATE_MEMBERS}, observed=["x"]) == (None, None)
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 3}, hidden_sizes=(8,))
    assert guide.plate_trace_note is None and guide.site_shapes["z"] == (3,)


def test_the_structure_of_a_plate_guide_shows_the_plate_flow():
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 1000}, hidden_sizes=(8,))
    s = guide.structure
    assert s.masks.keys() == guide.flow.masks.keys() and any(k.startswith("member_flow") for k in s.masks)
    # the member flow sees its own latent, the global mu and its own observation
    assert s.masks["member_flow.conditioners.0.layers.0"].shape[1] == 3
    assert s.num_effective_parameters == guide.flow.num_effective_parameters() > 0
    text = str(s)
    assert "PlatedStrAF" in text and "plate:      'data', traced size 1000" in text and "4-member template" in text
    assert s.num_passes == guide.flow.num_passes


def nested(G=3, M=4, x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", G, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        with pyro.plate("obs", M, dim=-1):
            pyro.sample("x", dist.Normal(theta, 1.0), obs=x)


def test_nested_plates_get_the_nested_plate_flow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide = StructuredGuide(nested, observed=["x"], plates="auto", model_kwargs={"G": 5, "M": 6}, hidden_sizes=(8,))
    assert guide.plate_layout is not None and guide.plate_note is None and guide.latent_dim == 6
    assert "plate 'groups' shrunk to 4 of its 5 members and plate 'obs' shrunk to 4 of its 6" in guide.plate_trace_note
    samples = guide.posterior(x=torch.zeros(7, 2)).sample(3)
    assert samples["theta"].shape == (3, 7, 1)


def test_a_template_guide_trains_saves_and_loads(tmp_path):
    pyro.set_rng_seed(0)
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 300}, hidden_sizes=(8,))
    guide.fit(num_steps=3, batch_size=8, progress=False, simulate_with={"N": (10, 20)})
    guide.save(tmp_path / "g.pt")
    loaded = StructuredGuide.load(tmp_path / "g.pt", hierarchical, model_kwargs={"N": 300})
    assert loaded.plate_trace_note == guide.plate_trace_note
    x = torch.randn(40)
    values = guide.posterior(x=x).sample(3)
    with torch.no_grad():
        assert torch.allclose(guide.posterior(x=x).log_prob(values), loaded.posterior(x=x).log_prob(values), atol=1e-5)


def test_the_pyro_guide_call_of_a_template_guide_answers_other_sizes():
    import pyro.poutine as poutine
    from pyro.infer import SVI, Trace_ELBO

    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 500}, hidden_sizes=(8,))
    x = torch.randn(30)
    tr = poutine.trace(guide).get_trace(30, x)
    assert tr.nodes["z"]["value"].shape == (30,)
    tr.compute_log_prob()
    total = sum(site["log_prob_sum"] for site in tr.nodes.values() if site["type"] == "sample")
    values = {k: tr.nodes[k]["value"] for k in ("mu", "z")}
    assert torch.allclose(total, guide.posterior(x=x).log_prob(values), atol=1e-4)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(30, x)))


def test_a_template_guide_reports_the_traced_sizes_and_the_usual_errors():
    guide = StructuredGuide(hierarchical, observed=["x"], plates="auto", model_kwargs={"N": 300}, hidden_sizes=(8,))
    assert guide.latent_dim == 301 and guide.context_dim == 300
    with pytest.raises(ModelStructureError, match="observed="):
        StructuredGuide(hierarchical, plates="auto", model_kwargs={"N": 300})  # x=None: nothing observed
