"""Devices: guides, layouts and flows moved with ``.to(device)`` compute there (checked on "meta"), and save/load.

The "meta" device has shapes but no values, so a tensor created on the default (CPU) device
inside a computation meets a meta tensor and raises; code that needs values (StrAF's sampling
row plans, GRF's and CNF's iterative solves) cannot run there and is checked on a GPU by
``benchmarks/gpu_check.py`` instead.
"""

import pyro
import pytest
import torch

from pyro_struct import StructuredGuide
from pyro_struct.models import LinearGaussianNetwork
from pyro_struct.simulation import Simulations
from pyro_struct.training.fit import _on

META = torch.device("meta")


@pytest.fixture(scope="module")
def lg():
    return LinearGaussianNetwork.random(5, seed=0)


def _guide(lg, flow="straf"):
    pyro.set_rng_seed(0)
    return StructuredGuide(lg.model, flow=flow, observed=lg.observed_sites, hidden_sizes=(8,))


def _observations(lg, batch=3):
    return {s: torch.zeros(batch) for s in lg.observed_sites}


def test_layouts_on_meta_move_their_inputs_and_give_meta_outputs(lg):
    guide = _guide(lg)
    sims = guide.simulator().simulate(4)
    latent, observed = guide.latent_layout.to(META), guide.observed_layout.to(META)
    # CPU inputs are moved to the layout's device
    u, ladj = latent.pack({s: sims[s] for s in guide.latent_sites}, torch.Size((4,)))
    assert u.device == META and u.shape == (4, guide.latent_dim) and ladj.device == META
    y = latent.to_flow(u)
    assert y.device == META and latent.from_flow(y).device == META
    values, ladj = latent.unpack(u)
    assert all(v.device == META for v in values.values()) and ladj.shape == (4,)
    flat, batch = observed.pack({s: sims[s] for s in guide.observed_sites}, "test", False)
    assert flat.device == META and batch == (4,) and observed.context(flat).device == META


def test_guide_to_meta_conditions_scores_and_samples_on_meta(lg):
    straf = _guide(lg).to(META)
    assert all(p.device == META for p in straf.parameters()) and all(b.device == META for b in straf.buffers())
    context, batch = straf.condition(_observations(lg), "test", False)
    assert context.device == META and batch == (3,)
    latents = {s: torch.zeros(5, 3) for s in straf.latent_sites}
    log_q = straf.log_q(latents, context, torch.Size((5, 3)))  # StrAF's density pass
    assert log_q.device == META and log_q.shape == (5, 3)
    grf = _guide(lg, "grf").to(META)
    context, _ = grf.condition(_observations(lg), "test", False)
    values, log_q = grf.rsample_q(context, 4, torch.Size((3,)))  # GRF's sampling pass
    assert log_q.device == META and log_q.shape == (4, 3)
    assert {s: (v.device, tuple(v.shape)) for s, v in values.items()} == {s: (META, (4, 3)) for s in grf.latent_sites}


def test_flows_on_meta_give_meta_outputs(lg):
    for flow, direction in (("straf", "inverse"), ("grf", "forward")):
        f = _guide(lg, flow).flow.to(META)
        d, c = f.adjacency.shape[0], f.adjacency.shape[1] - f.adjacency.shape[0]
        z, x = torch.zeros(6, d, device=META), torch.zeros(6, c, device=META)
        out, logdet = f.inverse(z, x) if direction == "inverse" else f(z, x)
        assert out.device == META and out.shape == (6, d) and logdet.shape == (6,), flow


def test_simulations_follow_the_guide_device():
    sims = Simulations({"a": torch.ones(4, 2)}, torch.zeros(4))
    moved = _on(sims, META)
    assert moved["a"].device == META and moved.log_joint.device == META and moved.num == 4
    assert _on(sims, torch.device("cpu")) is sims  # no copy when already there


def test_save_and_load_across_devices(lg, tmp_path):
    guide = _guide(lg)
    guide.set_standardization(guide.simulator().simulate(64))
    path = tmp_path / "g.pt"
    guide.to(META)
    with pytest.raises(NotImplementedError):
        guide.save(path)  # a meta guide has no values to save
    guide = _guide(lg)
    guide.set_standardization(guide.simulator().simulate(64))
    guide.save(path)
    payload = torch.load(path, weights_only=True)
    assert all(v.device.type == "cpu" for v in payload["state_dict"].values())  # files are device-free
    for where in ("meta", META):
        loaded = StructuredGuide.load(path, lg.model, map_location=where)
        assert all(t.device == META for t in list(loaded.parameters()) + list(loaded.buffers()))
    loaded = StructuredGuide.load(path, lg.model, map_location="cpu")
    for (k, a), b in zip(guide.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    obs = _observations(lg, 1)
    pyro.set_rng_seed(5)
    a = guide.posterior(obs).sample(3)
    pyro.set_rng_seed(5)
    b = loaded.posterior(obs).sample(3)
    assert all(torch.equal(a[s], b[s]) for s in a)
