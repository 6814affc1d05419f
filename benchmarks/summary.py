"""Summary of the ``lgbn`` and ``circuit`` tables against the issue's goals, built from the result files.

Reads the JSON tables under ``benchmarks/results/`` (no figure is typed in), puts the rows of
every regime side by side, and checks the goals of the defaults:

* ``lgbn``: the default guide (StrAF, faithful, ``"skl"``, 3 minutes) at most 0.05 nats of mean
  exact forward and reverse KL; with ``"fkl"`` and 5,000 simulations the faithful structure's KL
  at most half the dense structure's and at most a quarter of sbi NPE's.
* ``circuit``: the best flow's symmetrised-KL estimate at most 2 nats within 5 minutes, the
  faithful structure no worse than dense and far better than random at equal budget.

* ``lgbn`` ``skl``: the GRF's and the CNF's faithful rows at or below their dense rows (issue 18).

Later files override earlier ones for the same row (network, method, structure, regime, fit
options); a glob stem (``lgbn_s8_*_s[01]``) is one entry whose seeds of a row are averaged. Writes
``summary.md``.

Usage: ``python -m benchmarks summary [--lgbn STEM ...] [--circuit STEM ...] [--circuit-goal STEM ...]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import RESULTS_DIR, environment

__all__ = ["main", "load_rows", "lgbn_summary", "circuit_summary"]

#: the tables of the current library, oldest first (a later table's row replaces an earlier one's)
LGBN_TABLES = [
    "lgbn_skl_all_ecoli70", "lgbn_skl_straf_ecoli70", "lgbn_skl_all_magic-niab",
    "lgbn_fkl_ecoli70", "lgbn_fkl_magic-niab", "lgbn_fkl5000_cnf_ecoli70", "lgbn_fkl5000_cnf_magic-niab",
    "lgbn_fkl_cnf_500samples_ecoli70", "lgbn_fkl_cnf_500samples_magic-niab", "lgbn_fkl5000_wd0.3",
    # GRF and CNF, faithful and dense run side by side (equal load), seeds 0-1
    "lgbn_s8_*_s[01]", "lgbn_s9_*_mn_s[01]",
    # the CNF with its affine base layer (the default since the twelfth session), faithful and dense side by side
    "lgbn_s12_cnf_*_s0",
]
CIRCUIT_TABLES = ["circuit_grid_90s"]
CIRCUIT_GOAL_TABLES = ["circuit_300s_spline3_lr1e-2_faithful", "circuit_300s_spline3_lr1e-2_dense", "circuit_300s_spline3_lr1e-2_random"]
REGIMES = ["skl", "fkl1000", "fkl5000", "fkl20000"]
KL_GOAL = 0.05


def load_rows(stems, results_dir: Path = RESULTS_DIR) -> tuple[list[dict], list[str]]:
    """Rows of the tables ``stems`` (each row gets ``_table``, ``_fit``, ``_budget`` and ``_seed``: its
    stem, fit options, wall-clock budget and seed), and the stems that matched no file. A stem may be
    a glob (``lgbn_s8_*_s[01]``): its tables are one entry, whose rows of the same kind are seeds of one
    comparison (:func:`lgbn_summary` averages them)."""
    rows, missing = [], []
    for stem in stems:
        paths = sorted(Path(results_dir).glob(f"{stem}.json"))
        if not paths:
            missing.append(stem)
        for path in paths:
            table = json.loads(path.read_text())
            fit = table["meta"].get("fit_options") or {}
            extra = {"_table": stem, "_fit": json.dumps(fit, sort_keys=True) if fit else "",
                     "_budget": table["meta"].get("budget"), "_seed": table["meta"].get("seed")}
            rows.extend({**r, **extra} for r in table["rows"])
    return rows, missing


def _latest_by_kind(rows: list[dict]) -> dict:
    """(network, method, structure, regime, fit) -> the row of the latest table entry that has it; where
    that entry (a glob) has several seeds of the kind, their mean KLs, with ``_seeds`` set to how many."""
    groups: dict = {}
    for r in rows:
        if "forward_kl" not in r:
            continue
        key = (r["network"], r["method"], r["structure"], r["regime"], r["_fit"])
        if key in groups and groups[key][0]["_table"] == r["_table"]:
            groups[key].append(r)
        else:  # a later entry replaces the earlier rows of this kind
            groups[key] = [r]
    latest = {}
    for key, rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("forward_kl", "reverse_kl", "train_s") if all(r.get(k) is not None for r in rs)}
        latest[key] = {**rs[-1], **mean, "_seeds": len(rs)}
    return latest


def _fmt(v) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _source(row: dict) -> str:
    return row["_table"] if row["_seeds"] == 1 else f"mean of {row['_seeds']} seeds, `{row['_table']}`"


def lgbn_summary(rows: list[dict]) -> list[str]:
    """Markdown lines: one table per network (method x structure by regime) and the goal checks."""
    latest = _latest_by_kind(rows)
    out = []
    for network in sorted({k[0] for k in latest}):
        out += [f"### {network}", "", "Mean exact KL, forward / reverse (nats); table of each row in brackets.", ""]
        kinds = sorted({k[1:3] + (k[4],) for k in latest if k[0] == network})
        out += ["| method | structure | " + " | ".join(REGIMES) + " |", "|---|---|" + "---|" * len(REGIMES)]
        for method, structure, fit in kinds:
            cells = []
            for regime in REGIMES:
                r = latest.get((network, method, structure, regime, fit))
                cells.append("" if r is None else f"{_fmt(r['forward_kl'])} / {_fmt(r['reverse_kl'])} ({_source(r)})")
            label = method + (f" {fit}" if fit else "")
            out.append(f"| {label} | {structure} | " + " | ".join(cells) + " |")
        out.append("")

        def get(method, structure, regime):
            return latest.get((network, method, structure, regime, ""))

        default = get("straf", "faithful", "skl")
        if default is not None:
            ok = default["forward_kl"] <= KL_GOAL and default["reverse_kl"] <= KL_GOAL
            out.append(
                f"- Default guide, `skl`, {default['train_s']:.0f} s: {_fmt(default['forward_kl'])} / "
                f"{_fmt(default['reverse_kl'])} nats, goal <= {KL_GOAL}: {_check(ok)}."
            )
        for flow in ("grf", "cnf"):
            faithful, dense = get(flow, "faithful", "skl"), get(flow, "dense", "skl")
            if faithful is not None and dense is not None:
                ok = faithful["forward_kl"] <= dense["forward_kl"] and faithful["reverse_kl"] <= dense["reverse_kl"]
                out.append(f"- `skl`, {flow}: faithful {_fmt(faithful['forward_kl'])} / {_fmt(faithful['reverse_kl'])}, dense "
                           f"{_fmt(dense['forward_kl'])} / {_fmt(dense['reverse_kl'])} nats, faithful <= dense: {_check(ok)}.")
        for flow in ("straf", "grf", "cnf"):
            faithful, dense = get(flow, "faithful", "fkl5000"), get(flow, "dense", "fkl5000")
            if faithful is None or dense is None:
                continue
            ratio = max(faithful["forward_kl"] / dense["forward_kl"], faithful["reverse_kl"] / dense["reverse_kl"])
            line = f"- `fkl5000`, {flow}: faithful / dense = {ratio:.2f} (larger of the two KL ratios)"
            out.append(line + (f", goal <= 0.5: {_check(ratio <= 0.5)}." if flow == "straf" else "."))
        faithful, npe = get("straf", "faithful", "fkl5000"), get("sbi NPE", "dense", "fkl5000")
        if faithful is not None and npe is not None:
            ratio = max(faithful["forward_kl"] / npe["forward_kl"], faithful["reverse_kl"] / npe["reverse_kl"])
            out.append(f"- `fkl5000`: StrAF faithful / sbi NPE = {ratio:.2f}, goal <= 0.25: {_check(ratio <= 0.25)}.")
        out.append("")
    return out


def circuit_summary(grid: list[dict], goal: list[dict]) -> list[str]:
    """Markdown lines: the equal-budget grid (symmetrised KL by flow x objective x structure) and the goal rows."""
    out = []
    if grid:
        budget = {r["_table"]: r.get("_budget") for r in grid}
        out += [f"Equal wall-clock grid ({', '.join(f'{t}: {b:.0f} s per row' for t, b in budget.items() if b)}): "
                "symmetrised-KL estimate on 1,000 fresh simulations (nats), faithful / dense / random.", ""]
        out += ["| flow | objective | faithful | dense | random | steps (faithful) |", "|---|---|---|---|---|---|"]
        cell = {(r["flow"], r["objective"], r["structure"]): r for r in grid}
        for flow in dict.fromkeys(r["flow"] for r in grid):
            for objective in dict.fromkeys(r["objective"] for r in grid):
                vals = [cell.get((flow, objective, s)) for s in ("faithful", "dense", "random")]
                if not any(vals):
                    continue
                text = [_fmt(v["skl_1000_sims"]) if v else "" for v in vals]
                steps = vals[0]["steps"] if vals[0] else ""
                out.append(f"| {flow} | {objective} | " + " | ".join(text) + f" | {steps} |")
        out.append("")
        ranks = {}
        for flow in dict.fromkeys(r["flow"] for r in grid):
            for objective in dict.fromkeys(r["objective"] for r in grid):
                f, d, x = (cell.get((flow, objective, s)) for s in ("faithful", "dense", "random"))
                if f and d and x:
                    ranks[(flow, objective)] = (f["skl_1000_sims"] <= d["skl_1000_sims"], f["skl_1000_sims"] < x["skl_1000_sims"])
        if ranks:
            out.append(
                f"- faithful <= dense in {sum(a for a, _ in ranks.values())} of {len(ranks)} flow x objective cells; "
                f"faithful < random in {sum(b for _, b in ranks.values())} of {len(ranks)}."
            )
            out.append("")
    if goal:
        by = {r["structure"]: r for r in goal}
        f = by.get("faithful")
        if f is not None:
            line = (f"- Goal rows ({', '.join(sorted({r['_table'] for r in goal}))}): {f['flow']} faithful "
                    f"{_fmt(f['skl_1000_sims'])} nats after {f.get('_budget') or 0:.0f} s, goal <= 2: {_check(f['skl_1000_sims'] <= 2)}")
            if "dense" in by and "random" in by:
                d, x = by["dense"]["skl_1000_sims"], by["random"]["skl_1000_sims"]
                line += (f"; dense {_fmt(d)}, random {_fmt(x)}: faithful no worse than dense "
                         f"{_check(f['skl_1000_sims'] <= d)}, far better than random {_check(f['skl_1000_sims'] * 10 < x)}")
            out.append(line + ".")
            out.append("")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks summary", description=__doc__.splitlines()[0])
    p.add_argument("--lgbn", nargs="*", default=LGBN_TABLES, help="lgbn table stems, oldest first")
    p.add_argument("--circuit", nargs="*", default=CIRCUIT_TABLES, help="circuit grid table stems")
    p.add_argument("--circuit-goal", nargs="*", default=CIRCUIT_GOAL_TABLES, help="circuit 5-minute goal table stems")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--out", default="summary")
    args = p.parse_args(argv)
    results = Path(args.results_dir)
    lgbn_rows, missing = load_rows(args.lgbn, results)
    grid, missing_grid = load_rows(args.circuit, results)
    goal, missing_goal = load_rows(args.circuit_goal, results)
    lines = ["# Benchmark summary", "", "Built by `python -m benchmarks summary` from the tables named in each cell.", ""]
    lines += ["## lgbn: exact KL on linear-Gaussian networks", ""] + lgbn_summary(lgbn_rows)
    lines += ["## circuit", ""] + circuit_summary(grid, goal)
    absent = missing + missing_grid + missing_goal
    if absent:
        lines += ["Tables not found: " + ", ".join(absent), ""]
    env = environment()
    lines += ["Summary built on: " + ", ".join(f"{k}={env[k]}" for k in ("date", "torch", "pyro")), ""]
    text = "\n".join(lines)
    (results / f"{args.out}.md").write_text(text)
    print(text)
    return 0
