"""From site-pair dependencies to scalar edges and the traced :class:`~pyro_struct.graph.BayesNet`."""

from __future__ import annotations

from typing import Iterable, Mapping

import networkx as nx
import torch

from ..errors import ModelStructureError
from ..graph import BayesNet, SiteInfo
from .probe import SiteLayout

__all__ = ["resolve_dependencies", "check_acyclic", "build_bayesnet"]


def _group_nodes(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Node indices ``keys[:, None] * size + arange(size)``, flattened per key: ``(len(keys), size)``."""
    return keys[:, None] * size + torch.arange(size)


def _pair_edges(child: SiteLayout, parent: SiteLayout, pairs: torch.Tensor | None) -> torch.Tensor:
    """Global ``(m, 2)`` (parent node, child node) edges for a site pair.

    ``pairs``: (child event, parent value element) dependencies, or ``None`` for all-to-all.
    """
    if child.n_nodes == 0 or parent.n_nodes == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    # a block child: an event's parents are its group's; a mixing parent: an element stands
    # for all unconstrained coordinates of its group
    c_unit = child.events_per_group if child.block else 1
    c_size = child.nodes_per_group if child.block else 1
    p_unit = parent.values_per_group if parent.mixing else 1
    p_size = parent.nodes_per_group if parent.mixing else 1
    if pairs is None:
        c_nodes = torch.arange(child.n_nodes)
        p_nodes = torch.arange(parent.n_nodes)
        cc, pp = torch.meshgrid(c_nodes, p_nodes, indexing="ij")
        return torch.stack([pp.reshape(-1) + parent.node_offset, cc.reshape(-1) + child.node_offset], 1)
    keys = torch.unique(torch.stack([pairs[:, 0] // c_unit, pairs[:, 1] // p_unit], 1), dim=0)
    c_nodes = _group_nodes(keys[:, 0], c_size)  # (m, c_size)
    p_nodes = _group_nodes(keys[:, 1], p_size)  # (m, p_size)
    cc = c_nodes[:, :, None].expand(-1, c_size, p_size)
    pp = p_nodes[:, None, :].expand(-1, c_size, p_size)
    return torch.stack([pp.reshape(-1) + parent.node_offset, cc.reshape(-1) + child.node_offset], 1)


def _block_edges(site: SiteLayout) -> torch.Tensor:
    """Edges inside each group of a block site: every node depends on the earlier ones."""
    size = site.nodes_per_group
    if not site.block or size < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    tri = torch.triu_indices(size, size, 1)  # (2, pairs) with row < col
    base = torch.arange(site.n_groups)[:, None] * size + site.node_offset
    src = (base + tri[0]).reshape(-1)
    dst = (base + tri[1]).reshape(-1)
    return torch.stack([src, dst], 1)


def resolve_dependencies(dependencies, names: list[str]) -> list[tuple[int, int]]:
    """``dependencies=`` (``{child_site: [parent_site, ...]}``) as ``(child pos, parent pos)``
    pairs over the site names ``names``; unknown names and self-loops are refused."""
    if dependencies is None:
        return []
    if not isinstance(dependencies, Mapping):
        raise TypeError("dependencies must be a dict {child_site: [parent_site, ...]}")
    pos = {n: i for i, n in enumerate(names)}
    extra = []
    for child, parents in dependencies.items():
        if isinstance(parents, str):
            parents = [parents]
        for site in [child, *parents]:
            if site not in pos:
                raise ModelStructureError(
                    f"dependencies= names site {site!r}, which is not a sample site of the model; "
                    f"its sample sites are {names}"
                )
        for p in parents:
            if p == child:
                raise ModelStructureError(f"dependencies= makes site {child!r} depend on itself; remove it")
            extra.append((pos[child], pos[p]))
    return extra


def check_acyclic(site_parents: Iterable[tuple[int, int]], extra: list[tuple[int, int]], names: list[str]) -> None:
    """Refuse extra ``(child, parent)`` site dependencies that close a cycle with the traced ones."""
    site_dag = nx.DiGraph()
    site_dag.add_edges_from((u, d) for d, u in site_parents)
    site_dag.add_edges_from((u, d) for d, u in extra)
    if not nx.is_directed_acyclic_graph(site_dag):
        cycle = [names[u] for u, _ in nx.find_cycle(site_dag)]
        raise ModelStructureError(
            f"dependencies= creates the cycle {' -> '.join(cycle + cycle[:1])}; "
            "an extra dependency must point from an earlier site to a later one"
        )


def build_bayesnet(layouts: list[SiteLayout], site_pairs: Mapping) -> BayesNet:
    """The BayesNet of the sites ``layouts`` (with node offsets set) and their dependencies.

    ``site_pairs``: ``(child pos, parent pos) -> (m, 2)`` (child event, parent value element)
    pairs, or ``None`` for all-to-all. Block sites also get their within-group edges.
    """
    scalar_edges = []  # the common case of two one-node sites, kept out of torch for speed
    pieces = []
    for (d, u), pairs in site_pairs.items():
        child, parent = layouts[d], layouts[u]
        if child.n_nodes == 1 and parent.n_nodes == 1:
            scalar_edges.append((parent.node_offset, child.node_offset))
        else:
            pieces.append(_pair_edges(child, parent, pairs))
    pieces.extend(_block_edges(lay) for lay in layouts if lay.block and lay.nodes_per_group > 1)
    edges = scalar_edges
    if pieces:
        edges = edges + torch.unique(torch.cat(pieces), dim=0).tolist()
    infos = [
        SiteInfo(
            name=lay.name, shape=lay.shape, support=lay.support, observed=lay.observed,
            block=lay.block, node_shape=lay.node_shape, event_dim=lay.event_dim, plates=lay.plates,
            scale_parents=lay.scale_parents,
        )
        for lay in layouts
    ]
    graph = nx.DiGraph()
    labels: list[str] = []
    attrs: list = []
    for info in infos:
        site_labels = info.nodes
        labels.extend(site_labels)
        attrs.extend(
            (label, {"site": info.name, "index": idx, "observed": info.observed})
            for label, idx in zip(site_labels, info.indices)
        )
    graph.add_nodes_from(attrs)
    graph.add_edges_from((labels[a], labels[b]) for a, b in edges)
    return BayesNet(graph, infos)
