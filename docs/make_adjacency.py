"""Draw ``docs/adjacency.png``: the compiled adjacency of the deconvolution model, for the README.

Run from the repository root: ``python docs/make_adjacency.py``.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402

import pyro_struct as ps  # noqa: E402
from pyro_struct.models import deconvolution  # noqa: E402

__all__ = ["main"]


def main(path: Path = Path(__file__).resolve().parent / "adjacency.png") -> Path:
    """Trace the 9x9 / 3x3 / stride-2 deconvolution model, invert it and save the adjacency plot."""
    pyro.set_rng_seed(0)
    bn = ps.trace_model(deconvolution(), observed=["kernel", "output"])
    structure = ps.CompiledStructure(bn, ps.faithful_inverse(bn))
    fig, ax = plt.subplots(figsize=(8.5, 7))
    title = (
        f"deconvolution: faithful inverse, {int(structure.adjacency.sum())} of "
        f"{structure.num_dense_entries} dense entries, depth {structure.depth}"
    )
    structure.plot_adjacency(path, ax=ax, title=title)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(main())
