"""PNG figures of the causal edges: against the correlation graph, attribution vs exact, and
the ablation effect by similarity bin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from featstore.figures import PathLike, no_data, pair_label, save

BARS = {
    "correlation_edges_tested": "correlation edges (measured)",
    "correlation_edges_causal": "… of which causal",
    "causal_edges": "causal edges",
    "causal_edges_missed": "… not in the correlation graph",
}


def plot_comparison(frame: pl.DataFrame, comparison: pl.DataFrame, cfg, path: PathLike) -> Path:
    """Left: counts per layer pair; right: Pearson vs relative effect of every measured pair
    that has a Pearson correlation (co-active pairs)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    fig.suptitle(
        f"causal edges (|relative effect| ≥ {cfg.min_effect}, ≥ {cfg.min_tokens} tokens) vs "
        f"correlation edges (pearson ≥ {cfg.edges.min_pearson})"
    )
    left, right = fig.subplots(1, 2)
    if comparison.height == 0:
        left.text(0.5, 0.5, "no pairs measured", ha="center", transform=left.transAxes)
    x = np.arange(comparison.height)
    width = 0.8 / len(BARS)
    for k, (col, label) in enumerate(BARS.items()):
        bars = left.bar(x + (k - 1.5) * width, comparison[col].fill_null(0), width, label=label)
        left.bar_label(bars, fontsize=7)
    left.set_xticks(x, [pair_label(p) for p in comparison.select("layer_a", "layer_b").rows()])
    left.set_ylabel("feature pairs")
    left.legend(fontsize=8)
    _pearson_scatter(right, frame, cfg)
    return save(fig, path)


def _pearson_scatter(ax, frame: pl.DataFrame, cfg) -> None:
    """Relative effect of each measured co-active pair against its Pearson."""
    measured = frame.drop_nulls(["pearson", "relative_effect"])
    for (a, b), part in sorted(measured.group_by("layer_a", "layer_b")):
        ax.scatter(part["pearson"], part["relative_effect"], s=5, alpha=0.5,
                   label=pair_label((a, b)))
    for y in (cfg.min_effect, -cfg.min_effect):
        ax.axhline(y, color="grey", ls=":", lw=1)
    ax.axvline(cfg.edges.min_pearson, color="grey", ls="--", lw=1)
    ax.set_xlabel("pearson of the pair")
    ax.set_ylabel("relative effect of ablating the source")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_attribution(frame: pl.DataFrame, path: PathLike) -> Path:
    """Attribution estimate against the exact total effect, one panel per layer pair."""
    measured = frame.drop_nulls(["attribution", "total_effect"])
    pairs = sorted(measured.select("layer_a", "layer_b").unique().rows())
    fig = Figure(figsize=(3.6 * max(len(pairs), 1) + 0.5, 3.8), layout="constrained")
    fig.suptitle("attribution patching (first order) vs exact patching: Σ_t Δf_j per patched token")
    if not pairs:
        no_data(fig, "no pairs with both estimates")
        return save(fig, path)
    for ax, (a, b) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs, strict=True):
        part = measured.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))
        x, y = part["total_effect"].to_numpy(), part["attribution"].to_numpy()
        ax.scatter(x, y, s=3, alpha=0.4)
        lim = float(np.abs(np.concatenate([x, y])).max()) if x.size else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
        r = np.corrcoef(x, y)[0, 1] if x.size > 2 else float("nan")
        ax.set_title(f"{pair_label((a, b))}: r = {r:.2f}", fontsize=10)
        ax.set_xlabel("exact")
        ax.set_ylabel("attribution")
    return save(fig, path)


def plot_bins(bins: pl.DataFrame, cfg, path: PathLike) -> Path:
    """Mean |relative effect| and share of causal edges per bin of the binned measure, with
    standard errors, one line per layer pair."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(f"ablation effect by {cfg.edges.measure} bin ({cfg.edges.per_bin} pairs a bin)")
    if bins.height == 0:
        no_data(fig, "no binned pairs measured")
        return save(fig, path)
    left, right = fig.subplots(1, 2)
    for (a, b), part in sorted(bins.group_by("layer_a", "layer_b")):
        mid = ((part["lo"] + part["hi"]) / 2).to_numpy()
        label = pair_label((a, b))
        left.errorbar(mid, part["mean_abs_effect"], part["sem_abs_effect"].fill_null(0),
                      marker="o", capsize=3, label=label)
        right.errorbar(mid, part["share_causal"], part["sem_share_causal"].fill_null(0),
                       marker="o", capsize=3, label=label)
    left.set_ylabel("mean |relative effect| (± s.e.)")
    right.set_ylabel(f"share causal (|rel. effect| ≥ {cfg.min_effect}) (± s.e.)")
    for ax in (left, right):
        ax.set_xlabel(cfg.edges.measure)
        ax.legend(fontsize=8)
    return save(fig, path)
