"""Writing benchmark tables: Markdown and JSON under ``benchmarks/results/`` with machine, versions and seeds."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["RESULTS_DIR", "environment", "library_commit", "markdown_table", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def library_commit() -> str | None:
    """The checkout's commit, with ``+changes`` when ``pyro_struct/`` differs from it (``None`` outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pyro_struct"], cwd=root, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+changes" if changed else "")


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded next to every table."""
    import networkx
    import pyro
    import torch

    try:
        import torchdiffeq

        tde = getattr(torchdiffeq, "__version__", "unknown")
    except ImportError:  # pragma: no cover - a dependency
        tde = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "networkx": networkx.__version__,
        "torchdiffeq": tde,
        "commit": library_commit(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e4 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), with ``columns`` in order (default: keys of the first row)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: Sequence[dict],
    columns: Sequence[str] | None = None,
    meta: dict | None = None,
    notes: str = "",
    results_dir: Path | str | None = None,
) -> str:
    """Print a table and write ``NAME.md`` and ``NAME.json`` (rows, meta, environment).

    Args:
        name: file stem under ``benchmarks/results``.
        rows: one dict per table row.
        columns: column order for the Markdown table.
        meta: settings of the run (seeds, budgets, ...), recorded verbatim.
        notes: free text printed under the table.

    Returns:
        The Markdown text.
    """
    out = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    meta = dict(meta or {})
    md = [f"# {name}", "", markdown_table(rows, columns)]
    if notes:
        md += [notes.strip(), ""]
    md += [
        "Settings: " + ", ".join(f"{k}={v}" for k, v in meta.items()) if meta else "",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
    ]
    text = "\n".join(md)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"rows": list(rows), "meta": meta, "environment": env, "notes": notes}, indent=2, default=str))
    print(text)
    return text
