"""Inspection of a compiled guide: the model graph, its inverse, the masks, parameter counts and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from .io import atomic_write_text
from . import dag
from .flows.base import ConditionalFlow
from .nn import MaskedLinear, MaskedMLP, masked_layers, masks_of, parameter_counts

__all__ = ["CompiledStructure", "hinton", "plot_loss", "plot_marginals"]

# Beyond these sizes the plots switch to coarser drawings (site-level ticks, no node labels,
# site-level graphs, heat maps instead of Hinton squares) so that they stay readable and fast.
_MAX_TICK_LABELS = 48
_MAX_LABELLED_NODES = 60
_MAX_SCALAR_GRAPH_NODES = 1500
_MAX_ARROW_EDGES = 2000
_MAX_HINTON_ENTRIES = 40_000
_MAX_TEXT_COLUMNS = 40


def _pyplot():
    """``matplotlib.pyplot`` on a non-interactive backend unless one was chosen already.

    Notebooks keep their inline backend; scripts and the command line get Agg so that
    plotting never needs a display.
    """
    import matplotlib

    backend = matplotlib.get_backend().lower()
    if "inline" not in backend and "ipympl" not in backend and "widget" not in backend:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path):
    """Save ``fig`` to ``path`` (if given) and return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def hinton(ax, weight: torch.Tensor, mask: torch.Tensor | None = None, title: str | None = None):
    """Draw a Hinton diagram of ``weight`` on ``ax``.

    Each entry is a square whose area is proportional to its magnitude, white for positive
    and black for negative values, on a grey background; entries that ``mask`` removes are
    drawn as pale cells. Rows are outputs and columns inputs (``nn.Linear.weight``'s layout).
    Matrices with more than 40,000 entries are drawn as a heat map instead.

    Args:
        ax: a matplotlib axes.
        weight: ``(out, in)`` tensor.
        mask: ``(out, in)`` bool tensor or ``None`` (everything allowed).
        title: axes title.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    W = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    rows, cols = W.shape
    M = torch.ones(rows, cols, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to("cpu").bool()
    background = ListedColormap(["#ececec", "#808080"])
    ax.imshow(M.to(torch.float32).numpy(), cmap=background, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    scale = float(W.abs().max())
    if rows * cols > _MAX_HINTON_ENTRIES:
        # too many squares to draw: a signed heat map over the allowed entries
        shown = (W / max(scale, 1e-300)).masked_fill(~M, float("nan")).numpy()
        ax.imshow(shown, cmap="gray", vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
    elif scale > 0:
        squares, colours = [], []
        for i, j in torch.nonzero(W != 0).tolist():
            side = math.sqrt(abs(float(W[i, j])) / scale)
            squares.append(Rectangle((j - side / 2, i - side / 2), side, side))
            colours.append("white" if W[i, j] > 0 else "black")
        ax.add_collection(PatchCollection(squares, facecolors=colours, edgecolors="none"))
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"in ({cols})", fontsize=7)
    ax.set_ylabel(f"out ({rows})", fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)


class CompiledStructure:
    """Everything that was compiled for one guide: graphs, adjacency, masks, counts and plots.

    Reached as ``guide.structure`` (or ``model.structure`` for an :func:`~pyro_struct.amortize`
    model); it can also be built by hand from a BayesNet and an inverse structure, with or
    without a flow.

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet` ``G``.
        inverse: the :class:`~pyro_struct.InverseStructure` ``H`` compiled into the flow.
        flow: the compiled :class:`~pyro_struct.flows.base.ConditionalFlow` (optional). Its
            adjacency must have shape ``(n_latent, n_latent + n_observed)`` of ``inverse``.
        guide: the guide that owns the flow (optional; used for the summary's header).

    Attributes:
        model_graph: ``G`` as a ``networkx.DiGraph`` over scalar nodes.
        inverse_graph: ``H`` as a ``networkx.DiGraph`` (edge parent -> child).
        adjacency: ``(d, d + n_obs)`` bool tensor, ``A[i, j]`` iff latent ``row_labels[i]``
            may depend on ``col_labels[j]`` (latents in sampling order, then observed).
        row_labels, col_labels: node labels of the rows and columns of :attr:`adjacency`.
        masks: ``{module name: (out, in) bool mask}`` of every masked layer of the flow.
        depth: edges on the longest path among latents in ``H``.
        num_passes: sequential network evaluations one sampling call needs (the flow's own
            ``num_passes``: ``num_layers * (depth + 1)`` for StrAF, ``num_layers`` for the GRF, the
            last solve's NFE for the CNF; ``depth + 1`` without a flow).

    Example:
        >>> from pyro_struct import BayesNet, faithful_inverse
        >>> bn = BayesNet.from_edges([("z1", "z2"), ("z2", "x")], observed=["x"])
        >>> s = CompiledStructure(bn, faithful_inverse(bn))
        >>> s.adjacency.shape, s.depth
        (torch.Size([2, 3]), 1)
    """

    def __init__(self, bn, inverse, flow=None, guide=None):
        self.bn = bn
        self.inverse = inverse
        self.flow = flow
        self.guide = guide
        self.row_labels: list[str] = list(getattr(inverse, "row_labels", None) or inverse.order)
        self.col_labels: list[str] = list(getattr(inverse, "col_labels", None) or (list(inverse.order) + list(inverse.observed)))
        # a plate flow (PlatedStrAF) has no per-coordinate adjacency: its template's H is shown
        if flow is not None and hasattr(flow, "adjacency"):
            A = torch.as_tensor(flow.adjacency).detach().to("cpu").bool().clone()
        else:
            A = torch.as_tensor(inverse.adjacency()).detach().to("cpu").bool().clone()
        if tuple(A.shape) != (len(self.row_labels), len(self.col_labels)):
            raise ValueError(
                f"the flow's adjacency has shape {tuple(A.shape)} but the inverse structure has "
                f"{len(self.row_labels)} latent and {len(self.col_labels) - len(self.row_labels)} observed "
                "coordinates; compile the flow from inverse.adjacency()"
            )
        self.adjacency: torch.Tensor = A

    # ------------------------------------------------------------------ graphs
    @property
    def model_graph(self) -> nx.DiGraph:
        """The model ``G`` over scalar nodes (``networkx.DiGraph``; edge ``u -> v``: ``v`` depends on ``u``)."""
        return self.bn.graph

    @property
    def inverse_graph(self) -> nx.DiGraph:
        """The inverse ``H`` over latent and observed scalar nodes (edge parent -> child)."""
        return self.inverse.graph

    @property
    def num_latent(self) -> int:
        """Number of latent (unconstrained) coordinates ``d``."""
        return len(self.row_labels)

    @property
    def num_observed(self) -> int:
        """Number of observed coordinates (context columns)."""
        return len(self.col_labels) - len(self.row_labels)

    @property
    def depth(self) -> int:
        """Edges on the longest path among latents in ``H``."""
        depth = getattr(self.inverse, "depth", None)
        if depth is None:
            depth = dag.depth(self.adjacency)
        return int(depth)

    @property
    def num_passes(self) -> int | None:
        """Sequential network evaluations that one sampling call needs.

        The flow's :attr:`~pyro_struct.flows.ConditionalFlow.num_passes` (``None`` for a CNF that
        has not sampled yet); without a flow, ``depth + 1`` (the passes of a one-layer StrAF).
        """
        if isinstance(self.flow, ConditionalFlow) or hasattr(self.flow, "num_passes"):
            return self.flow.num_passes
        return self.depth + 1

    @property
    def num_dense_entries(self) -> int:
        """Entries a dense autoregressive inverse would allow: ``d (d - 1) / 2 + d n_obs``."""
        d, m = self.num_latent, self.num_observed
        return d * (d - 1) // 2 + d * m

    @property
    def sparsity(self) -> float:
        """Fraction of the dense autoregressive pattern that the compiled adjacency keeps."""
        dense = self.num_dense_entries
        return float(self.adjacency.sum()) / dense if dense else 0.0

    # ------------------------------------------------------------------ masks and counts
    def _masked_layers(self) -> dict[str, MaskedLinear]:
        return {} if self.flow is None else masked_layers(self.flow)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{module name: (out, in) bool mask}`` of every masked layer of the flow, in module order.

        Empty when no flow was compiled.
        """
        if self.flow is None:
            return {}
        return self.flow.masks if isinstance(self.flow, ConditionalFlow) else masks_of(self.flow)

    @property
    def masked_weights(self) -> dict[str, torch.Tensor]:
        """``{module name: (out, in) weight * mask}`` of every masked layer (detached, on the CPU)."""
        return {name: m.masked_weight.detach().to("cpu").clone() for name, m in self._masked_layers().items()}

    def _parameter_counts(self) -> tuple[int, int] | None:
        if self.flow is None:
            return None
        if isinstance(self.flow, ConditionalFlow):
            return self.flow.num_effective_parameters(), self.flow.num_dense_parameters()
        # a hand-built module: the same rule (masked-out weights are not effective)
        return parameter_counts(self.flow)

    @property
    def num_effective_parameters(self) -> int | None:
        """Trainable flow parameters that are not masked out (``None`` without a flow)."""
        counts = self._parameter_counts()
        return None if counts is None else counts[0]

    @property
    def num_dense_parameters(self) -> int | None:
        """Trainable flow parameters counting masked-out weights too (``None`` without a flow)."""
        counts = self._parameter_counts()
        return None if counts is None else counts[1]

    # ------------------------------------------------------------------ text
    def _site_of(self, node: str) -> str:
        attrs = self.bn.graph.nodes.get(node, {})
        return attrs.get("site", node)

    def _flow_name(self) -> str:
        if self.flow is None:
            return "no flow compiled"
        name = type(self.flow).__name__
        normalizer = getattr(self.flow, "normalizer_name", getattr(self.flow, "normalizer", None))
        if isinstance(normalizer, str):
            name += f" ({normalizer})"
        layers = getattr(self.flow, "num_layers", None)
        if isinstance(layers, int):
            name += f", {layers} layer{'s' if layers != 1 else ''}"
        return name

    def _plate_lines(self) -> list[str]:
        """What a shared-weight plate guide shares (empty for other guides)."""
        layout = getattr(self.guide, "plate_layout", None)
        if layout is None or self.flow is None:
            return []
        if hasattr(layout, "inner_plate"):
            return self._nested_plate_lines(layout)
        members = sum(1 for n in self.bn.nodes if self.bn.sites[self._site_of(n)].plate_position(layout.plate) is not None)
        per = max(len(layout.member_labels) + len(layout.member_observed_labels), 1)
        lines = [
            f"  plate:      {layout.plate!r}, traced size {layout.traced_size}, any size answered: "
            f"{layout.num_globals} global coordinate(s) pool the members (DeepSet), {layout.member_dim} per member "
            f"share one flow; parameters do not depend on the size",
            f"              G, H and the adjacency above are those of a {members // per}-member template",
        ]
        note = getattr(self.guide, "plate_trace_note", None)
        if note:
            lines.append(f"              {note}")
        return lines

    def _nested_plate_lines(self, layout) -> list[str]:
        """What a nested plate guide shares."""
        (t, h, k), (G, M) = layout.dims, layout.traced_sizes
        template = {p[0]: p[2] for info in self.bn.sites.values() for p in info.plates}
        Gt, Mt = (template[p] for p in layout.plates)
        lines = [
            f"  plates:     {layout.plates[0]!r} (groups) with {layout.plates[1]!r} (members) nested, traced size {G} x {M}, "
            f"any G x M answered: {t} global coordinate(s) pool the groups (two-level DeepSet), {h} per group pool "
            f"their members and share one flow, {k} per member share one flow; parameters do not depend on G or M",
            f"              G, H and the adjacency above are those of a {Gt} x {Mt} template",
        ]
        note = getattr(self.guide, "plate_trace_note", None)
        if note:
            lines.append(f"              {note}")
        return lines

    def adjacency_text(self, max_columns: int = _MAX_TEXT_COLUMNS) -> str | None:
        """The adjacency as text (``x`` allowed, ``.`` not; ``|`` between latents and observed).

        Short column labels are written vertically above the columns; longer ones are replaced
        by column numbers with a legend underneath. Returns ``None`` when there are more than
        ``max_columns`` columns.
        """
        cols = self.col_labels
        if len(cols) > max_columns:
            return None
        d = self.num_latent
        row_w = max([len(r) for r in self.row_labels] + [1])
        numbered = max(len(c) for c in cols) > 3
        heads = [str(j) for j in range(len(cols))] if numbered else list(cols)
        width = max(len(h) for h in heads)
        header = []
        for k in range(width):
            cells = [h.rjust(width)[k] for h in heads]
            header.append((" " * (row_w + 1) + " ".join(cells[:d]) + " | " + " ".join(cells[d:])).rstrip())
        body = []
        for i, r in enumerate(self.row_labels):
            cells = ["x" if self.adjacency[i, j] else "." for j in range(len(cols))]
            body.append((r.rjust(row_w) + " " + " ".join(cells[:d]) + " | " + " ".join(cells[d:])).rstrip())
        lines = header + body
        if numbered:
            legend = [f"{j}={c}" for j, c in enumerate(cols)]
            for start in range(0, len(legend), 8):
                lines.append(("columns: " if start == 0 else "         ") + "  ".join(legend[start:start + 8]))
        return "\n".join(lines)

    def summary(self, max_edges: int = 60, max_sites: int = 40) -> str:
        """A readable summary: sites, coordinates, edges of ``G`` and ``H``, sparsity, parameters.

        Args:
            max_edges: list the parents of every node when a graph has at most this many edges.
            max_sites: list at most this many sites.
        """
        bn, inv = self.bn, self.inverse
        H = self.inverse_graph
        lines = [f"CompiledStructure: {self._flow_name()}"]
        kind = getattr(inv, "kind", None)
        if isinstance(kind, str):
            mode = getattr(inv, "mode", None)
            lines[0] += f", {kind} inverse" + (f" ({mode} mode)" if isinstance(mode, str) else "")
        lines.append(
            f"  model G:    {len(bn.latent_nodes)} latent + {len(bn.observed_nodes)} observed coordinates "
            f"in {len(bn.sites)} sites, {bn.num_edges} edges"
        )
        lines.append(
            f"  inverse H:  {self.num_latent} latent coordinates given {self.num_observed} observed, "
            f"{H.number_of_edges()} edges, depth {self.depth} -> "
            + (f"{self.num_passes} sampling passes" if self.num_passes is not None else "sampling passes set by the solver")
        )
        entries = int(self.adjacency.sum())
        lines.append(
            f"  adjacency:  {self.num_latent} x {len(self.col_labels)}, {entries} of {self.num_dense_entries} "
            f"dense autoregressive entries ({100 * self.sparsity:.1f}%)"
        )
        if self.flow is not None:
            eff, dense = self._parameter_counts()
            share = 100 * eff / dense if dense else 0.0
            lines.append(
                f"  parameters: {eff:,} effective of {dense:,} dense ({share:.1f}%) "
                f"in {len(self._masked_layers())} masked layers"
            )
        lines.extend(self._plate_lines())
        lines.append("Sites:")
        lines.append(f"  {'name':<16} {'kind':<8} {'shape':<12} {'coords':>6}  support")
        sites = list(bn.sites.values())
        for s in sites[:max_sites]:
            kind = "observed" if s.observed else "latent"
            lines.append(f"  {s.name:<16} {kind:<8} {str(tuple(s.shape)):<12} {s.numel:>6}  {s.support}")
        if len(sites) > max_sites:
            lines.append(f"  ... and {len(sites) - max_sites} more sites")
        if bn.num_edges <= max_edges:
            lines.append("Model G (node <- parents):")
            for n in bn.nodes:
                parents = bn.parents(n)
                if parents:
                    lines.append(f"  {n} <- {', '.join(parents)}")
        if H.number_of_edges() <= max_edges:
            lines.append("Inverse H (node <- parents, in sampling order):")
            for n in self.row_labels:
                parents = list(inv.parents(n))
                lines.append(f"  {n} <- {', '.join(parents) if parents else '(none)'}")
        hidden = [name for name, edges in (("G", bn.num_edges), ("H", H.number_of_edges())) if edges > max_edges]
        if hidden:
            lines.append(
                f"  (parent lists of {' and '.join(hidden)} not shown: more than {max_edges} edges; "
                "summary(max_edges=...) lists them, structure.inverse.parents(node) gives one node's)"
            )
        text = self.adjacency_text()
        if text is not None:
            lines.append("Adjacency (rows: latents in sampling order; columns: latents | observed):")
            lines.extend("  " + line for line in text.splitlines())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"CompiledStructure({self.num_latent} latent, {self.num_observed} observed, "
            f"{int(self.adjacency.sum())} edges, depth={self.depth}, flow={type(self.flow).__name__ if self.flow is not None else None})"
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self, include_masks: bool = True) -> dict[str, Any]:
        """A JSON-serialisable description of everything but the plots.

        Args:
            include_masks: include every mask as a 0/1 matrix (they can be large).
        """
        H = self.inverse_graph
        out: dict[str, Any] = {
            "model": {
                **self.bn.to_dict(),
                "num_latent": len(self.bn.latent_nodes),
                "num_observed": len(self.bn.observed_nodes),
                "num_edges": self.bn.num_edges,
            },
            "inverse": {
                "order": list(self.inverse.order),
                "observed": list(self.inverse.observed),
                "parents": {n: list(self.inverse.parents(n)) for n in self.row_labels},
                "edges": [[u, v] for u, v in H.edges],
                "num_edges": H.number_of_edges(),
                "depth": self.depth,
                "kind": getattr(self.inverse, "kind", None),
                "mode": getattr(self.inverse, "mode", None),
            },
            "adjacency": {
                "row_labels": self.row_labels,
                "col_labels": self.col_labels,
                "matrix": self.adjacency.to(torch.int64).tolist(),
                "num_entries": int(self.adjacency.sum()),
                "num_dense_entries": self.num_dense_entries,
                "sparsity": self.sparsity,
            },
            "depth": self.depth,
            "num_passes": self.num_passes,
            "flow": None,
        }
        if self.flow is not None:
            eff, dense = self._parameter_counts()
            masks = {}
            for name, mask in self.masks.items():
                entry = {"shape": list(mask.shape), "num_true": int(mask.sum())}
                if include_masks:
                    entry["mask"] = mask.to(torch.int64).tolist()
                masks[name] = entry
            out["flow"] = {
                "class": type(self.flow).__name__,
                "description": self._flow_name(),
                "num_effective_parameters": eff,
                "num_dense_parameters": dense,
                "masks": masks,
            }
        return out

    def to_json(self, path: str | os.PathLike | None = None, include_masks: bool = True, indent: int | None = 1) -> str:
        """:meth:`to_dict` as a JSON string; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(include_masks=include_masks), indent=indent)
        if path is not None:
            atomic_write_text(text, path)
        return text

    # ------------------------------------------------------------------ plots
    def _site_runs(self, labels: list[str]) -> list[tuple[str, int, int]]:
        """Maximal runs ``(site, start, stop)`` of consecutive labels from one site."""
        runs = []
        for k, label in enumerate(labels):
            site = self._site_of(label)
            if runs and runs[-1][0] == site:
                runs[-1] = (site, runs[-1][1], k + 1)
            else:
                runs.append((site, k, k + 1))
        return runs

    def _ticks(self, labels: list[str]) -> tuple[list[float], list[str]]:
        if len(labels) <= _MAX_TICK_LABELS:
            return list(range(len(labels))), list(labels)
        runs = self._site_runs(labels)
        # one tick per site block, keeping only blocks wide enough not to overlap
        min_gap = len(labels) / _MAX_TICK_LABELS
        pos, names, last = [], [], -math.inf
        for site, start, stop in runs:
            centre = (start + stop - 1) / 2
            if centre - last >= min_gap:
                pos.append(centre)
                names.append(site)
                last = centre
        return pos, names

    def plot_adjacency(self, path: str | os.PathLike | None = None, ax=None, title: str | None = None):
        """Heat map of the compiled adjacency (black: allowed, white: masked), sites separated.

        Rows are latents in sampling order, columns latents then observed coordinates (as in
        Weilbach et al., Fig. 4a). Thin lines separate sites, a thick line separates the
        latent columns from the observed ones.

        Args:
            path: save the figure there (PNG, PDF, ... by extension) when given.
            ax: draw on this axes instead of a new figure.
            title: axes title.

        Returns:
            The matplotlib figure (its first image holds the adjacency as 0/1).
        """
        plt = _pyplot()
        d, n = self.adjacency.shape
        if ax is None:
            w = min(14.0, max(4.0, 0.22 * n + 2.0))
            h = min(14.0, max(3.0, 0.22 * d + 1.5))
            fig, ax = plt.subplots(figsize=(w, h))
        else:
            fig = ax.figure
        ax.imshow(self.adjacency.to(torch.float32).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        thin = dict(color="#4a90d9", linewidth=0.6)
        for _, start, _stop in self._site_runs(self.row_labels)[1:]:
            ax.axhline(start - 0.5, **thin)
        for _, start, _stop in self._site_runs(self.col_labels)[1:]:
            if start != d:
                ax.axvline(start - 0.5, **thin)
        if 0 < d < n:
            ax.axvline(d - 0.5, color="#d62728", linewidth=1.5)
        xpos, xlab = self._ticks(self.col_labels)
        ypos, ylab = self._ticks(self.row_labels)
        small = 7 if max(len(xlab), len(ylab)) > 20 else 9
        ax.set_xticks(xpos)
        ax.set_xticklabels(xlab, rotation=90, fontsize=small)
        ax.set_yticks(ypos)
        ax.set_yticklabels(ylab, fontsize=small)
        ax.set_xlabel("inputs: latents (sampling order) | observed")
        ax.set_ylabel("latent outputs")
        ax.set_title(title or f"compiled adjacency: {int(self.adjacency.sum())} entries, depth {self.depth}", fontsize=10)
        return _finish(fig, path)

    def plot_masks(self, path: str | os.PathLike | None = None, max_columns: int | None = None):
        """Hinton diagrams of every masked layer's weights (as Weilbach et al., Fig. 1).

        One axes per masked layer, one row of axes per masked network; squares show sign
        (white positive, black negative) and magnitude, pale cells are masked out.

        Args:
            path: save the figure there when given.
            max_columns: axes per row (default: the most masked layers of one network).

        Returns:
            The matplotlib figure, with exactly one axes per entry of :attr:`masks`.

        Raises:
            ValueError: no flow was compiled (there are no masks to draw).
        """
        layers = self._masked_layers()
        if not layers:
            raise ValueError("no masked layers to draw: build the CompiledStructure with a flow (flow=...)")
        plt = _pyplot()
        groups: dict[str, list[str]] = {}
        nets = [name for name, m in self.flow.named_modules() if isinstance(m, MaskedMLP)]
        for name in layers:
            owners = [n for n in nets if name.startswith(n + ".") or n == ""]
            key = max(owners, key=len) if owners else name.rpartition(".")[0]
            groups.setdefault(key, []).append(name)
        cols = max_columns or max(len(v) for v in groups.values())
        rows = sum(math.ceil(len(v) / cols) for v in groups.values())
        fig, axes = plt.subplots(rows, cols, figsize=(min(16, 2.6 * cols + 0.5), min(40, 2.3 * rows + 0.5)), squeeze=False)
        used = set()
        r = 0
        for key, names in groups.items():
            for k, name in enumerate(names):
                ax = axes[r + k // cols][k % cols]
                used.add(id(ax))
                layer = layers[name]
                hinton(ax, layer.masked_weight, layer.mask, title=name or type(layer).__name__)
            r += math.ceil(len(names) / cols)
        for ax in axes.flat:
            if id(ax) not in used:
                fig.delaxes(ax)
        fig.suptitle(f"masked weights of {self._flow_name()}", fontsize=10)
        from matplotlib.patches import Patch

        legend = [Patch(facecolor="white", edgecolor="black", label="positive weight (area ~ |w|)"),
                  Patch(facecolor="black", label="negative weight"),
                  Patch(facecolor="#808080", label="allowed by the mask"),
                  Patch(facecolor="#ececec", label="masked out")]
        fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        return _finish(fig, path)

    def _drawable(self, graph: nx.DiGraph, observed: set[str]) -> tuple[nx.DiGraph, set[str], bool]:
        """The graph to draw: scalar nodes, or sites when there are too many nodes."""
        if graph.number_of_nodes() <= _MAX_SCALAR_GRAPH_NODES:
            return graph, observed, False
        g = nx.DiGraph()
        for n in graph.nodes:
            g.add_node(self._site_of(n))
        for u, v in graph.edges:
            su, sv = self._site_of(u), self._site_of(v)
            if su != sv:
                g.add_edge(su, sv)
        obs = {self._site_of(n) for n in observed}
        return g, obs, True

    def _draw_graph(self, ax, graph: nx.DiGraph, observed: set[str], title: str):
        g, obs, collapsed = self._drawable(graph, observed)
        if g.number_of_nodes() == 0:
            ax.set_axis_off()
            ax.set_title(title, fontsize=10)
            return
        # layered layout: one row per topological generation, top to bottom, rows centred
        pos = {}
        generations = list(nx.topological_generations(g))
        rank = {node: k for k, node in enumerate(g.nodes)}
        widest = max(len(gen) for gen in generations)
        for depth, generation in enumerate(generations):
            generation = sorted(generation, key=rank.__getitem__)
            offset = (widest - len(generation)) / 2
            for k, node in enumerate(generation):
                pos[node] = (offset + k, -depth * max(1.0, widest / max(len(generations), 1) * 0.6))
        n_nodes = g.number_of_nodes()
        labelled = n_nodes <= _MAX_LABELLED_NODES
        size = 600 if n_nodes <= 20 else (300 if labelled else max(8, 4000 // n_nodes))
        colours = ["#b0b0b0" if n in obs else "white" for n in g.nodes]
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, edgecolors="black", node_size=size, linewidths=0.8)
        many = g.number_of_edges() > _MAX_ARROW_EDGES
        nx.draw_networkx_edges(
            g, pos, ax=ax, node_size=size, width=0.4 if many or not labelled else 0.9,
            arrows=not many, arrowsize=6 if not labelled else 10, alpha=0.6 if not labelled else 0.9,
        )
        if labelled:
            nx.draw_networkx_labels(g, pos, ax=ax, font_size=8 if n_nodes <= 20 else 6)
        suffix = " (sites)" if collapsed else ""
        ax.set_title(f"{title}{suffix}: {n_nodes} nodes, {g.number_of_edges()} edges", fontsize=10)
        ax.set_axis_off()

    def plot_graphs(self, path: str | os.PathLike | None = None):
        """The model graph ``G`` beside its inverse ``H`` (observed nodes grey), layered by generation.

        Graphs with more than 1,500 nodes are drawn at site level; above 60 nodes labels are left out.

        Args:
            path: save the figure there when given.

        Returns:
            The matplotlib figure with two axes (``G`` left, ``H`` right).
        """
        plt = _pyplot()
        n = max(self.model_graph.number_of_nodes(), 1)
        w = min(18.0, max(8.0, 0.5 * math.sqrt(n) * 4))
        fig, (ax_g, ax_h) = plt.subplots(1, 2, figsize=(w, w * 0.5))
        observed = set(self.bn.observed_nodes)
        self._draw_graph(ax_g, self.model_graph, observed, "model G")
        self._draw_graph(ax_h, self.inverse_graph, observed, "inverse H")
        fig.tight_layout()
        return _finish(fig, path)

    def save_plots(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``adjacency.png``, ``graphs.png``, ``masks.png`` (with a flow) and ``structure.json``.

        Args:
            folder: output folder (created if missing).

        Returns:
            ``{kind: path}`` of the files written.
        """
        plt = _pyplot()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        jobs = [("adjacency", self.plot_adjacency), ("graphs", self.plot_graphs)]
        if self._masked_layers():
            jobs.append(("masks", self.plot_masks))
        for kind, plot in jobs:
            path = folder / f"{kind}.png"
            fig = plot(path)
            plt.close(fig)
            written[kind] = path
        written["json"] = folder / "structure.json"
        self.to_json(written["json"])
        return written


def plot_loss(history: list[float], path: str | os.PathLike | None = None):
    """The training loss per step with a running mean, on a symlog axis (losses fall by orders of
    magnitude and an unbiased estimate can dip below zero). Returns ``path`` (or the figure without one)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps = list(range(1, len(history) + 1))
        ax.plot(steps, history, color="#9ecae1", linewidth=0.6, label="per step")
        window = max(1, len(history) // 50)
        if window > 1:
            t = torch.tensor(history, dtype=torch.float64)
            smooth = torch.nn.functional.avg_pool1d(t[None, None], window, stride=1).flatten().tolist()
            ax.plot(steps[window - 1 :], smooth, color="#08519c", linewidth=1.4, label=f"mean of {window}")
        ax.legend(fontsize=8)
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set(xlabel="step", ylabel="training loss (nats, symlog)")
    ax.set_title("training loss", fontsize=10)
    fig.tight_layout()
    return _saved(fig, path, plt)


def plot_marginals(panels, path: str | os.PathLike | None = None, max_coordinates: int = 12):
    """Histograms of every scalar latent, one row per panel ``(title, samples site -> (n, *shape), truth or None)``;
    true values as red lines. Returns ``path`` (or the figure without one)."""
    from .graph import node_label

    plt = _pyplot()
    first = panels[0][1]
    labels = [node_label(n, idx, tuple(v.shape[1:])) for n, v in first.items() for idx in _indices(tuple(v.shape[1:]))]
    labels = labels[:max_coordinates]
    fig, axes = plt.subplots(len(panels), len(labels), figsize=(2.1 * len(labels), 2.0 * len(panels)), squeeze=False)
    for r, (title, samples, truth) in enumerate(panels):
        flat = torch.cat([v.detach().reshape(v.shape[0], -1) for v in samples.values()], -1).cpu()
        true_flat = None if truth is None else torch.cat([torch.as_tensor(truth[n]).reshape(-1) for n in samples]).cpu()
        for k, label in enumerate(labels):
            ax = axes[r][k]
            ax.hist(flat[:, k].numpy(), bins=40, color="#6baed6", density=True)
            if true_flat is not None:
                ax.axvline(float(true_flat[k]), color="#d62728", linewidth=1.2)
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
            ax.set_title(label if r == 0 else "", fontsize=8)
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return _saved(fig, path, plt)


def _saved(fig, path, plt):
    """The figure when no ``path`` is given; otherwise save it there, close it and return the path."""
    if path is None:
        return fig
    _finish(fig, path)
    plt.close(fig)
    return Path(path)


def _indices(shape: tuple) -> list[tuple]:
    import itertools

    return list(itertools.product(*(range(int(s)) for s in shape)))
