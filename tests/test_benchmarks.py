"""The benchmark harness: its exact-KL metric, a tiny end-to-end ``lgbn`` run, and ``pyro-struct bench``."""

import json

import pytest
import torch

from benchmarks.lgbn import evaluate_kl
from pyro_struct.cli import main as cli_main
from pyro_struct.models import LinearGaussianNetwork


def _gaussian_q(mean, cov):
    q = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)

    def sample_q(n):
        z = q.sample((n,))
        return z, q.log_prob(z)

    return q.log_prob, sample_q


def test_evaluate_kl_is_zero_at_the_exact_posterior_and_half_the_mahalanobis_shift_otherwise():
    torch.manual_seed(0)
    net = LinearGaussianNetwork.random(7, seed=3)
    obs = net.sample_observations(4, torch.Generator().manual_seed(1))
    mean, cov = net.exact_posterior(obs)
    fkl, rkl = evaluate_kl(net, obs, *_gaussian_q(mean, cov), num_samples=500)
    assert abs(fkl) < 1e-9 and abs(rkl) < 1e-9

    # a mean shift delta: both KLs are delta' cov^-1 delta / 2, whatever the direction
    delta = torch.zeros(mean.shape[-1], dtype=mean.dtype)
    delta[0] = 0.7 * cov[0, 0].sqrt()
    exact = 0.5 * float(delta @ torch.linalg.solve(cov, delta))
    fkl, rkl = evaluate_kl(net, obs, *_gaussian_q(mean + delta, cov), num_samples=20000)
    assert fkl == pytest.approx(exact, rel=0.05)
    assert rkl == pytest.approx(exact, rel=0.05)


def test_lgbn_benchmark_runs_on_any_network_file_and_writes_its_table(tmp_path):
    from benchmarks.lgbn import main as lgbn_main

    net = {  # a -> b -> c, a -> c; leaves observed (c), a and b latent
        "nodes": ["a", "b", "c"],
        "arcs": [["a", "b"], ["b", "c"], ["a", "c"]],
        "cpds": {
            "a": {"coefficients": {"(Intercept)": 0.5}, "variance": 1.0},
            "b": {"parents": ["a"], "coefficients": {"(Intercept)": 0.0, "a": 0.8}, "variance": 0.5},
            "c": {"parents": ["b", "a"], "coefficients": {"(Intercept)": 1.0, "b": -1.2, "a": 0.3}, "variance": 0.2},
        },
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(net))
    rc = lgbn_main([
        "--networks", str(path), "--flows", "straf", "--structures", "faithful", "--regimes", "skl", "fkl300",
        "--baselines", "meanfield", "oracle", "--budget", "3", "--fkl-steps", "150", "--num-obs", "5", "--num-samples", "200",
        "--results-dir", str(tmp_path), "--out", "tiny",
    ])
    assert rc == 0
    table = json.loads((tmp_path / "tiny.json").read_text())
    rows = table["rows"]
    assert [(r["method"], r["regime"]) for r in rows] == [
        ("straf", "skl"), ("mean-field", "skl"), ("straf", "fkl300"), ("mean-field", "fkl300"),
        ("least-squares oracle", "fkl300"),
    ]
    for r in rows:
        assert r["network"] == "tiny" and r["forward_kl"] == r["forward_kl"] and r["reverse_kl"] == r["reverse_kl"]
    assert rows[2]["simulations"] == 300
    # the least-squares fit of the exact conditionals: about (parameters) / (2 N) nats from the posterior
    assert rows[4]["params"] == 7 and 0 < rows[4]["forward_kl"] < 0.1 and abs(rows[4]["reverse_kl"]) < 0.1
    assert (tmp_path / "tiny.md").read_text().startswith("# tiny")


def test_bench_subcommand_lists_the_benchmarks_and_rejects_unknown_names(capsys):
    assert cli_main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "lgbn" in out and "circuit" in out and "scaling" in out
    assert cli_main(["bench", "no-such-benchmark"]) == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err


