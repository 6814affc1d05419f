"""Tests of the ``pyro-struct`` command line: demo, inspect, fit, posterior and the error paths."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_struct.cli import main

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models_for_cli.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ref(name):
    return f"{MODELS}:{name}"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _line(text, prefix):
    return next(line for line in text.splitlines() if line.strip().startswith(prefix))


def _is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_runs_and_writes_the_report(tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = run(
        capsys, "demo", "--steps", 200, "--out", out_dir, "--no-progress", "--samples", 400, "--kl-samples", 64
    )
    assert code == 0, err
    for name in ("adjacency.png", "graphs.png", "masks.png", "loss.png", "posterior.png"):
        assert _is_png(out_dir / name), name
    for name in ("structure.json", "summary.json", "guide.pt"):
        assert (out_dir / name).stat().st_size > 0, name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 200 and len(summary["loss_history"]) >= 200
    assert math.isfinite(summary["symmetrized_kl"]["estimate"])
    latents = ["z0", "z1", "z2", "z3", "z4", "z5"]
    assert [r["name"] for r in summary["posterior"]["summary"]] == latents
    fresh = summary["fresh"]["summary"]
    assert [r["name"] for r in fresh] == latents and all("true" in r for r in fresh)
    for r in summary["posterior"]["summary"] + fresh:
        assert r["lower"] <= r["mean"] <= r["upper"] and r["sd"] > 0
    assert "posterior for x0=0.3, x1=5.2" in out
    assert "expected symmetrised KL" in out
    assert out.count("z3 ") >= 2  # one row per summary table
    # the saved guide is a working guide of the circuit
    from pyro_struct import StructuredGuide
    from pyro_struct.models import arithmetic_circuit

    guide = StructuredGuide.load(out_dir / "guide.pt", arithmetic_circuit())
    samples = guide.posterior(x0=torch.tensor(0.3), x1=torch.tensor(5.2)).sample(5)
    assert set(samples) == set(latents)


# ---------------------------------------------------------------------------- inspect
def test_inspect_prints_edge_counts_and_writes_json_and_plots(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", ref("overlap"), "--observed", "x", "--out", tmp_path / "s")
    assert code == 0, err
    data = json.loads((tmp_path / "s" / "structure.json").read_text())
    # what is printed is what was compiled (the counts come from the library, not typed in)
    import pyro_struct as ps
    from tests.models_for_cli import overlap

    bn = ps.trace_model(overlap, observed=["x"])
    inv = ps.faithful_inverse(bn)
    assert f"{bn.num_edges} edges" in _line(out, "model G:") and f"{inv.num_edges} edges" in _line(out, "inverse H:")
    assert data["model"]["num_edges"] == bn.num_edges and data["inverse"]["num_edges"] == inv.num_edges
    assert f"z[1] <- {', '.join(inv.parents('z[1]'))}" in out
    assert data["model"]["num_edges"] == 4 and data["inverse"]["num_edges"] == 6
    assert sorted(map(tuple, data["model"]["edges"])) == sorted(
        [("z[0]", "x[0]"), ("z[1]", "x[0]"), ("z[1]", "x[1]"), ("z[2]", "x[1]")]
    )
    for name in ("adjacency.png", "graphs.png", "masks.png"):
        assert _is_png(tmp_path / "s" / name)


def test_inspect_a_factory_with_kwargs_and_no_flow(tmp_path, capsys):
    code, out, err = run(
        capsys, "inspect", ref("chain_factory"), "--kwargs", '{"length": 4}', "--observed", "x", "--flow", "none",
        "--out", tmp_path / "c", "--no-plots",
    )
    assert code == 0, err
    # a chain of 4 latents: depth 3, one edge per link
    assert "4 latent + 1 observed" in _line(out, "model G:")
    assert "4 edges, depth 3" in _line(out, "inverse H:")
    assert "parameters:" not in out
    assert (tmp_path / "c" / "structure.json").is_file()
    assert not (tmp_path / "c" / "adjacency.png").exists()


def test_inspect_dense_structure_has_all_autoregressive_edges(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", ref("overlap"), "--observed", "x", "--structure", "dense", "--flow", "none", "--no-plots",
                         "--out", tmp_path)
    assert code == 0, err
    d, c = 3, 2  # latents and observed coordinates of the overlap model
    assert f"{d * (d - 1) // 2 + d * c} edges" in _line(out, "inverse H:")  # every autoregressive entry


# ---------------------------------------------------------------------------- fit and posterior
@pytest.fixture(scope="module")
def trained_guide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    path = folder / "guide.pt"
    code = main(["fit", ref("chain"), "--observed", "x", "--out", str(path), "--steps", "150", "--no-progress", "--hidden", "16",
                 "--batch-size", "64", "--lr", "0.01"])
    assert code == 0
    return path


def test_fit_then_posterior_round_trips_through_files(trained_guide, tmp_path, capsys):
    obs = tmp_path / "obs.json"
    obs.write_text(json.dumps({"x": 1.5}))
    post_json = tmp_path / "post.json"
    code, out, err = run(capsys, "posterior", trained_guide, ref("chain"), "--obs", obs, "--samples", 2000,
                         "--out", post_json)
    assert code == 0, err
    for site in ("z1", "z2", "z3"):
        assert site in out
    data = json.loads(post_json.read_text())
    assert [r["name"] for r in data["summary"]] == ["z1", "z2", "z3"]
    samples = {k: torch.tensor(v) for k, v in data["samples"].items()}
    assert all(v.shape == (2000,) for v in samples.values())
    # the CLI's answer is the saved guide's answer
    from pyro_struct import StructuredGuide
    from tests.models_for_cli import chain

    guide = StructuredGuide.load(trained_guide, chain)
    reference = guide.posterior(x=torch.tensor(1.5)).sample(4000)
    for r in data["summary"]:
        ref_mean = float(reference[r["name"]].mean())
        ref_sd = float(reference[r["name"]].std())
        assert abs(r["mean"] - ref_mean) < 5 * ref_sd * math.sqrt(1 / 2000 + 1 / 4000)
        assert r["sd"] == pytest.approx(ref_sd, rel=0.15)
    # the guide was trained: its means are near the exact Gaussian posterior's (prior means are 0)
    # z1 ~ N(0, 1), z2 ~ N(z1, 0.5^2), z3 ~ N(z2, 0.5^2), x ~ N(z3, 0.3^2): Cov(z_k, x) / Var(x) * x
    var_x = 1 + 0.25 + 0.25 + 0.09
    exact = {"z1": 1 / var_x * 1.5, "z2": 1.25 / var_x * 1.5, "z3": 1.5 / var_x * 1.5}
    for r in data["summary"]:
        assert abs(r["mean"] - exact[r["name"]]) < 0.3, r


def test_posterior_of_a_batch_of_observations(trained_guide, tmp_path, capsys):
    obs = tmp_path / "obs.json"
    obs.write_text(json.dumps({"x": [-2.0, 2.0]}))
    code, out, err = run(capsys, "posterior", trained_guide, ref("chain"), "--obs", obs, "--samples", 500,
                         "--out", tmp_path / "p.json")
    assert code == 0, err
    data = json.loads((tmp_path / "p.json").read_text())
    assert [entry["index"] for entry in data["summary"]] == [[0], [1]]
    low, high = (entry["summary"][2]["mean"] for entry in data["summary"])
    assert low < high
    assert torch.tensor(data["samples"]["z3"]).shape == (500, 2)


# ---------------------------------------------------------------------------- errors
def _bad_cases(tmp_path, guide):
    good_obs = tmp_path / "obs.json"
    good_obs.write_text(json.dumps({"x": 0.5}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    unknown_site = tmp_path / "unknown.json"
    unknown_site.write_text(json.dumps({"x": 0.5, "y": 1.0}))
    not_a_guide = tmp_path / "not_a_guide.pt"
    not_a_guide.write_text("hello")
    syntax_error = tmp_path / "syntax.py"
    syntax_error.write_text("def model(:\n    pass\n")
    return {
        "no command": [],
        "unknown command": ["bogus"],
        "steps not an int": ["demo", "--steps", "abc"],
        "negative steps": ["demo", "--steps", "-5"],
        "zero threads": ["--threads", "0", "demo"],
        "unknown flow": ["fit", ref("chain"), "--out", tmp_path / "g.pt", "--flow", "nope"],
        "missing --out": ["fit", ref("chain")],
        "nothing observed": ["fit", ref("chain"), "--out", tmp_path / "g.pt", "--steps", 1],
        "missing file": ["inspect", tmp_path / "nowhere.py:model"],
        "no function part": ["inspect", MODELS],
        "missing function": ["inspect", ref("nope")],
        "not a function": ["inspect", ref("NOT_A_FUNCTION")],
        "syntax error": ["inspect", f"{syntax_error}:model"],
        "model raises": ["inspect", ref("broken")],
        "discrete latent": ["inspect", ref("discrete"), "--no-plots", "--out", tmp_path / "d"],
        "unknown observed site": ["inspect", ref("chain"), "--observed", "nope", "--no-plots", "--out", tmp_path / "o"],
        "bad kwargs": ["inspect", ref("chain_factory"), "--kwargs", "{bad"],
        "bad hidden": ["fit", ref("chain"), "--out", tmp_path / "g.pt", "--hidden", "a,b"],
        "missing guide": ["posterior", tmp_path / "missing.pt", ref("chain"), "--obs", good_obs],
        "not a guide": ["posterior", not_a_guide, ref("chain"), "--obs", good_obs],
        "guide for another model": ["posterior", guide, ref("overlap"), "--obs", good_obs],
        "obs not json": ["posterior", guide, ref("chain"), "--obs", bad_json],
        "obs missing": ["posterior", guide, ref("chain"), "--obs", tmp_path / "none.json"],
        "obs unknown site": ["posterior", guide, ref("chain"), "--obs", unknown_site],
    }


CASES = [
    "no command", "unknown command", "steps not an int", "negative steps", "zero threads", "unknown flow", "missing --out", "nothing observed",
    "missing file", "no function part", "missing function", "not a function", "syntax error", "model raises",
    "discrete latent", "unknown observed site", "bad kwargs", "bad hidden", "missing guide", "not a guide",
    "guide for another model", "obs not json", "obs missing", "obs unknown site",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_give_one_line_and_a_nonzero_exit(case, trained_guide, tmp_path, capsys):
    argv = _bad_cases(tmp_path, trained_guide)[case]
    code, out, err = run(capsys, *argv)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyro-struct: error: ")
    assert "Traceback" not in err + out


def test_usage_errors_exit_2_and_failures_exit_1(capsys):
    assert run(capsys, "demo", "--steps", "abc")[0] == 2
    assert run(capsys, "inspect", ref("nope"))[0] == 1


def test_console_script_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_struct.cli", "inspect", str(tmp_path / "missing.py") + ":model"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"pyro-struct: error: cannot read model file '{tmp_path / 'missing.py'}': no such file"]
    assert proc.stdout == ""
