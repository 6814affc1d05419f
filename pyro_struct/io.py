"""Files the package writes and reads: one atomic writer, guide payloads and their compatibility checks."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "GUIDE_FORMAT",
    "atomic_save",
    "atomic_write_text",
    "read_payload",
    "check_compatible",
]

#: the ``format`` tag of files written by :meth:`pyro_struct.StructuredGuide.save` and by training checkpoints
GUIDE_FORMAT = "pyro_struct.StructuredGuide/1"


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], suffix: str, binary: bool) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        # the temporary file never outlives a failed write (an interrupt included)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A reader never sees a half-written file, and the temporary file is removed on any failure.
    """
    _atomic(path, lambda f: torch.save(obj, f), ".pt", binary=True)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (same guarantees as :func:`atomic_save`)."""
    _atomic(path, lambda f: f.write(text), ".tmp", binary=False)


def read_payload(path: str | os.PathLike, map_location=None, format: str = GUIDE_FORMAT, what: str = "guide") -> dict:
    """Read a payload written with :func:`atomic_save` and check its ``format`` tag.

    Args:
        path: the file.
        map_location: passed to ``torch.load`` (default: the CPU).
        format: the expected ``format`` entry.
        what: what the file holds, for messages.

    Returns:
        The payload dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file of that format (the message names the file).
    """
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path!r} is not a pyro_struct {what} file ({first})") from e
    if not isinstance(payload, dict) or payload.get("format") != format:
        raise ValueError(f"{path!r} is not a pyro_struct {what} file (format {format!r})")
    return payload


def check_compatible(payload: Mapping, bn_dict: Mapping, order: list, observed: list, adjacency: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming what differs when ``payload`` was saved for another structure.

    Args:
        payload: a guide payload (see :func:`read_payload`).
        bn_dict: ``BayesNet.to_dict()`` of the model the payload is loaded against.
        order, observed: the inverse structure's latent order and observed nodes.
        adjacency: the compiled ``(d, d + c)`` adjacency.
    """
    saved = payload["bn"]
    saved_sites = {s["name"]: s for s in saved["sites"]}
    here_sites = {s["name"]: s for s in bn_dict["sites"]}
    if list(saved_sites) != list(here_sites):
        raise ValueError(
            f"the saved guide was compiled for sites {list(saved_sites)} but the model has "
            f"{list(here_sites)}; load it against the model it was trained for"
        )
    for name, s in saved_sites.items():
        h = here_sites[name]
        for key in ("shape", "observed", "support"):
            if s[key] != h[key]:
                raise ValueError(
                    f"site {name!r}: {key} is {s[key]} in the saved guide but {h[key]} in the model; "
                    "load it against the model it was trained for"
                )
    saved_edges = {tuple(e) for e in saved["edges"]}
    here_edges = {tuple(e) for e in bn_dict["edges"]}
    if saved_edges != here_edges:
        extra = sorted(saved_edges - here_edges)[:3]
        missing = sorted(here_edges - saved_edges)[:3]
        raise ValueError(
            "the model's dependency structure differs from the saved guide's: edges only in the file "
            f"{extra}, edges only in the model {missing}; load it against the model it was trained for"
        )
    if list(payload["order"]) != list(order) or list(payload["observed_nodes"]) != list(observed):
        raise ValueError("the inverse structure's node order differs from the saved guide's")
    if not torch.equal(payload["adjacency"].bool().cpu(), torch.as_tensor(adjacency).bool().cpu()):
        raise ValueError("the compiled adjacency differs from the saved guide's (different inversion?)")
