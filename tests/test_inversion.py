"""Tests of the inverse structures: NaMI test vectors, d-separation property tests, baselines."""

import json
import random

import networkx as nx
import pytest
import torch

import pyro_struct as ps
from pyro_struct.graph import BayesNet
from pyro_struct.inversion import (
    INVERSE_KINDS,
    InverseStructure,
    _Elimination,
    _Problem,
    faithful_inverse,
    inverse_structure,
)

MODES = ("top", "bottom", "auto")


# ----------------------------------------------------------------------------- helpers
def chain_bn():
    return BayesNet.from_edges([("z1", "z2"), ("z2", "z3"), ("z3", "x")], observed=["x"])


def hmm_bn(T):
    edges, nodes = [], []
    for t in range(1, T + 1):
        nodes += [f"z{t}", f"x{t}"]
        if t > 1:
            edges.append((f"z{t - 1}", f"z{t}"))
        edges.append((f"z{t}", f"x{t}"))
    return BayesNet.from_edges(edges, observed=[f"x{t}" for t in range(1, T + 1)], nodes=nodes)


def hierarchical_bn(N):
    nodes = ["mu", "tau"] + [f"z{i}" for i in range(N)] + [f"x{i}" for i in range(N)]
    edges = [e for i in range(N) for e in (("mu", f"z{i}"), ("tau", f"z{i}"), (f"z{i}", f"x{i}"))]
    return BayesNet.from_edges(edges, observed=[f"x{i}" for i in range(N)], nodes=nodes)


def student_bn():
    edges = [("D", "G"), ("I", "G"), ("I", "S"), ("G", "L"), ("G", "H"), ("S", "J"), ("L", "J"), ("J", "H")]
    return BayesNet.from_edges(edges, observed=["J", "H"])


def parent_map(inv):
    return {v: set(inv.parents(v)) for v in inv.order}


def violations(bn, inv, minimal=True):
    """Faithfulness/minimality violations of ``inv`` w.r.t. ``bn`` by d-separation in ``bn.graph``.

    Faithful: each latent ``v`` is d-separated from everything earlier in the sampling order
    given its parents. Minimal: removing any single parent breaks that.
    """
    G = bn.graph
    H = inv.graph
    out = []
    if not nx.is_directed_acyclic_graph(H):
        out.append("H has a cycle")
    if any(H.in_degree(o) for o in inv.observed):
        out.append("an observed node has parents")
    if sorted(inv.order) != sorted(bn.latent_nodes):
        out.append("order is not a permutation of the latents")
    seq = inv.observed + inv.order
    for i, v in enumerate(inv.order):
        before = set(seq[: len(inv.observed) + i])
        pa = set(inv.parents(v))
        if not pa <= before:
            out.append(f"{v} has a parent sampled after it")
            continue
        rest = before - pa
        if rest and not nx.is_d_separator(G, {v}, rest, pa):
            out.append(f"unfaithful at {v}: not independent of {sorted(rest)} given {sorted(pa)}")
        if minimal:
            for p in pa:
                if nx.is_d_separator(G, {v}, rest | {p}, pa - {p}):
                    out.append(f"not minimal at {v}: edge {p} -> {v} can be dropped")
    return out


def random_bn(rng):
    """A random DAG with 3-12 nodes, observed leaves, some observed interior nodes, some barren latents.

    Labels are shuffled against the trace order so that label sorting cannot stand in for
    trace order.
    """
    n = rng.randint(3, 12)
    labels = [f"v{k}" for k in rng.sample(range(n), n)]  # labels[i] is the i-th node in trace order
    p = rng.uniform(0.15, 0.5)
    edges = [(labels[i], labels[j]) for i in range(n) for j in range(i + 1, n) if rng.random() < p]
    g = nx.DiGraph()
    g.add_nodes_from(labels)
    g.add_edges_from(edges)
    leaves = [v for v in labels if g.out_degree(v) == 0]
    observed = {v for v in leaves if rng.random() < 0.7}  # unobserved leaves become barren
    observed |= {v for v in labels if v not in leaves and rng.random() < 0.2}
    if not observed:
        observed.add(leaves[-1])
    if len(observed) == n:
        observed.discard(labels[0])
    return BayesNet.from_edges(edges, observed=sorted(observed), nodes=labels)