def test_summary_checks_the_goals_from_the_tables(tmp_path):
    from benchmarks.summary import main as summary_main

    def row(method, structure, regime, fkl, rkl):
        return {"network": "net", "method": method, "structure": structure, "regime": regime, "train_s": 180.0,
                "forward_kl": fkl, "reverse_kl": rkl}

    rows = [
        row("straf", "faithful", "skl", 0.01, 0.04),
        row("straf", "faithful", "fkl5000", 0.1, 0.1),
        row("straf", "dense", "fkl5000", 0.3, 0.19),  # reverse ratio 0.53 > 0.5: missed
        row("sbi NPE", "dense", "fkl5000", 0.5, 0.5),  # ratio 0.2: met
    ]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows[:2], "meta": {}}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows[2:], "meta": {}}))
    assert summary_main(["--lgbn", "a", "b", "missing", "--circuit", "--circuit-goal", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "0.010 / 0.040 nats, goal <= 0.05: met" in text
    assert "faithful / dense = 0.53 (larger of the two KL ratios), goal <= 0.5: **missed**" in text
    assert "StrAF faithful / sbi NPE = 0.20, goal <= 0.25: met" in text
    assert "Tables not found: missing" in text

    # a glob entry is one comparison over seeds: its rows of a kind are averaged, and it overrides earlier rows
    (tmp_path / "old.json").write_text(json.dumps({"rows": [row("grf", "faithful", "skl", 9.0, 9.0)], "meta": {"seed": 0}}))
    for seed, (f, d) in enumerate([(0.010, 0.011), (0.020, 0.017)]):
        rows = [row("grf", "faithful", "skl", f, f), row("grf", "dense", "skl", d, d)]
        (tmp_path / f"side_s{seed}.json").write_text(json.dumps({"rows": rows, "meta": {"seed": seed}}))
    assert summary_main(["--lgbn", "old", "side_s*", "--circuit", "--circuit-goal", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "0.015 / 0.015 (mean of 2 seeds, `side_s*`)" in text and "(old)" not in text
    assert "`skl`, grf: faithful 0.015 / 0.015, dense 0.014 / 0.014 nats, faithful <= dense: **missed**" in text


def test_scaling_times_steps_in_a_memory_capped_child(monkeypatch):
    import resource

    import benchmarks.scaling as scaling

    monkeypatch.setattr(scaling, "_step_time", lambda *args: (0.25, 3))
    assert scaling._step_time_in_child(None, "skl", 8, 3, 1, 1.0, 64.0) == (0.25, 3)

    # a step that needs 8 GB more than the cap leaves: recorded as out of memory, the parent lives on
    used_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    monkeypatch.setattr(scaling, "_step_time", lambda *args: torch.empty(2 * 10**9).sum())
    with pytest.raises(RuntimeError, match="out of memory under a"):
        scaling._step_time_in_child(None, "skl", 8, 3, 1, 1.0, max(4.0, 3 * used_gib))


def test_sampling_benchmark_row_checks_the_sampler_on_a_tiny_network():
    from benchmarks.sampling import chain_network, time_network

    net = chain_network(num_latent=12, chain=8, num_obs=5, seed=1)
    assert len(net.latent_sites) == 12 and len(net.observed_sites) == 5
    row = time_network("tiny", net, num_obs=6, num_samples=7, repeats=1, seed=0)
    assert row["latents"] == 12 and row["depth"] >= 1
    assert row["max |z - z_ref|"] < 1e-4 and row["max |log q - log_prob(z)|"] < 1e-3
    assert row["sample (s)"] > 0 and row["flow density (s)"] > 0


def test_circuit_log_evidence_agrees_with_plain_prior_sampling():
    # an independent estimate: log mean_z p(x | z) over prior draws of the model itself
    import pyro

    from benchmarks.circuit import log_evidence
    from pyro_struct.models import arithmetic_circuit

    model = arithmetic_circuit()
    torch.manual_seed(0)
    with pyro.plate("sims", 1):
        trace = pyro.poutine.trace(model).get_trace()
    x0, x1 = trace.nodes["x0"]["value"].double(), trace.nodes["x1"]["value"].double()
    with pyro.plate("prior", 400_000):
        prior = pyro.poutine.trace(model).get_trace(x0=x0.float().expand(400_000), x1=x1.float().expand(400_000))
    log_lik = sum(prior.nodes[k]["fn"].log_prob(prior.nodes[k]["value"]).double() for k in ("x0", "x1"))
    plain = torch.logsumexp(log_lik, 0) - torch.log(torch.tensor(400_000.0, dtype=torch.float64))
    assert float(log_evidence(x0, x1, num_proposals=20_000)) == pytest.approx(float(plain), abs=0.05)


def test_circuit_seeds_records_curves_on_a_training_clock_and_writes_tables_and_figures(tmp_path):
    from benchmarks.circuit_seeds import main as seeds_main

    rc = seeds_main([
        "--families", "grf", "--structures", "faithful", "--objective-family", "grf", "--objectives", "fkl",
        "--seeds", "2", "--budget", "1.5", "--num-evals", "3", "--eval-sims", "50", "--evidence-proposals", "500",
        "--results-dir", str(tmp_path), "--out", "tiny", "--clock", "cpu",  # CPU seconds: steps as long at any load
    ])
    assert rc == 0
    runs = json.loads((tmp_path / "tiny_runs.json").read_text())
    assert sorted((r["objective"], r["seed"]) for r in runs) == [("fkl", 0), ("fkl", 1), ("skl", 0), ("skl", 1)]
    assert all(r["clock"] == "cpu" and r["budget"] == 1.5 for r in runs)
    for r in runs:
        curve = r["curve"]
        assert len(curve) == 4 and curve[0]["step"] == 0 and curve[0]["seconds"] == 0.0
        # evaluations are due at 0, 0.5, 1.0 and 1.5 training seconds and do not count as training time
        assert all(b["seconds"] >= k * 0.5 for k, b in enumerate(curve))
        assert all(a["step"] <= b["step"] and a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["seconds"] < 1.5 + 1.0 and r["steps"] == curve[-1]["step"]
        assert all(p["reverse_kl"] is not None and p["skl"] is not None for p in curve)
    table = json.loads((tmp_path / "tiny.json").read_text())
    assert {row["comparison"] for row in table["rows"]} == {"structures (Fig. 2)", "objectives (Fig. 3)"}
    assert "Goals (issue 18)" in table["notes"]
    assert (tmp_path / "tiny.png").stat().st_size > 0 and (tmp_path / "tiny_objectives.png").stat().st_size > 0

    # --merge keeps the cells this invocation does not run: fkl stays, skl is replaced, elbo is added
    rc = seeds_main([
        "--families", "grf", "--structures", "faithful", "--objective-family", "grf", "--objectives", "elbo",
        "--seeds", "1", "--first-seed", "7", "--budget", "0.5", "--num-evals", "1", "--eval-sims", "50",
        "--evidence-proposals", "500", "--results-dir", str(tmp_path), "--out", "tiny", "--merge",
    ])
    assert rc == 0
    merged = json.loads((tmp_path / "tiny_runs.json").read_text())
    assert sorted((r["objective"], r["seed"]) for r in merged) == [("elbo", 7), ("fkl", 0), ("fkl", 1), ("skl", 7)]

    # --runs-from trains nothing, and its settings are the runs' own (not this invocation's defaults)
    assert seeds_main(["--runs-from", str(tmp_path / "tiny_runs.json"), "--objective-family", "grf", "--results-dir", str(tmp_path),
                       "--out", "again", "--note", "These runs predate a default."]) == 0
    meta = json.loads((tmp_path / "again.json").read_text())["meta"]
    assert meta["budgets"] == ["0.5 s wall", "1.5 s cpu"] and meta["seeds_per_cell"] == [1, 2] and "seeds" not in meta
    report = (tmp_path / "again.md").read_text()
    assert "These runs predate a default.\n\nAnalysis:" in report


def _synthetic_run(structure, objective, seed, final, reverse_kl=None):
    curve = [{"seconds": float(k), "step": 10 * k, "skl": final + 4 - k, "reverse_kl": reverse_kl} for k in range(5)]
    return {"family": "cnf", "flow": "cnf", "structure": structure, "objective": objective, "seed": seed, "params": 1,
            "H_edges": 1, "clock": "cpu", "budget": 300.0, "curve": curve, "steps": 40, "note": None}


def test_circuit_seeds_runs_from_keeps_one_run_per_seed_and_kind_and_structures_prefer_structure_runs(tmp_path):
    from benchmarks.circuit_seeds import latest_per_seed, main as seeds_main

    old = [_synthetic_run("faithful", "skl", s, 1.0) for s in range(3)]
    new = [_synthetic_run("faithful", "skl", 1, 2.0, reverse_kl=0.5), _synthetic_run("faithful", "skl", 2, 4.0),
           _synthetic_run("faithful", "elbo", 1, 3.0, reverse_kl=0.4)]
    kept = latest_per_seed(old + new)
    # seed 2's re-run replaces its earlier run; seed 1's objective-comparison run is a run of another kind
    assert [(r["objective"], r["seed"], r["curve"][-1]["skl"]) for r in kept] == [
        ("skl", 0, 1.0), ("skl", 1, 1.0), ("skl", 2, 4.0), ("skl", 1, 2.0), ("elbo", 1, 3.0)]
    (tmp_path / "old_runs.json").write_text(json.dumps(old))
    (tmp_path / "new_runs.json").write_text(json.dumps(new))
    assert seeds_main(["--runs-from", str(tmp_path / "old_runs.json"), str(tmp_path / "new_runs.json"),
                       "--results-dir", str(tmp_path), "--out", "both"]) == 0
    rows = json.loads((tmp_path / "both.json").read_text())["rows"]
    fig2 = [r for r in rows if r["comparison"] == "structures (Fig. 2)"]
    # the structure row: seeds 0, 1 (its structure-only run, final 1.0) and 2 (the re-run, 4.0)
    assert [r["seeds"] for r in fig2] == [3] and fig2[0]["skl@100%"] == "2 ± 1.7"
    assert {r["objective"]: r["seeds"] for r in rows if r["comparison"] == "objectives (Fig. 3)"} == {"skl": 1, "elbo": 1}


def test_circuit_seeds_report_tells_resolved_from_unresolved_gaps_and_counts_seeds_per_cell(tmp_path):
    from benchmarks.circuit_seeds import main as seeds_main, sign_test

    # two-sided sign test: P(a split at least this uneven | fair coin)
    assert sign_test(5, 10) == 1.0 and sign_test(3, 10) == sign_test(7, 10) == 176 / 512
    assert sign_test(0, 10) == sign_test(10, 10) == 2 / 1024

    runs = [_synthetic_run("faithful", "skl", s, 1.0 + 0.01 * s) for s in range(10)]
    runs += [_synthetic_run("dense", "skl", s, 0.5 + 0.01 * s) for s in range(3)]  # dense lower, tight: resolved
    runs += [_synthetic_run("faithful", "elbo", s, 9.0, reverse_kl=2.0 + s) for s in range(2)]
    runs.append(_synthetic_run("faithful", "skl", 10, 1.05, reverse_kl=3.0))  # the only skl run with a reverse KL
    path = tmp_path / "syn_runs.json"
    path.write_text(json.dumps(runs))
    assert seeds_main(["--runs-from", str(path), "--results-dir", str(tmp_path), "--out", "syn"]) == 0
    table = json.loads((tmp_path / "syn.json").read_text())
    notes = table["notes"]
    assert "NO, at 25%" in notes and ": resolved)" in notes and "unresolved" not in notes
    assert "at equal steps (40): faithful 1.05 ± 0.029, dense 0.51 ± 0.01 nats" in notes
    # seeds 0-2 have both structures; dense is lower on each of them
    assert "paired by seed, faithful <= dense on: 25%: 0/3 seeds (sign test p = 0.25), median 4.01 vs 3.51;" in notes
    assert "seeds per cell: cnf dense skl: 3, Fig. 3 cnf faithful elbo: 2, Fig. 3 cnf faithful skl: 1;" in notes
    fig3 = {r["objective"]: r["seeds"] for r in table["rows"] if r["comparison"] == "objectives (Fig. 3)"}
    assert fig3 == {"skl": 1, "elbo": 2}

    # a gap smaller than the seeds' spread is reported, but as unresolved
    noisy = [_synthetic_run("faithful", "skl", s, 1.0 + s) for s in range(3)] + [_synthetic_run("dense", "skl", s, 0.9 + s) for s in range(3)]
    path.write_text(json.dumps(noisy))
    assert seeds_main(["--runs-from", str(path), "--results-dir", str(tmp_path), "--out", "syn"]) == 0
    notes = json.loads((tmp_path / "syn.json").read_text())["notes"]
    assert ": unresolved)" in notes and "100%: 0/3 seeds (sign test p = 0.25), median 2 vs 1.9." in notes

    # the FFJORD baseline is compared with faithful as dense is
    path.write_text(json.dumps(noisy + [_synthetic_run("ffjord", "skl", s, 2.0 + s) for s in range(3)]))
    assert seeds_main(["--runs-from", str(path), "--results-dir", str(tmp_path), "--out", "syn"]) == 0
    notes = json.loads((tmp_path / "syn.json").read_text())["notes"]
    assert "faithful <= ffjord (mean) at every budget fraction: yes." in notes
    assert "paired by seed, faithful <= ffjord on: 25%: 3/3 seeds" in notes


def test_circuit_seeds_ffjord_baseline_trains_the_cnf_with_a_full_field_and_only_the_cnf(tmp_path):
    from benchmarks.circuit_seeds import main as seeds_main

    with pytest.raises(SystemExit, match="--structures ffjord is a cnf baseline; run it with --families cnf, not grf"):
        seeds_main(["--families", "grf", "--structures", "ffjord", "--results-dir", str(tmp_path)])
    assert seeds_main([
        "--families", "cnf", "--structures", "ffjord", "--objective-family", "", "--seeds", "1", "--budget", "0.3",
        "--num-evals", "1", "--eval-sims", "20", "--evidence-proposals", "100", "--results-dir", str(tmp_path), "--out", "ff",
    ]) == 0
    (run,) = json.loads((tmp_path / "ff_runs.json").read_text())
    from benchmarks.circuit import make_guide

    dense = make_guide("cnf", "dense", {}, 0)
    # the full field has more unmasked weights than the lower-triangular dense one
    assert run["structure"] == "ffjord" and run["params"] > int(dense.structure.num_effective_parameters)


def test_circuit_seeds_clock_drives_training_progress_and_evaluates_outside_the_schedule():
    from benchmarks.circuit_seeds import _Clock

    class Follower:
        def __init__(self):
            self.seen = []

        def set_training_progress(self, progress):
            self.seen.append(progress)

    follower = Follower()
    clock = _Clock(10.0, [0.0], lambda: {"at_eval": follower.seen[-1]}, lambda g, s, b: 0.0, [follower])
    clock.objective(None, None, None)  # the evaluation at 0 s, then the first step
    clock.seconds = 4.0
    clock.objective(None, None, None)
    # evaluations run at the flow's final settings (progress None); steps see the clock's fraction
    assert clock.curve[0]["at_eval"] is None
    assert follower.seen[-1] >= 0.4 and follower.seen[1] == 0.0


def test_amortization_svi_recipe_converges_on_a_tiny_linear_gaussian_network():
    """The benchmark's tuned SVI baseline (its command-line defaults, fewer steps) must reach the exact
    posterior with AutoMultivariateNormal and its family's closed-form optimum with AutoNormal: a peer
    that is under-trained or mis-scored (the unit ``scale_tril`` alone as the covariance) fails here."""
    from benchmarks.amortization import svi_config, svi_one

    net = LinearGaussianNetwork.random(7, seed=3)
    obs_i = {k: v[0] for k, v in net.sample_observations(1, torch.Generator().manual_seed(1)).items()}
    sd = net.posterior_cov.diagonal().sqrt()
    assert (sd - 1).abs().max() > 0.3  # a unit-diagonal covariance would be far off
    cfg = {**svi_config(), "steps": 1000}
    mvn = svi_one(net, obs_i, "AutoMultivariateNormal", cfg, seed=0)
    assert mvn["trace"][0]["kl"] > 1.0  # it starts far from the posterior
    assert mvn["final"]["kl"] < 0.01 and mvn["converged"], mvn["final"]
    assert mvn["final"]["mean_err"] < 0.1 and mvn["final"]["sd_err"] < 0.1
    mf = svi_one(net, obs_i, "AutoNormal", cfg, seed=0)
    assert mf["converged"] and abs(mf["reverse_kl_gap_to_optimum"]) < 0.01, mf["reverse_kl_gap_to_optimum"]
    assert mf["final"]["kl"] == pytest.approx(mf["family_optimum_kl"], abs=0.02)


def test_amortization_mean_field_optimum_minimises_the_reverse_kl():
    from benchmarks.amortization import family_optimum
    from pyro_struct.models.linear_gaussian import gaussian_kl

    net = LinearGaussianNetwork.random(7, seed=3)
    obs_i = {k: v[0] for k, v in net.sample_observations(1, torch.Generator().manual_seed(1)).items()}
    mean_p, cov_p = net.exact_posterior(obs_i)
    m, c = family_optimum(net, obs_i, "AutoNormal")
    best = float(gaussian_kl(m, c, mean_p, cov_p))
    for factor in (0.9, 1.1):
        for i in range(c.shape[0]):
            worse = c.clone()
            worse[i, i] *= factor
            assert float(gaussian_kl(m, worse, mean_p, cov_p)) > best
    assert float(gaussian_kl(*family_optimum(net, obs_i, "AutoMultivariateNormal"), mean_p, cov_p)) == pytest.approx(0, abs=1e-9)


def test_circuit_random_structure_is_drawn_per_seed_and_keeps_the_faithful_edge_count():
    from benchmarks.circuit import make_guide

    def parents(g):
        return {v: tuple(g.inverse.parents(v)) for v in g.inverse.order}

    a, b = make_guide("straf", "random", {}, 0), make_guide("straf", "random", {}, 1)
    assert parents(a) != parents(b)
    assert a.inverse.num_edges == b.inverse.num_edges == make_guide("straf", "faithful", {}, 0).inverse.num_edges
    assert parents(make_guide("straf", "faithful", {}, 0)) == parents(make_guide("straf", "faithful", {}, 1))


def test_cnf_probe_off_structure_mass_is_zero_for_triangular_flows_and_not_for_ffjord():
    from benchmarks.circuit import make_guide
    from benchmarks.cnf_probe import off_structure_mass

    # a non-zero initial field (init_scale=1), so every flow moves its noise
    faithful = off_structure_mass(make_guide("cnf", "faithful", {"cnf": {"init_scale": 1.0}}, 0), num_draws=2)
    assert faithful == {"jacobian_outside_closure_H": 0.0, "jacobian_above_diagonal": 0.0}
    dense = off_structure_mass(make_guide("cnf", "dense", {"cnf": {"init_scale": 1.0}}, 0), num_draws=2)
    assert dense["jacobian_above_diagonal"] == 0.0 and dense["jacobian_outside_closure_H"] > 1e-6
    ffjord = make_guide("cnf", "dense", {"cnf": {"init_scale": 1.0, "velocity_mask": "full"}}, 0)
    full = off_structure_mass(ffjord, num_draws=2)
    assert full["jacobian_above_diagonal"] > 1e-6 and full["jacobian_outside_closure_H"] > 1e-6


def test_cnf_probe_timing_covers_faithful_dense_and_ffjord_fields(monkeypatch):
    import benchmarks.cnf_probe as probe

    monkeypatch.setattr(probe, "_best_ms", lambda fn, calls=20, repeats=7: (fn(), 1.0)[1])  # one call each, no timing
    rows = {(s, json.dumps(o)): probe.evaluation_costs(o, batch=8, structure=s) for s, o in probe.TIMED_FIELDS}
    faithful, dense = rows[("faithful", "{}")], rows[("dense", "{}")]
    ffjord = rows[("faithful", json.dumps({"velocity_mask": "full"}))]
    # the masks decide the parameters and the diagonal paths: FFJORD's field has every one
    assert faithful["params"] < dense["params"] < ffjord["params"]
    assert faithful["diagonal_paths"] < ffjord["diagonal_paths"] == faithful["state_dim"] * 64 * 64
    assert rows[("faithful", json.dumps({"augment": 10}))]["state_dim"] == 11 * faithful["state_dim"]


def test_flows_nfe_goal_pairs_seeds_and_says_when_it_is_missed():
    from benchmarks.flows import nfe_goal_lines

    def row(model, structure, seed, nfe, params):
        return {"model": model, "family": "cnf", "structure": structure, "seed": seed, "nfe_eq_acc": nfe, "params_eff": params}

    rows = [row("a", "faithful", 0, 27, 90), row("a", "dense", 0, 33, 100), row("a", "faithful", 1, 27, 90),
            row("a", "dense", 1, 27, 100), row("b", "faithful", 0, 54, 50), row("b", "dense", 0, 48, 100),
            row("b", "dense", 1, 10, 100)]  # seed 1 of b has no faithful run: not paired
    a, b = nfe_goal_lines(rows + [{**rows[0], "family": "straf", "nfe_eq_acc": None}])
    assert a.startswith("- a: NFE at equal accuracy faithful 27 ± 0, dense 30 ± 4.2 (2 seeds; faithful below dense on 1, equal on 1): met.")
    assert a.endswith("0.90 of dense's unmasked parameters.")
    assert b.startswith("- b: NFE at equal accuracy faithful 54, dense 48 (1 seeds; faithful below dense on 0, equal on 0): NOT met.")
    assert "0.50 of dense's" in b


def test_amortization_loads_bnlearn_networks_and_the_deep_chain():
    from benchmarks.amortization import load_network

    chain = load_network("deep_chain")
    assert (len(chain.latent_sites), len(chain.observed_sites)) == (64, 32)
    assert len(load_network("ecoli70").latent_sites) == 22
    with pytest.raises(ValueError, match="nope"):
        load_network("nope")


def test_amortization_only_keeps_the_other_methods_of_the_same_run_and_refuses_another(tmp_path, monkeypatch):
    import benchmarks.amortization as am

    monkeypatch.setattr(am, "RESULTS", tmp_path)
    args = am._parser().parse_args(["--network", "magic-niab", "--only", "svi"])
    with pytest.raises(SystemExit, match="does not exist; run without --only first"):
        am._earlier_result(args)
    config = {"network": "magic-niab", "seed": 0, "num_obs": 1000, "baseline_obs": 5}
    earlier = {"config": config, "machine": {}, "amortised": 1, "svi_AutoNormal": 2, "nuts": 3, "npe": 4, "comparison": 5}
    (tmp_path / "amortization_magic-niab.json").write_text(json.dumps(earlier))
    kept = {k for k in am._earlier_result(args) if am._method_of(k) not in (None, *args.only)}
    assert kept == {"amortised", "nuts", "npe"}  # svi is re-run; config, machine, comparison are recomputed
    other = am._parser().parse_args(["--network", "magic-niab", "--only", "svi", "--seed", "3"])
    with pytest.raises(SystemExit, match="other seed"):
        am._earlier_result(other)


def test_amortization_break_even_below_one_observation_is_not_printed_as_zero():
    from benchmarks.amortization import _break_even

    assert _break_even(0.002) == "< 1 (from the first observation)"
    assert _break_even(12.34) == "12.3" and _break_even(None) == "—"
