"""Simulation-based calibration of an amortised guide: ranks, coverage, uniformity tests and ECDF plots, per site and per depth of the inverse."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .checks import _grid, warn_if_untrained

__all__ = ["calibration", "CalibrationResult", "DEFAULT_LEVELS"]

#: central-interval probabilities :meth:`CalibrationResult.coverage` reports by default
DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)
_MAX_ROWS = 1 << 16
_BAND_SIMULATIONS = 1000


def _node_depths(guide) -> dict[str, int]:
    """Latent node label -> its level in the inverse (edges on the longest path from a root of the inverse)."""
    from ..dag import node_levels_of

    level = node_levels_of(torch.as_tensor(guide.inverse.adjacency()).bool())
    return {label: level[k] for k, label in enumerate(guide.inverse.order)}


class CalibrationResult:
    """Ranks of true latents among posterior draws, over simulated data sets.

    For a calibrated posterior every coordinate's normalised rank is uniform on (0, 1) over
    simulations ``(z, x) ~ p`` (Talts et al. 2018).

    Attributes:
        ranks: ``(N, D)`` long: how many of the ``S`` posterior draws lie below the true value,
            per simulation and scalar latent coordinate.
        num_samples: ``S``.
        labels: ``D`` coordinate labels (``"z"``, ``"z[3]"``); ``sites``: their site names.
        depths: ``D`` depths in the inverse (``-1`` where a coordinate has no inverse node).
        truth, post_mean, post_std: ``(N, D)`` true values and posterior means / standard deviations.
        prior_std: ``(D,)`` standard deviation of the true values (for the contraction).
        seconds: time to simulate and sample.
    """

    def __init__(self, ranks, num_samples, labels, sites, depths, truth, post_mean, post_std, seconds=float("nan")):
        self.ranks = ranks
        self.num_samples = int(num_samples)
        self.labels = list(labels)
        self.sites = list(sites)
        self.depths = list(depths)
        self.truth, self.post_mean, self.post_std = truth, post_mean, post_std
        self.prior_std = truth.std(0)
        self.seconds = seconds

    @property
    def num_simulations(self) -> int:
        return int(self.ranks.shape[0])

    @property
    def normalized_ranks(self) -> torch.Tensor:
        """``(N, D)`` ranks mapped to the midpoints ``(r + 0.5) / (S + 1)`` of ``S + 1`` equal bins of (0, 1)."""
        return (self.ranks.to(torch.float64) + 0.5) / (self.num_samples + 1)

    def coverage(self, levels: Sequence[float] = DEFAULT_LEVELS) -> dict[float, torch.Tensor]:
        """Empirical coverage of central posterior intervals.

        Returns:
            level -> ``(D,)`` fraction of simulations whose true value lies in the central
            ``level`` interval of its posterior draws (nominal: ``level``; standard error
            ``sqrt(level (1 - level) / N)``). Ranks resolve intervals to ``1 / (S + 1)``: with
            fewer than ``2 / (1 - level)`` draws every truth lies inside (e.g. ``S = 10`` at 95%).
        """
        u = self.normalized_ranks
        out = {}
        for level in levels:
            if not 0 < level < 1:
                raise ValueError(f"coverage: levels must lie in (0, 1); got {level!r}")
            lo, hi = (1 - level) / 2, (1 + level) / 2
            out[float(level)] = ((u >= lo) & (u <= hi)).to(torch.float64).mean(0)
        return out

    def uniformity(self, num_bins: int | None = None) -> torch.Tensor:
        """``(D,)`` p-values of Pearson's chi-square test that each coordinate's ranks are uniform.

        ``num_bins`` defaults to ``N / 5`` (at most 20, at least 2), so every bin expects five ranks.
        """
        N = self.num_simulations
        bins = num_bins or max(2, min(20, N // 5))
        idx = (self.normalized_ranks * bins).long().clamp_(0, bins - 1)
        counts = torch.zeros(bins, idx.shape[1], dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        expected = N / bins
        stat = ((counts - expected) ** 2 / expected).sum(0)
        return torch.special.gammaincc(torch.tensor((bins - 1) / 2, dtype=torch.float64), stat / 2)

    def _groups(self, by: str) -> list[tuple[object, list[int]]]:
        keys = self.sites if by == "site" else self.depths
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        return list(groups.items()) if by == "site" else sorted(groups.items())

    def summary_rows(self, by: str = "site", levels: Sequence[float] = DEFAULT_LEVELS) -> list[dict]:
        """One row per site (``by="site"``) or per depth level of the inverse (``by="depth"``).

        Each row: the group, its number of coordinates, the mean coverage at each level, the
        Bonferroni-adjusted smallest uniformity p-value of its coordinates, the mean z-score
        ``(post_mean - truth) / post_std`` (bias) and its sd (near 1 when calibrated), and the
        mean contraction ``1 - post_var / prior_var``.
        """
        if by not in ("site", "depth"):
            raise ValueError(f"summary_rows: by must be 'site' or 'depth'; got {by!r}")
        cov = self.coverage(levels)
        p = self.uniformity()
        z = (self.post_mean - self.truth) / self.post_std.clamp_min(1e-12)
        contraction = 1 - (self.post_std**2).mean(0) / (self.prior_std**2).clamp_min(1e-24)
        rows = []
        for key, idx in self._groups(by):
            ix = torch.tensor(idx)
            row = {by: key, "coordinates": len(idx)}
            row.update({f"coverage{round(100 * lv)}": float(c[ix].mean()) for lv, c in cov.items()})
            row["uniformity_p"] = float(min(1.0, float(p[ix].min()) * len(idx)))
            row["z_mean"] = float(z[:, ix].mean())
            row["z_sd"] = float(z[:, ix].std())
            row["contraction"] = float(contraction[ix].mean())
            rows.append(row)
        return rows

    def summary(self, levels: Sequence[float] = DEFAULT_LEVELS) -> str:
        """A text table per site and per depth level (coverage, uniformity p-value, z-scores)."""
        lines = [f"simulation-based calibration: {self.num_simulations} simulations x {self.num_samples} posterior draws"]
        for by in ("site", "depth"):
            rows = self.summary_rows(by, levels)
            keys = list(rows[0])
            lines.append("  ".join(f"{k:>12}" for k in keys))
            for r in rows:
                lines.append("  ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{str(v):>12}" for v in r.values()))
        return "\n".join(lines)

    def to_dict(self, levels: Sequence[float] = DEFAULT_LEVELS) -> dict:
        """JSON-ready: settings, per-coordinate coverage and p-values, per-site and per-depth rows."""
        cov = self.coverage(levels)
        p = self.uniformity()
        return {
            "num_simulations": self.num_simulations,
            "num_samples": self.num_samples,
            "coordinates": [
                {"label": lab, "site": s, "depth": d, "uniformity_p": float(p[i]), **{f"coverage{round(100 * lv)}": float(c[i]) for lv, c in cov.items()}}
                for i, (lab, s, d) in enumerate(zip(self.labels, self.sites, self.depths))
            ],
            "sites": self.summary_rows("site", levels),
            "depths": self.summary_rows("depth", levels),
        }

    def ecdf_band(self, grid: torch.Tensor, confidence: float = 0.95, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Simultaneous ``confidence`` band ``(lower, upper)`` of ``ECDF(u) - u`` on ``grid`` for ``N``
        uniform ranks, by simulation (the construction of Säilynoja et al. 2022 that sbi and
        BayesFlow plot): pointwise quantiles at the tail level at which ``confidence`` of the
        simulated ECDFs stay inside everywhere."""
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(_BAND_SIMULATIONS, self.num_simulations, generator=g, dtype=torch.float64)
        diff = (u.unsqueeze(-1) <= grid).to(torch.float64).mean(1) - grid  # (R, G)
        ranks = diff.argsort(0).argsort(0).to(torch.float64)
        tail = torch.minimum(ranks + 1, _BAND_SIMULATIONS - ranks) / _BAND_SIMULATIONS  # two-sided, per point
        gamma = float(torch.quantile(tail.min(1).values, 1 - confidence))
        lower = torch.quantile(diff, gamma, dim=0)
        upper = torch.quantile(diff, 1 - gamma, dim=0)
        return lower, upper

    def plot(self, path: str | os.PathLike, max_lines: int = 60) -> str:
        """Write ECDF-difference panels (per site, or per depth level when there are more than six
        sites) with the simultaneous 95% band, and a coverage curve, to ``path`` (PNG).

        Returns:
            the path written.
        """
        from ..inspect import _pyplot

        plt = _pyplot()
        by = "site" if len(set(self.sites)) <= 6 else "depth"
        groups = _merge_groups(self._groups(by), 8)
        grid = torch.linspace(0, 1, 101, dtype=torch.float64)
        lower, upper = self.ecdf_band(grid)
        u = self.normalized_ranks
        ncols = min(3, len(groups) + 1)
        nrows = math.ceil((len(groups) + 1) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False)
        flat_axes = [ax for row in axes for ax in row]
        for ax, (key, idx) in zip(flat_axes, groups):
            ax.fill_between(grid.numpy(), lower.numpy(), upper.numpy(), color="#d9d9d9", label="95% band")
            for i in idx[:max_lines]:
                ecdf = (u[:, i].unsqueeze(-1) <= grid).to(torch.float64).mean(0) - grid
                ax.plot(grid.numpy(), ecdf.numpy(), linewidth=0.8, alpha=0.8)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(f"{by} {key} ({len(idx)} coord.)", fontsize=9)
            ax.set_xlabel("normalised rank", fontsize=8)
            ax.set_ylabel("ECDF - uniform", fontsize=8)
            ax.tick_params(labelsize=7)
        self._plot_coverage(flat_axes[len(groups)])
        for ax in flat_axes[len(groups) + 1:]:
            ax.axis("off")
        fig.suptitle(f"SBC: {self.num_simulations} simulations x {self.num_samples} draws", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=110)
        plt.close(fig)
        return os.fspath(path)

    def _plot_coverage(self, ax) -> None:
        levels = [i / 50 for i in range(1, 50)]
        cov = self.coverage(levels)
        nominal = torch.tensor(levels, dtype=torch.float64)
        emp = torch.stack([cov[lv] for lv in levels])  # (L, D)
        se = 1.96 * torch.sqrt(nominal * (1 - nominal) / self.num_simulations)
        ax.fill_between(nominal.numpy(), (nominal - se).numpy(), (nominal + se).numpy(), color="#d9d9d9")
        for i in range(min(emp.shape[1], 60)):
            ax.plot(nominal.numpy(), emp[:, i].numpy(), color="#6baed6", linewidth=0.6, alpha=0.6)
        ax.plot(nominal.numpy(), emp.mean(1).numpy(), color="#08519c", linewidth=1.6, label="mean")
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.6)
        ax.set_title("coverage of central intervals", fontsize=9)
        ax.set_xlabel("nominal", fontsize=8)
        ax.set_ylabel("empirical", fontsize=8)
        ax.tick_params(labelsize=7)

    def __repr__(self) -> str:
        cov = self.coverage((0.5, 0.9))
        return (
            f"CalibrationResult({self.num_simulations} simulations x {self.num_samples} draws, {len(self.labels)} coordinates, "
            f"mean coverage 50%: {float(cov[0.5].mean()):.3f}, 90%: {float(cov[0.9].mean()):.3f})"
        )