def barren_latents(bn):
    has_obs_desc = set()
    for o in bn.observed_nodes:
        has_obs_desc |= nx.ancestors(bn.graph, o) | {o}
    return [v for v in bn.latent_nodes if v not in has_obs_desc]


RANDOM_GRAPHS = 240


@pytest.fixture(scope="module")
def random_bns():
    rng = random.Random(2018)
    return [random_bn(rng) for _ in range(RANDOM_GRAPHS)]


# ----------------------------------------------------------------------------- test vectors
def test_chain_vector():
    inv = faithful_inverse(chain_bn(), mode="top")
    assert parent_map(inv) == {"z1": {"z2"}, "z2": {"z3"}, "z3": {"x"}}
    assert inv.order == ["z3", "z2", "z1"]
    assert inv.depth == 2 and inv.num_edges == 3


def test_hmm_vector():
    inv = faithful_inverse(hmm_bn(3), mode="top")
    assert parent_map(inv) == {
        "z1": {"z2", "x1"},
        "z2": {"z3", "x1", "x2"},
        "z3": {"x1", "x2", "x3"},
    }
    assert inv.order == ["z3", "z2", "z1"]


def test_observed_parent_vector():
    bn = BayesNet.from_edges([("x0", "z"), ("z", "x1")], observed=["x0", "x1"])
    for mode in MODES:
        assert parent_map(faithful_inverse(bn, mode=mode)) == {"z": {"x0", "x1"}}


def test_barren_latent_vector():
    bn = BayesNet.from_edges([("a", "x"), ("a", "b")], observed=["x"])
    inv = faithful_inverse(bn, mode="top")
    assert parent_map(inv) == {"a": {"x"}, "b": {"a"}}
    assert inv.order == ["a", "b"]  # b is sampled last, from its model conditional
    assert inv.barren == ["b"]


def test_student_vector():
    inv = faithful_inverse(student_bn(), mode="top")
    assert parent_map(inv) == {
        "D": {"I", "G"},
        "I": {"G", "S"},
        "S": {"G", "J", "L"},
        "G": {"H", "J", "L"},
        "L": {"H", "J"},
    }
    assert inv.num_edges == 12
    assert violations(student_bn(), inv) == []


@pytest.mark.parametrize("mode", MODES)
def test_vectors_faithful_and_minimal_in_every_mode(mode):
    bns = [chain_bn(), hmm_bn(3), hmm_bn(6), student_bn(), hierarchical_bn(4)]
    bns.append(BayesNet.from_edges([("a", "x"), ("a", "b")], observed=["x"]))
    for bn in bns:
        assert violations(bn, faithful_inverse(bn, mode=mode)) == []


def test_barren_chain_is_sampled_topologically_after_the_rest():
    # b and c are barren, c's model parent is barren too; d is barren with an observed parent
    edges = [("c0", "b"), ("a", "x"), ("a", "b"), ("b", "c"), ("x", "d")]
    bn = BayesNet.from_edges(edges, observed=["x"], nodes=["c0", "a", "x", "b", "c", "d"])
    for mode in MODES:
        inv = faithful_inverse(bn, mode=mode)
        assert set(inv.barren) == {"c0", "b", "c", "d"}
        assert inv.order[0] == "a"
        assert inv.order.index("b") < inv.order.index("c")
        assert set(inv.parents("c")) == {"b"} and set(inv.parents("b")) == {"a", "c0"}
        assert inv.parents("d") == ["x"] and inv.parents("c0") == []
        assert violations(bn, inv) == []


def test_hmm_structure_for_longer_chains():
    # top mode: z_t <- {z_{t+1}, x_1..x_t}: backward sampling after forward filtering
    T = 12
    inv = faithful_inverse(hmm_bn(T), mode="top")
    for t in range(1, T):
        assert set(inv.parents(f"z{t}")) == {f"z{t + 1}"} | {f"x{s}" for s in range(1, t + 1)}
    assert inv.depth == T - 1


# ----------------------------------------------------------------------------- property tests
def test_random_graphs_cover_the_hard_cases(random_bns):
    """The generator yields the cases the property tests are meant to cover."""
    with_barren = sum(bool(barren_latents(bn)) for bn in random_bns)
    with_observed_interior = sum(any(bn.graph.out_degree(o) > 0 for o in bn.observed_nodes) for bn in random_bns)
    modes_differ = sum(
        faithful_inverse(bn, "top").num_edges != faithful_inverse(bn, "bottom").num_edges for bn in random_bns
    )
    assert len(random_bns) >= 200
    assert with_barren >= 30 and with_observed_interior >= 30 and modes_differ >= 10


