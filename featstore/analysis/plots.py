"""PNG figures of cross-layer feature statistics and of the feature graph.

Every function takes the data, an output path and a `title_context` (e.g. "source tiny, layers
6-9, threshold 0.2") that goes into the title, writes the PNG atomically and returns its path.
Figures are built on `matplotlib.figure.Figure` (Agg canvas), never through pyplot's global state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from featstore.analysis.graph import (
    EDGE_KEYS,
    METRICS,
    MIN_BOTH,
    PairFrames,
    adjacent_pairs,
    check_metric,
    edges_graph,
    layer_sizes,
    strongest_edges,
    strongest_subgraph,
)
from featstore.defaults import AGREEMENT_THRESHOLD, DEFAULT_ENGINE, EDGE_THRESHOLD
from featstore.errors import FeatstoreError
from featstore.figures import PathLike, no_data, pair_label, save
from featstore.stats.bests import count_value, several_bests
from featstore.stats.query import PairQuery, pair_stats
from featstore.stats.scan import PairScan
from featstore.store.local import Store

# -- block heatmap -------------------------------------------------------------------------------


def pair_matrix(frame: pl.DataFrame, features: tuple[int, int], metric: str) -> np.ndarray:
    """(n, n) matrix of `metric` over the feature range; NaN where the frame has no row."""
    lo, hi = features
    inside = pl.col("feature_a").is_between(lo, hi - 1) & pl.col("feature_b").is_between(lo, hi - 1)
    rows = frame.filter(inside)
    matrix = np.full((hi - lo, hi - lo), np.nan)
    matrix[rows["feature_a"].to_numpy() - lo, rows["feature_b"].to_numpy() - lo] = rows[metric]
    return matrix


def block_heatmap(
    pair_frames: PairFrames,
    path: PathLike,
    *,
    title_context: str,
    features: tuple[int, int] = (0, 100),
    threshold: float = EDGE_THRESHOLD,
    metric: str = "pearson",
) -> Path:
    """One block per layer pair, side by side: `metric` between the features of the range.

    Cells at or above `threshold` are ringed; grey cells have no statistic (no row, or NaN).
    """
    lo, hi = features
    pairs = sorted(pair_frames)
    matrices = [pair_matrix(pair_frames[p], features, metric) for p in pairs]
    fig = Figure(figsize=(4.2 * max(len(pairs), 1) + 1.2, 4.6), layout="constrained")
    fig.suptitle(f"{metric} of features {lo}-{hi - 1}, adjacent layers — {title_context}")
    if not pairs:
        no_data(fig, "no layer pairs")
        return save(fig, path)
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices])
    vlim = min(1.0, max(abs(threshold), float(np.abs(finite).max()) if finite.size else 0.0))
    signed = METRICS[metric][0] < 0
    cmap = colormaps["RdBu_r" if signed else "viridis"].with_extremes(bad="0.85")
    norm = Normalize(-vlim if signed else 0.0, vlim)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    extent = (lo - 0.5, hi - 0.5, hi - 0.5, lo - 0.5)
    for ax, (a, b), matrix in zip(axes, pairs, matrices, strict=True):
        ax.imshow(matrix, cmap=cmap, norm=norm, extent=extent, interpolation="nearest")
        with np.errstate(invalid="ignore"):
            hot_a, hot_b = np.nonzero(matrix >= threshold)
        ax.scatter(lo + hot_b, lo + hot_a, s=14, facecolors="none", edgecolors="black", lw=0.7)
        ax.set_title(f"{pair_label((a, b))}: {len(hot_a)} ≥ {threshold}", fontsize=10)
        ax.set_xlabel(f"layer {b} feature")
        ax.set_ylabel(f"layer {a} feature")
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label=metric, shrink=0.85)
    return save(fig, path)


# -- distributions and counts --------------------------------------------------------------------


# A measure's histogram: the bin edges and, per layer pair, the counts in those bins.
Histogram = tuple[np.ndarray, Mapping[tuple[int, int], np.ndarray]]


def cooccurrence_histograms(
    histograms: Mapping[str, Histogram],
    path: PathLike,
    *,
    title_context: str,
    thresholds: Mapping[str, float] | None = None,
    population: str = "feature pairs",
) -> Path:
    """Each measure's histogram, one line per layer pair, log counts.

    `population` names what was counted (e.g. "co-active feature pairs") on the axes.
    """
    fig = Figure(figsize=(5.5 * len(histograms), 4.2), layout="constrained")
    fig.suptitle(f"co-occurrence of {population} — {title_context}")
    axes = fig.subplots(1, len(histograms), squeeze=False)[0]
    for ax, (measure, (edges, counted)) in zip(axes, histograms.items(), strict=True):
        for pair in sorted(counted):
            label = f"{pair_label(pair)} ({int(counted[pair].sum()):,})"
            ax.stairs(counted[pair], edges, label=label, lw=1.4)
        if thresholds and measure in thresholds:
            t = thresholds[measure]
            ax.axvline(t, color="black", ls="--", lw=1, label=f"threshold {t}")
        ax.set_yscale("log")
        ax.set_xlabel(measure)
        ax.set_ylabel(population)
        ax.set_title(measure)
        ax.legend(fontsize=8)
    return save(fig, path)


def threshold_bars(
    counts: pl.DataFrame,
    path: PathLike,
    *,
    title_context: str,
    thresholds: Mapping[str, float],
    population: str = "feature pairs",
) -> Path:
    """Grouped bars of `counts` (`layer_a, layer_b, metric, count`: rows at or above each
    measure's threshold), per layer pair."""
    pairs = sorted(set(counts.select("layer_a", "layer_b").iter_rows()))
    fig = Figure(figsize=(2.0 * len(pairs) + 2.5, 4.5), layout="constrained")
    fig.suptitle(f"{population} above threshold — {title_context}")
    ax = fig.add_subplot()
    width = 0.8 / max(len(thresholds), 1)
    x = np.arange(len(pairs))
    for i, (metric, t) in enumerate(thresholds.items()):
        heights = counts.filter(pl.col("metric") == metric).sort("layer_a", "layer_b")["count"]
        bars = ax.bar(
            x + (i - (len(thresholds) - 1) / 2) * width, heights.to_numpy(), width,
            label=f"{metric} ≥ {t}",
        )  # fmt: skip
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    positive = counts.filter(pl.col("count") > 0)["count"]
    # Measures differ by orders of magnitude in how many pairs pass; log keeps all bars visible.
    if positive.len() and positive.max() > 50 * positive.min():
        ax.set_yscale("log")
    ax.set_xticks(x, [pair_label(p) for p in pairs])
    ax.set_ylabel(population)
    ax.legend(fontsize=9)
    return save(fig, path)


# -- layered graph drawing -----------------------------------------------------------------------


def layered_positions(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x = layer, y = minus a row; each connected component gets its own block of rows.

    Inside a block a node follows its predecessors' heights, so a chain of features through the
    layers is one horizontal line; blocks over disjoint layers share rows.
    """
    pos: dict[str, tuple[float, float]] = {}
    layers = sorted({lay for _, lay in graph.nodes(data="layer")})
    free = dict.fromkeys(layers, 0.0)  # first free row in each layer column

    def first(component: set[str]) -> tuple[int, int]:
        return min((graph.nodes[n]["layer"], graph.nodes[n]["feature"]) for n in component)

    def key(node: str) -> tuple[float, int]:
        ys = [pos[p][1] for p in graph.predecessors(node)]
        return (-float(np.mean(ys)) if ys else math.inf, graph.nodes[node]["feature"])

    blocks = []
    for component in sorted(nx.weakly_connected_components(graph), key=first):
        by_layer: dict[int, list[str]] = defaultdict(list)
        for node in component:
            by_layer[graph.nodes[node]["layer"]].append(node)
        span = [lay for lay in layers if min(by_layer) <= lay <= max(by_layer)]
        blocks.append((span, by_layer))
    while blocks:
        # Greedy: next the block that fits highest, so blocks over disjoint layers share rows.
        i = min(range(len(blocks)), key=lambda j: max(free[lay] for lay in blocks[j][0]))
        span, by_layer = blocks.pop(i)
        top = max(free[lay] for lay in span)
        for layer in sorted(by_layer):
            for row, node in enumerate(sorted(by_layer[layer], key=key)):
                pos[node] = (float(layer), -(top + row))
        rows = max(len(nodes) for nodes in by_layer.values())
        free.update(dict.fromkeys(span, top + rows + 0.5))  # half a row between blocks
    return pos


def layered_drawing(
    graph: nx.DiGraph, path: PathLike, *, title_context: str, n_edges: int = 60
) -> Path:
    """The `n_edges` strongest edges, layers as columns, edges coloured and sized by weight."""
    sub = strongest_subgraph(graph, n_edges)
    metric = sub.graph.get("metric", "pearson")
    pos = layered_positions(sub)
    rows = -min((y for _, y in pos.values()), default=0.0) + 1
    fig = Figure(figsize=(8.0, max(4.5, 0.26 * rows + 2.0)), layout="constrained")
    fig.suptitle(f"{sub.number_of_edges()} strongest edges by {metric} — {title_context}")
    if sub.number_of_edges() == 0:
        no_data(fig, "no edges above threshold")
        return save(fig, path)
    ax = fig.add_subplot()
    weights = np.array([w for _, _, w in sub.edges(data=metric)], dtype=float)
    norm = Normalize(weights.min(), max(weights.max(), weights.min() + 1e-9))
    cmap = colormaps["plasma"]
    nx.draw_networkx_edges(
        sub,
        pos,
        ax=ax,
        edge_color=cmap(norm(weights)),
        width=0.6 + 3.0 * norm(weights),
        arrowsize=9,
        node_size=350,  # arrows stop short of the feature-id boxes drawn below
    )
    # Each node is drawn as its feature id in a box: readable at any number of digits.
    labels = {n: str(f) for n, f in sub.nodes(data="feature")}
    box = {"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.35", "lw": 0.8}
    nx.draw_networkx_labels(sub, pos, labels, ax=ax, font_size=7, bbox=box)
    layers = sorted({x for x, _ in pos.values()})
    ax.set_xticks(layers, [f"layer {int(x)}" for x in layers])
    ax.tick_params(left=False, labelleft=False, bottom=False, top=False, labeltop=True)
    ax.set_xlim(layers[0] - 0.3, layers[-1] + 0.3)
    ax.set_ylim(-rows + 0.5, 0.7)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(
        ScalarMappable(norm, cmap), ax=ax, label=metric, location="bottom", shrink=0.5, aspect=40
    )
    return save(fig, path)


# -- from a store --------------------------------------------------------------------------------


def describe_context(store: Store, layers: Sequence[int], threshold: float) -> str:
    """E.g. "source tiny, layers 6-9, threshold 0.2"."""
    ordered = sorted(set(layers))
    source = store.info(ordered[0], store.shards(ordered[0])[0]).get("source", "?")
    contiguous = ordered == list(range(ordered[0], ordered[-1] + 1))
    span = f"{ordered[0]}-{ordered[-1]}" if contiguous else ",".join(map(str, ordered))
    return f"source {source}, layers {span}, threshold {threshold}"


@dataclass(frozen=True)
class PlotNumbers:
    """What the distribution figures draw, over every co-active pair of each adjacent pair."""

    histograms: dict[str, Histogram]  # measure -> bin edges, counts per layer pair
    counts: pl.DataFrame  # layer_a, layer_b, metric, count: pairs reaching each threshold
    edges: pl.DataFrame  # the `n_edges` strongest graph edges (Pearson, co-active on MIN_BOTH)


def bin_edges(measure: str, scans: Sequence[PairScan], bins: int) -> np.ndarray:
    """Uniform bin edges over the values `measure` can take on a co-active pair of the scans.

    Agreement gets [its smallest possible value, 1]: co-active on one token, the features the
    busiest of their layers (the kernel's formula, so no value falls below); the other
    measures their whole range. Fixed before the pass, so one pass counts every pair.
    """
    lo, hi = METRICS[measure]
    if measure == "agreement":
        n = int(scans[0].stats_a.n_tokens)
        busiest = [(int(s.stats_a.count.max()), int(s.stats_b.count.max())) for s in scans]
        lo = min(count_value(measure, 1, ca, cb, n) for ca, cb in busiest)
        lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # as np.histogram_bin_edges
    return np.linspace(lo, hi, bins + 1)


def plot_numbers(
    store: Store,
    layers: Sequence[int],
    thresholds: Mapping[str, float],
    *,
    measures: Sequence[str] = ("agreement", "jaccard"),
    bins: int = 50,
    n_edges: int = 60,
    engine: str = DEFAULT_ENGINE,
) -> PlotNumbers:
    """One compiled pass per adjacent layer pair (`stats.bests`) over every co-active pair:
    histograms of `measures`, counts reaching `thresholds`, and the graph edges (Pearson at
    `thresholds["pearson"]`, co-active on MIN_BOTH tokens) of which the `n_edges` strongest are
    kept. Memory holds the edges, never a table of every pair."""
    pairs = adjacent_pairs(layers)
    scans = {(a, b): PairScan.open(store, a, b, engine=engine, save=False) for a, b in pairs}
    edges_of = {m: bin_edges(m, list(scans.values()), bins) for m in measures}
    hists: dict[str, dict[tuple[int, int], np.ndarray]] = {m: {} for m in measures}
    counts, edge_frames = [], []
    for (a, b), scan in scans.items():
        found = several_bests(scan, thresholds, 1, edge=("pearson", thresholds["pearson"]),
                              edge_min_both=MIN_BOTH, bins=edges_of)  # fmt: skip
        for m in measures:
            hists[m][(a, b)] = found.histograms[m]
        counts += [{"layer_a": a, "layer_b": b, "metric": m, "count": found.above[m]}
                   for m in thresholds]  # fmt: skip
        e = found.edges
        edge_frames.append(pl.DataFrame(
            {"layer_a": a, "feature_a": e.feature_a.astype(np.int64), "layer_b": b,
             "feature_b": e.feature_b.astype(np.int64), "pearson": e.sum_xy, "n_both": e.n_both},
            schema_overrides={"layer_a": pl.Int64, "layer_b": pl.Int64},
        ))  # fmt: skip
    schema = {"layer_a": pl.Int64, "layer_b": pl.Int64, "metric": pl.String, "count": pl.Int64}
    strongest = strongest_edges(pl.concat(edge_frames), "pearson", n_edges) if edge_frames else (
        pl.DataFrame(schema={k: pl.Int64 for k in EDGE_KEYS} | {"pearson": pl.Float64}))
    return PlotNumbers({m: (edges_of[m], hists[m]) for m in measures},
                       pl.DataFrame(counts, schema=schema), strongest)  # fmt: skip


def plot_store(
    store: Store,
    out: PathLike,
    *,
    layers: Sequence[int],
    threshold: float = EDGE_THRESHOLD,
    agreement_threshold: float = AGREEMENT_THRESHOLD,
    features: tuple[int, int] = (0, 100),
    n_edges: int = 60,
    engine: str = DEFAULT_ENGINE,
) -> list[Path]:
    """All four figures of adjacent layer pairs into `out`; `threshold` is Pearson's and Jaccard's.

    The feature range of the heatmap is cut to the smallest d_sae of the layers. The other
    figures come from `plot_numbers`: one pass per layer pair, no table of every pair written
    or held.
    """
    check_metric("pearson", threshold)
    check_metric("agreement", agreement_threshold)
    pairs = adjacent_pairs(layers)
    d_sae, _ = layer_sizes(store, layers)
    block = (features[0], min(features[1], *d_sae.values()))
    if block[0] >= block[1]:
        raise FeatstoreError(f"feature range {features[0]}:{features[1]} is outside 0:{block[1]}")
    thresholds = {"pearson": threshold, "agreement": agreement_threshold, "jaccard": threshold}
    numbers = plot_numbers(store, layers, thresholds, n_edges=n_edges, engine=engine)
    ranged = {
        (a, b): pair_stats(
            store,
            PairQuery(a, b, engine=engine, features_a=block, features_b=block, all_pairs=True),
        )
        for a, b in pairs
    }
    context = describe_context(store, layers, threshold)
    # Pairs that never fire together are not counted (they can still pass an agreement bar).
    population = "co-active feature pairs"
    out = Path(out)
    return [
        block_heatmap(
            ranged, out / "heatmap.png", title_context=context, features=block, threshold=threshold
        ),
        cooccurrence_histograms(
            numbers.histograms,
            out / "cooccurrence.png",
            title_context=context,
            thresholds=thresholds,
            population=population,
        ),
        threshold_bars(
            numbers.counts,
            out / "threshold_counts.png",
            title_context=context,
            thresholds=thresholds,
            population=population,
        ),
        layered_drawing(
            edges_graph(numbers.edges, "pearson", threshold),
            out / "graph.png",
            title_context=context,
            n_edges=n_edges,
        ),
    ]
