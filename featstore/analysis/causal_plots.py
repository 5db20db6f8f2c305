"""PNG figures of the causal edges: against the correlation graph, and attribution vs exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from featstore.figures import PathLike, no_data, pair_label, save

BARS = {
    "correlation_edges_tested": "correlation edges (source tested)",
    "correlation_edges_causal": "… of which causal",
    "causal_edges": "causal edges",
    "causal_edges_missed": "… missed by correlation",
}


def plot_comparison(
    frame: pl.DataFrame, comparison: pl.DataFrame, corr: dict, cfg, path: PathLike
) -> Path:
    """Left: counts per layer pair; right: Pearson vs relative effect of every tested pair that
    has a Pearson correlation (co-active pairs of pairs with correlation statistics)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    fig.suptitle(
        f"causal edges (|relative effect| ≥ {cfg.min_effect}, ≥ {cfg.min_tokens} tokens) vs "
        f"correlation edges (pearson ≥ {cfg.min_pearson})"
    )
    left, right = fig.subplots(1, 2)
    with_corr = comparison.filter(pl.col("correlation_edges").is_not_null())
    if with_corr.height == 0:
        left.text(0.5, 0.5, "no correlation statistics", ha="center", transform=left.transAxes)
    x = np.arange(with_corr.height)
    width = 0.8 / len(BARS)
    for k, (col, label) in enumerate(BARS.items()):
        bars = left.bar(x + (k - 1.5) * width, with_corr[col].fill_null(0), width, label=label)
        left.bar_label(bars, fontsize=7)
    left.set_xticks(x, [pair_label(p) for p in with_corr.select("layer_a", "layer_b").rows()])
    left.set_ylabel("feature pairs")
    left.legend(fontsize=8)
    _pearson_scatter(right, frame, corr, cfg)
    return save(fig, path)


def _pearson_scatter(ax, frame: pl.DataFrame, corr: dict, cfg) -> None:
    """Relative effect of each tested correlation edge against its Pearson."""
    for (a, b), edges in sorted((k, v) for k, v in corr.items() if v is not None):
        part = frame.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b) & pl.col("exact"))
        part = part.join(edges, on=["feature_a", "feature_b"]).drop_nulls("relative_effect")
        if part.height:
            ax.scatter(
                part["pearson"], part["relative_effect"], s=5, alpha=0.5, label=pair_label((a, b))
            )
    for y in (cfg.min_effect, -cfg.min_effect):
        ax.axhline(y, color="grey", ls=":", lw=1)
    ax.set_xlabel("pearson of the correlation edge")
    ax.set_ylabel("relative effect of ablating the source")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_attribution(frame: pl.DataFrame, path: PathLike) -> Path:
    """Attribution estimate against the exact total effect, one panel per layer pair."""
    tested = frame.filter(pl.col("exact")).drop_nulls(["attribution", "total_effect"])
    pairs = sorted(tested.select("layer_a", "layer_b").unique().rows())
    fig = Figure(figsize=(3.6 * max(len(pairs), 1) + 0.5, 3.8), layout="constrained")
    fig.suptitle("attribution patching (first order) vs exact patching: Σ_t Δf_j per patched token")
    if not pairs:
        no_data(fig, "no exactly patched pairs")
        return save(fig, path)
    for ax, (a, b) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs, strict=True):
        part = tested.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))
        x, y = part["total_effect"].to_numpy(), part["attribution"].to_numpy()
        ax.scatter(x, y, s=3, alpha=0.4)
        lim = float(np.abs(np.concatenate([x, y])).max()) if x.size else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
        r = np.corrcoef(x, y)[0, 1] if x.size > 2 else float("nan")
        ax.set_title(f"{pair_label((a, b))}: r = {r:.2f}", fontsize=10)
        ax.set_xlabel("exact")
        ax.set_ylabel("attribution")
    return save(fig, path)