@pytest.mark.parametrize("mode", MODES)
def test_faithful_and_minimal_on_random_graphs(random_bns, mode):
    for k, bn in enumerate(random_bns):
        inv = faithful_inverse(bn, mode=mode)
        assert inv.mode in ("top", "bottom")
        bad = violations(bn, inv)
        assert bad == [], f"graph {k} ({list(bn.graph.edges)}, observed {bn.observed_nodes}): {bad}"


def test_auto_keeps_the_sparser_mode(random_bns):
    picked = set()
    for bn in random_bns[:80] + [student_bn(), hierarchical_bn(6)]:
        top, bottom, auto = (faithful_inverse(bn, m) for m in MODES)
        best = "top" if top.num_edges <= bottom.num_edges else "bottom"
        assert auto.mode == best
        assert parent_map(auto) == parent_map(top if best == "top" else bottom)
        picked.add(best)
    assert picked == {"top", "bottom"}
    assert faithful_inverse(student_bn()).mode == "top"  # 12 edges against 15
    assert faithful_inverse(hierarchical_bn(6)).mode == "bottom"


def test_checker_detects_broken_structures():
    """The d-separation check fails on a dropped edge and on a wrong order."""
    bn = student_bn()
    inv = faithful_inverse(bn, mode="top")
    parents = {v: inv.parents(v) for v in inv.order}
    parents["S"] = [p for p in parents["S"] if p != "L"]
    broken = InverseStructure(bn, inv.order, parents, "faithful", "top")
    assert any(msg.startswith("unfaithful at S") for msg in violations(bn, broken))
    # a redundant parent is faithful but not minimal
    hmm = hmm_bn(3)
    inv = faithful_inverse(hmm, mode="top")
    parents = {v: inv.parents(v) for v in inv.order}
    parents["z1"] = parents["z1"] + ["x3"]
    redundant = InverseStructure(hmm, inv.order, parents, "faithful", "top")
    assert violations(hmm, redundant, minimal=False) == []
    assert violations(hmm, redundant) == ["not minimal at z1: edge x3 -> z1 can be dropped"]


def test_incremental_fill_counts_match_recount(random_bns):
    """The incrementally maintained fill counts equal a recount after every elimination step."""

    def recount(run, w):
        # pairs of w's neighbours with a latent end that are not adjacent
        L, O = run.ladj[w], run.oadj[w]
        latent_pairs = sum(len(L - run.ladj[a] - {a}) for a in L) // 2
        mixed_pairs = sum(len(O - run.oadj[a]) for a in L)
        return latent_pairs + mixed_pairs

    for bn in random_bns[:60] + [student_bn(), hierarchical_bn(5)]:
        problem = _Problem(bn)
        for mode in ("top", "bottom"):
            run = _Elimination(problem, mode)
            while not run.done:
                fill, v = run.peek()
                assert fill == recount(run, v)
                run.step()
                for w in run.ladj:
                    assert run._fill(w) == recount(run, w)


# ----------------------------------------------------------------------------- baselines
def test_dense_is_faithful_but_not_minimal(random_bns):
    non_minimal = 0
    for bn in random_bns:
        dense = inverse_structure(bn, kind="dense")
        faithful = faithful_inverse(bn)
        assert dense.order == faithful.order
        assert violations(bn, dense, minimal=False) == []
        n_obs, n_lat = len(dense.observed), len(dense.order)
        assert dense.num_edges == n_lat * n_obs + n_lat * (n_lat - 1) // 2
        non_minimal += bool(violations(bn, dense))
    assert non_minimal > 0
    # a concrete case: z1 does not need x3 once z2 and x1 are known
    assert any("not minimal at z1" in m for m in violations(hmm_bn(3), inverse_structure(hmm_bn(3), kind="dense")))