def calibration(guide, num_simulations: int = 200, num_samples: int = 100, seed: int | None = None) -> CalibrationResult:
    """Simulation-based calibration (SBC) of an amortised guide.

    Draws ``(z, x) ~ p(z, x)`` ``num_simulations`` times, samples the amortised posterior
    for every ``x`` in batches, and ranks each true scalar latent among ``num_samples`` draws.

    Args:
        guide: a :class:`~pyro_struct.StructuredGuide` (anything with ``simulator()``,
            ``posterior(obs)``, ``latent_sites``, ``observed_sites``, ``bn`` and ``inverse``).
        num_simulations: simulated data sets (at least 10; hundreds for a sharp test).
        num_samples: posterior draws per data set.
        seed: seeds torch's generator first.

    Returns:
        a :class:`CalibrationResult` (``coverage``, ``uniformity``, ``summary``, ``plot``).
    """
    import time

    from ..graph import node_label

    for name, value, least in (("num_simulations", num_simulations, 10), ("num_samples", num_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"calibration: {name} must be an int >= {least}; got {value!r}"
                + (" (a rank test needs tens of simulations; use 100 or more)" if least == 10 else "")
            )
    warn_if_untrained(guide, "calibration")
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    sims = guide.simulator().simulate(num_simulations)
    depth_of = _node_depths(guide)
    labels, sites = [], []
    for site in guide.latent_sites:
        shape = tuple(int(s) for s in guide.site_shapes[site])
        for index in _grid(shape):
            labels.append(node_label(site, index, shape))
            sites.append(site)
    chunk = max(1, _MAX_ROWS // num_samples)
    ranks, means, stds = [], [], []
    for lo in range(0, num_simulations, chunk):
        hi = min(num_simulations, lo + chunk)
        obs = {s: sims[s][lo:hi] for s in guide.observed_sites}
        with torch.no_grad():
            draws = guide.posterior(obs).sample(num_samples)
        flat = torch.cat([draws[s].reshape(num_samples, hi - lo, -1) for s in guide.latent_sites], -1)
        truth = torch.cat([sims[s][lo:hi].reshape(hi - lo, -1) for s in guide.latent_sites], -1)
        ranks.append((flat < truth).sum(0))
        means.append(flat.mean(0))
        stds.append(flat.std(0))
    truth = torch.cat([sims[s].reshape(num_simulations, -1) for s in guide.latent_sites], -1)
    return CalibrationResult(
        torch.cat(ranks), num_samples, labels, sites, [depth_of.get(lab, -1) for lab in labels],
        truth.to(torch.float64), torch.cat(means).to(torch.float64), torch.cat(stds).to(torch.float64),
        time.perf_counter() - start,
    )


def _merge_groups(groups: list, most: int) -> list:
    """At most ``most`` panels: consecutive groups merged (``"3-5"``) when there are more."""
    if len(groups) <= most:
        return groups
    size = math.ceil(len(groups) / most)
    merged = []
    for i in range(0, len(groups), size):
        part = groups[i:i + size]
        key = part[0][0] if len(part) == 1 else f"{part[0][0]}-{part[-1][0]}"
        merged.append((key, [j for _, idx in part for j in idx]))
    return merged
