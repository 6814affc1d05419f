"""Tests of CompiledStructure: graphs, adjacency, masks, parameter counts, text, JSON and plots."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pyro_struct import BayesNet, CompiledStructure, StrNN, faithful_inverse, inverse_structure  # noqa: E402
from pyro_struct.masks import mask_product  # noqa: E402
from pyro_struct.nn import MaskedLinear  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STUDENT_EDGES = [("D", "G"), ("I", "G"), ("I", "S"), ("G", "L"), ("G", "H"), ("S", "J"), ("L", "J"), ("J", "H")]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def student():
    return BayesNet.from_edges(STUDENT_EDGES, observed=["J", "H"])


def chain():
    return BayesNet.from_edges([("z1", "z2"), ("z2", "z3"), ("z3", "x")], observed=["x"])


class TwoNetFlow(nn.Module):
    """A hand-built "flow": two StrNNs on the adjacency plus one unmasked parameter vector."""

    def __init__(self, A, hidden=(6, 5)):
        super().__init__()
        self.register_buffer("adjacency", A)
        self.shift = StrNN(A, list(hidden), num_params=2, skip=True)
        self.scale = StrNN(A, list(hidden), num_params=1, skip=False)
        self.temperature = nn.Parameter(torch.zeros(4))


def straf(inv, **kw):
    from pyro_struct.flows import StrAF

    A = inv.adjacency()
    return StrAF(A, context_dim=A.shape[1] - A.shape[0], **kw)


# ---------------------------------------------------------------------------- structure
def test_graphs_adjacency_and_labels_follow_the_inverse():
    bn = student()
    inv = faithful_inverse(bn)
    s = CompiledStructure(bn, inv)
    assert s.model_graph is bn.graph
    assert isinstance(s.inverse_graph, nx.DiGraph)
    assert set(s.inverse_graph.edges) == {(p, v) for v in inv.order for p in inv.parents(v)}
    assert s.row_labels == inv.order
    assert s.col_labels == inv.order + inv.observed
    assert torch.equal(s.adjacency, inv.adjacency())
    assert int(s.adjacency.sum()) == 12  # the student network's faithful inverse (DESIGN section 4)
    assert (s.num_latent, s.num_observed) == (5, 2)
    # every entry names an edge of H
    for i, r in enumerate(s.row_labels):
        for j, c in enumerate(s.col_labels):
            assert bool(s.adjacency[i, j]) == s.inverse_graph.has_edge(c, r)
    assert s.masks == {} and s.num_effective_parameters is None and s.num_dense_parameters is None


def test_depth_passes_and_sparsity():
    bn = chain()
    inv = faithful_inverse(bn, mode="top")  # z1 <- z2 <- z3 <- x
    s = CompiledStructure(bn, inv)
    assert s.depth == 2 and s.num_passes == 3
    assert s.num_dense_entries == 3 * 2 // 2 + 3 * 1
    assert s.sparsity == pytest.approx(3 / 6)
    dense = CompiledStructure(bn, inverse_structure(bn, kind="dense"))
    assert dense.sparsity == pytest.approx(1.0)
    assert dense.depth == 2


def test_parameter_counts_equal_true_mask_entries_plus_biases():
    bn = student()
    inv = faithful_inverse(bn)
    flow = TwoNetFlow(inv.adjacency())
    s = CompiledStructure(bn, inv, flow)
    layers = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
    assert len(s.masks) == len(layers) == 3 + 1 + 3  # shift: 3 layers + skip; scale: 3 layers
    mask_entries = sum(int(m.mask.sum()) for m in layers)
    biases = sum(m.bias.numel() for m in layers if m.bias is not None)
    assert s.num_effective_parameters == mask_entries + biases + 4  # + the unmasked vector
    assert s.num_dense_parameters == sum(p.numel() for p in flow.parameters())
    assert s.num_effective_parameters < s.num_dense_parameters
    # the masks are the modules' masks, in module order, and respect the adjacency
    for (name, mask), layer in zip(s.masks.items(), layers):
        assert torch.equal(mask, layer.mask)
    product = mask_product([s.masks[f"shift.layers.{k}"] for k in range(3)])
    allowed = inv.adjacency().repeat_interleave(2, dim=0)
    assert not ((product > 0) & ~allowed).any()


def test_parameter_counts_of_a_straf():
    bn = student()
    inv = faithful_inverse(bn)
    flow = straf(inv, num_layers=2, hidden_sizes=[8, 8])
    s = CompiledStructure(bn, inv, flow)
    layers = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
    expected = sum(int(m.mask.sum()) + (m.bias.numel() if m.bias is not None else 0) for m in layers)
    other = sum(p.numel() for p in flow.parameters()) - sum(p.numel() for m in layers for p in m.parameters())
    assert s.num_effective_parameters == expected + other
    assert s.num_dense_parameters == sum(p.numel() for p in flow.parameters())
    assert s.num_passes == flow.num_passes == 2 * (s.depth + 1)  # num_layers * (depth + 1)


def test_flow_with_the_wrong_adjacency_shape_is_refused():
    bn = student()
    inv = faithful_inverse(bn)
    A = torch.zeros(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="adjacency has shape"):
        CompiledStructure(bn, inv, TwoNetFlow(A))


# ---------------------------------------------------------------------------- text and JSON
def test_summary_names_sites_edges_and_parameters():
    bn = student()
    inv = faithful_inverse(bn)
    s = CompiledStructure(bn, inv, TwoNetFlow(inv.adjacency()))
    text = str(s)
    assert text == s.summary()
    assert "5 latent + 2 observed coordinates in 7 sites, 8 edges" in text
    assert "12 edges, depth" in text
    assert f"{s.num_effective_parameters:,} effective of {s.num_dense_parameters:,} dense" in text
    for site in "DIGSLJH":
        assert f"  {site} " in text
    # the text adjacency has one row per latent with the allowed entries marked
    rows = [line.strip() for line in s.adjacency_text().splitlines()[-5:]]
    for i, line in enumerate(rows):
        label, cells = line.split(" ", 1)
        assert label == s.row_labels[i]
        marks = [c for c in cells.split() if c in ("x", ".")]
        assert marks == ["x" if a else "." for a in s.adjacency[i].tolist()]


def test_to_json_round_trips_everything_but_the_plots(tmp_path):
    bn = student()
    inv = faithful_inverse(bn)
    flow = TwoNetFlow(inv.adjacency())
    s = CompiledStructure(bn, inv, flow)
    path = tmp_path / "s.json"
    text = s.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert torch.equal(torch.tensor(data["adjacency"]["matrix"], dtype=torch.bool), s.adjacency)
    assert data["adjacency"]["row_labels"] == s.row_labels
    assert data["adjacency"]["col_labels"] == s.col_labels
    assert data["model"]["num_edges"] == 8 and len(data["model"]["edges"]) == 8
    assert data["inverse"]["num_edges"] == 12 and len(data["inverse"]["edges"]) == 12
    assert data["inverse"]["parents"] == {v: inv.parents(v) for v in inv.order}
    assert data["depth"] == s.depth and data["num_passes"] == s.num_passes
    assert data["flow"]["num_effective_parameters"] == s.num_effective_parameters
    for name, mask in s.masks.items():
        assert torch.equal(torch.tensor(data["flow"]["masks"][name]["mask"], dtype=torch.bool), mask)
        assert data["flow"]["masks"][name]["num_true"] == int(mask.sum())
    small = json.loads(s.to_json(include_masks=False))
    assert all("mask" not in m for m in small["flow"]["masks"].values())


# ---------------------------------------------------------------------------- plots
def _is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_adjacency_plot_shows_the_compiled_adjacency(tmp_path):
    bn = student()
    inv = faithful_inverse(bn)
    s = CompiledStructure(bn, inv)
    fig = s.plot_adjacency(tmp_path / "a.png")
    assert _is_png(tmp_path / "a.png")
    assert len(fig.axes) == 1
    image = fig.axes[0].images[0].get_array()
    assert torch.equal(torch.as_tensor(image.data) > 0.5, s.adjacency)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == s.col_labels
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == s.row_labels


def test_hinton_plots_have_one_axes_per_mask(tmp_path):
    bn = student()
    inv = faithful_inverse(bn)
    s = CompiledStructure(bn, inv, TwoNetFlow(inv.adjacency()))
    fig = s.plot_masks(tmp_path / "m.png")
    assert _is_png(tmp_path / "m.png")
    assert len(fig.axes) == len(s.masks) == 7
    titles = [ax.get_title() for ax in fig.axes]
    assert sorted(titles) == sorted(s.masks)
    for ax in fig.axes:
        # the background image is the mask; squares are drawn only for unmasked weights
        mask = s.masks[ax.get_title()]
        assert torch.equal(torch.as_tensor(ax.images[0].get_array().data) > 0.5, mask)
        weight = s.masked_weights[ax.get_title()]
        squares = ax.collections[0].get_paths() if ax.collections else []
        assert len(squares) == int((weight != 0).sum())


def test_plot_masks_without_a_flow_explains_what_is_missing():
    bn = chain()
    s = CompiledStructure(bn, faithful_inverse(bn))
    with pytest.raises(ValueError, match="flow"):
        s.plot_masks()


def test_graph_plot_and_save_plots(tmp_path):
    bn = student()
    inv = faithful_inverse(bn)
    s = CompiledStructure(bn, inv, straf(inv, hidden_sizes=[8]))
    fig = s.plot_graphs(tmp_path / "g.png")
    assert _is_png(tmp_path / "g.png")
    assert len(fig.axes) == 2
    assert "8 edges" in fig.axes[0].get_title() and "12 edges" in fig.axes[1].get_title()
    written = s.save_plots(tmp_path / "report")
    assert set(written) == {"adjacency", "graphs", "masks", "json"}
    for kind in ("adjacency", "graphs", "masks"):
        assert _is_png(written[kind])
    assert json.loads(written["json"].read_text())["inverse"]["num_edges"] == 12


def test_large_graphs_are_drawn_at_site_level(tmp_path):
    # 2 x 800 scalar nodes: above the scalar-drawing limit, so the plot collapses to sites
    n = 800
    from pyro_struct.graph import SiteInfo
    from torch.distributions import constraints

    g = nx.DiGraph()
    for i in range(n):
        g.add_node(f"z[{i}]", site="z", index=(i,), observed=False)
    for i in range(n):
        g.add_node(f"x[{i}]", site="x", index=(i,), observed=True)
        g.add_edge(f"z[{i}]", f"x[{i}]")
    bn = BayesNet(g, [SiteInfo("z", (n,), constraints.real, False), SiteInfo("x", (n,), constraints.real, True)])
    s = CompiledStructure(bn, faithful_inverse(bn))
    fig = s.plot_graphs()
    assert "(sites): 2 nodes, 1 edges" in fig.axes[0].get_title()
    fig = s.plot_adjacency(tmp_path / "big.png")
    assert _is_png(tmp_path / "big.png")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["z", "x"]
    assert s.adjacency_text() is None
    assert "Adjacency" not in s.summary()


@pytest.mark.parametrize("family", ["GraphicalResidualFlow", "StructuredCNF"])
def test_other_flow_families_are_inspected_the_same_way(family, tmp_path):
    from pyro_struct import flows

    bn = student()
    inv = faithful_inverse(bn)
    A = inv.adjacency()
    flow = getattr(flows, family)(A, context_dim=2, hidden_sizes=[8])
    s = CompiledStructure(bn, inv, flow)
    layers = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
    assert len(s.masks) == len(layers) > 0
    masked = sum(int(m.mask.sum()) + (m.bias.numel() if m.bias is not None else 0) for m in layers)
    in_layers = sum(p.numel() for m in layers for p in m.parameters())
    total = sum(p.numel() for p in flow.parameters())
    assert s.num_effective_parameters == masked + (total - in_layers)
    assert s.num_dense_parameters == total
    fig = s.plot_masks(tmp_path / "m.png")
    assert len(fig.axes) == len(layers) and _is_png(tmp_path / "m.png")


def test_a_guide_exposes_its_compiled_structure():
    import pyro
    import pyro.distributions as dist

    from pyro_struct import StructuredGuide

    def model(x=None):
        z1 = pyro.sample("z1", dist.Normal(torch.tensor(0.0), 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 0.5))
        pyro.sample("x", dist.Normal(z2, 0.3), obs=x)

    guide = StructuredGuide(model, observed=["x"], hidden_sizes=[8])
    s = guide.structure
    assert isinstance(s, CompiledStructure)
    assert s.flow is guide.flow and s.bn is guide.bn
    assert torch.equal(s.adjacency, guide.flow.adjacency.cpu())
    assert s.num_dense_parameters == sum(p.numel() for p in guide.flow.parameters())
    assert s.row_labels == ["z2", "z1"] and s.col_labels == ["z2", "z1", "x"]
    assert "given 1 observed, 2 edges, depth 1" in s.summary().splitlines()[2]  # z2 <- x, z1 <- z2