def test_meanfield_sees_every_observation_and_no_latent():
    bn = hmm_bn(3)
    mf = inverse_structure(bn, kind="meanfield")
    A = mf.adjacency()
    n = len(mf.order)
    assert not A[:, :n].any() and A[:, n:].all()
    # dropping the latent parents of a faithful inverse loses dependencies: unfaithful
    assert any(m.startswith("unfaithful") for m in violations(bn, mf, minimal=False))


@pytest.mark.parametrize("T", [3, 5])
def test_moralized_is_unfaithful_on_hmm(T):
    bn = hmm_bn(T)
    mor = inverse_structure(bn, kind="moralized")
    assert mor.kind == "moralized" and mor.mode is None
    # no fill-in: z_t only sees its Markov blanket, so its posterior misses earlier observations
    assert set(mor.parents(f"z{T}")) == {f"x{T}"}
    bad = violations(bn, mor, minimal=False)
    assert any(m.startswith(f"unfaithful at z{T}") for m in bad)
    assert nx.is_directed_acyclic_graph(mor.graph)


def test_moralized_matches_pyro_get_dependencies():
    """Site-level parents equal ``posterior_dependencies`` of ``pyro.infer.inspect.get_dependencies``."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer.inspect import get_dependencies

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Normal(a + b, 1.0))
        d = pyro.sample("d", dist.Normal(c, 1.0))
        pyro.sample("y", dist.Normal(a * d, 1.0), obs=torch.tensor(0.5))
        pyro.sample("w", dist.Normal(d, 1.0), obs=torch.tensor(0.1))

    deps = get_dependencies(model)["posterior_dependencies"]
    edges = [("a", "c"), ("b", "c"), ("c", "d"), ("a", "y"), ("d", "y"), ("d", "w")]
    bn = BayesNet.from_edges(edges, observed=["y", "w"], nodes=["a", "b", "c", "d", "y", "w"])
    mor = inverse_structure(bn, kind="moralized")
    for v in bn.latent_nodes:
        assert set(mor.parents(v)) == set(deps[v]) - {v}, v
    assert mor.order == ["d", "c", "b", "a"]


def test_moralized_includes_observed_markov_blanket():
    # observed values are inputs of the guide, so observed parents and co-parents are kept
    edges = [("x0", "z"), ("z", "x1"), ("u", "x1"), ("x2", "x1")]
    bn = BayesNet.from_edges(edges, observed=["x0", "x1", "x2"], nodes=["x0", "x2", "u", "z", "x1"])
    mor = inverse_structure(bn, kind="moralized")
    assert mor.order == ["z", "u"]
    assert set(mor.parents("z")) == {"x0", "x1", "x2"}
    assert set(mor.parents("u")) == {"x1", "x2", "z"}  # co-parent z comes later in the trace


def test_random_kind_matches_edge_count_and_is_seeded(random_bns):
    bn = hmm_bn(6)
    faithful = faithful_inverse(bn)
    r0 = inverse_structure(bn, kind="random", seed=0)
    assert r0.num_edges == faithful.num_edges and r0.order == faithful.order
    assert torch.equal(r0.adjacency(), inverse_structure(bn, kind="random", seed=0).adjacency())
    assert not all(
        torch.equal(r0.adjacency(), inverse_structure(bn, kind="random", seed=s).adjacency()) for s in range(1, 6)
    )
    for b in random_bns[:50]:
        r = inverse_structure(b, kind="random", seed=3)
        assert r.num_edges == faithful_inverse(b).num_edges
        A = r.adjacency()
        n = len(r.order)
        assert not torch.triu(A[:, :n]).any()  # strictly lower-triangular latent block
        assert nx.is_directed_acyclic_graph(r.graph)


def test_random_kind_is_uniform_over_allowed_positions():
    bn = hmm_bn(3)
    k = faithful_inverse(bn).num_edges
    n_lat, n_obs = 3, 3
    allowed = torch.zeros(n_lat, n_lat + n_obs, dtype=torch.bool)
    allowed[:, n_lat:] = True
    allowed[:, :n_lat] = torch.tril(torch.ones(n_lat, n_lat, dtype=torch.bool), -1)
    M = int(allowed.sum())
    trials = 600
    counts = sum(inverse_structure(bn, kind="random", seed=s).adjacency().double() for s in range(trials))
    assert not counts[~allowed].any()
    freq = counts[allowed] / trials
    expected = k / M
    sd = (expected * (1 - expected) / trials) ** 0.5
    assert (freq - expected).abs().max() < 5 * sd


# ----------------------------------------------------------------------------- API
def test_inverse_structure_api():
    bn = student_bn()
    inv = ps.inverse_structure(bn, kind="faithful", mode="top")
    assert isinstance(inv, ps.InverseStructure) and inv.kind == "faithful" and inv.mode == "top"
    assert inv.bn is bn and inv.observed == ["J", "H"]
    assert inv.row_labels == inv.order and inv.col_labels == inv.order + inv.observed
    A = inv.adjacency()
    assert A.dtype == torch.bool and A.shape == (5, 7)
    for i, v in enumerate(inv.row_labels):
        assert {inv.col_labels[j] for j in A[i].nonzero().flatten().tolist()} == set(inv.parents(v))
    assert not torch.triu(A[:, :5]).any()
    assert int(A.sum()) == inv.num_edges == inv.graph.number_of_edges() == 12
    assert inv.depth == nx.dag_longest_path_length(inv.graph.subgraph(inv.order))
    pos = {n: i for i, n in enumerate(inv.observed + inv.order)}
    for v in inv.order:
        ps_ = inv.parents(v)
        assert ps_ == sorted(ps_, key=pos.__getitem__)
    assert inv.parents("J") == [] and set(inv.graph.predecessors("G")) == {"H", "J", "L"}
    assert inv.graph.nodes["J"]["observed"] and not inv.graph.nodes["G"]["observed"]
    with pytest.raises(KeyError):
        inv.parents("nope")
    d = json.loads(json.dumps(inv.to_dict()))
    assert d["num_edges"] == 12 and d["order"] == inv.order and set(d["parents"]["G"]) == {"H", "J", "L"}
    text = repr(inv)
    assert "12 edges" in text and "G <- {J, H, L}" in text


@pytest.mark.parametrize("kind", INVERSE_KINDS)
def test_every_kind_has_the_same_layout(kind):
    bn = hierarchical_bn(4)
    inv = inverse_structure(bn, kind=kind, seed=1)
    assert inv.kind == kind
    assert sorted(inv.order) == sorted(bn.latent_nodes) and inv.observed == bn.observed_nodes
    A = inv.adjacency()
    assert A.shape == (len(bn.latent_nodes), len(bn.nodes))
    assert not torch.triu(A[:, : len(inv.order)]).any()


def test_bad_input_errors():
    with pytest.raises(TypeError, match="BayesNet"):
        faithful_inverse(nx.DiGraph())
    all_observed = BayesNet.from_edges([("a", "b")], observed=["a", "b"])
    with pytest.raises(ps.ModelStructureError, match="no latent"):
        faithful_inverse(all_observed)
    with pytest.raises(ValueError, match="'top', 'bottom', 'auto'"):
        faithful_inverse(chain_bn(), mode="sideways")
    with pytest.raises(ValueError, match="'faithful', 'dense', 'moralized', 'random'"):
        inverse_structure(chain_bn(), kind="sparse")


def test_latents_without_observations_keep_their_prior_structure():
    bn = BayesNet.from_edges([("a", "b"), ("b", "c")], observed=[])
    inv = faithful_inverse(bn)
    assert inv.order == ["a", "b", "c"] and parent_map(inv) == {"a": set(), "b": {"a"}, "c": {"b"}}


# ----------------------------------------------------------------------------- scale and tracing
def test_large_plate_inverts_linearly():
    # 10,002 nodes; auto abandons top mode (quadratic fill) and keeps bottom: 5N + 1 edges
    N = 5000
    inv = faithful_inverse(hierarchical_bn(N))
    assert inv.mode == "bottom" and inv.num_edges == 5 * N + 1 and inv.depth == 2
    assert set(inv.parents("z7")) == {"mu", "tau", "x7"}


def test_traced_models_invert_faithfully():
    from pyro_struct.models import hierarchical, hmm

    bn = ps.trace_model(hmm(4), observed=[f"x_{t}" for t in range(4)])
    inv = faithful_inverse(bn, mode="top")
    assert set(inv.parents("z_0")) == {"z_1", "x_0"}
    assert violations(bn, inv) == []
    bn = ps.trace_model(hierarchical(3), observed=["x"])
    for mode in MODES:
        assert violations(bn, faithful_inverse(bn, mode=mode)) == []
