"""PNG figures of cross-layer feature statistics and of the feature graph.

Every function takes the data, an output path and a `title_context` (e.g. "source tiny, layers
6-9, threshold 0.2") that goes into the title, writes the PNG atomically and returns its path.
Figures are built on `matplotlib.figure.Figure` (Agg canvas), never through pyplot's global state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from featstore.analysis.graph import (
    METRICS,
    MIN_BOTH,
    PairFrames,
    above,
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
from featstore.stats.measures import passing
from featstore.stats.query import PairQuery, pair_stats, pair_stats_path, save_pair_table
from featstore.store.local import Store

# Tables of pairs by layer pair, in memory or lazy (a scan of a whole table on disk).
PairTables = Mapping[tuple[int, int], pl.DataFrame | pl.LazyFrame]

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


def cooccurrence_histograms(
    pair_frames: PairTables,
    path: PathLike,
    *,
    title_context: str,
    measures: Sequence[str] = ("agreement", "jaccard"),
    thresholds: Mapping[str, float] | None = None,
    bins: int = 50,
    population: str = "feature pairs",
) -> Path:
    """Histogram of each measure over the frames' rows, one line per layer pair, log counts.

    `population` names what the rows are (e.g. "co-active feature pairs") on the axes.
    """
    fig = Figure(figsize=(5.5 * len(measures), 4.2), layout="constrained")
    fig.suptitle(f"co-occurrence of {population} — {title_context}")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures, strict=True):
        edges, counted = histograms(pair_frames, measure, bins)
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


def histograms(
    pair_frames: PairTables, measure: str, bins: int = 50
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Bin edges over the finite values of `measure` in all frames (its range when there are
    none), and each frame's counts in those bins (`np.histogram`'s bins: the last one closed).

    Frames may be lazy (`pl.scan_parquet` of a whole table): both passes run on polars'
    streaming engine, so a table is never held.
    """
    finite = pl.col(measure).is_finite()
    span = [
        frame.lazy().filter(finite).select(lo=pl.col(measure).min(), hi=pl.col(measure).max())
        for frame in pair_frames.values()
    ]
    ends = pl.concat(span).select(pl.col("lo").min(), pl.col("hi").max()).collect(
        engine="streaming").row(0) if span else (None, None)  # fmt: skip
    lo, hi = METRICS[measure] if ends[0] is None else ends
    lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)  # as np.histogram_bin_edges
    edges = np.linspace(lo, hi, bins + 1)
    index = ((pl.col(measure) - lo) / (hi - lo) * bins).floor().clip(0, bins - 1).cast(pl.Int64)
    counted = {}
    for pair, frame in pair_frames.items():
        found = frame.lazy().filter(finite).group_by(index.alias("bin")).len().collect(
            engine="streaming")  # fmt: skip
        counts = np.zeros(bins, dtype=np.int64)
        counts[found["bin"].to_numpy()] = found["len"].to_numpy()
        counted[pair] = counts
    return edges, counted


def counts_above(pair_frames: PairTables, thresholds: Mapping[str, float]) -> pl.DataFrame:
    """`layer_a, layer_b, metric, count`: pairs whose metric reaches its threshold (frames may
    be lazy: counted on polars' streaming engine)."""
    rows = [
        {"layer_a": a, "layer_b": b, "metric": m, "count": n}
        for (a, b), frame in sorted(pair_frames.items())
        for m, n in frame.lazy().select(
            **{m: above(m, t).sum() for m, t in thresholds.items()}
        ).collect(engine="streaming").row(0, named=True).items()
    ]  # fmt: skip
    schema = {"layer_a": pl.Int64, "layer_b": pl.Int64, "metric": pl.String, "count": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def threshold_bars(
    pair_frames: PairTables,
    path: PathLike,
    *,
    title_context: str,
    thresholds: Mapping[str, float],
    population: str = "feature pairs",
) -> Path:
    """Grouped bars: rows at or above each measure's threshold, per layer pair."""
    counts = counts_above(pair_frames, thresholds)
    pairs = sorted(pair_frames)
    fig = Figure(figsize=(2.0 * len(pairs) + 2.5, 4.5), layout="constrained")
    fig.suptitle(f"{population} above threshold — {title_context}")
    ax = fig.add_subplot()
    width = 0.8 / max(len(thresholds), 1)
    x = np.arange(len(pairs))
    for i, (metric, t) in enumerate(thresholds.items()):
        heights = counts.filter(pl.col("metric") == metric)["count"].to_numpy()
        bars = ax.bar(
            x + (i - (len(thresholds) - 1) / 2) * width, heights, width, label=f"{metric} ≥ {t}"
        )
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
    fresh_tables: bool = False,
) -> list[Path]:
    """All four figures of adjacent layer pairs into `out`; `threshold` is Pearson's and Jaccard's.

    The feature range of the heatmap is cut to the smallest d_sae of the layers. The whole
    tables are written first (`save_pair_table`), unless `fresh_tables` says the caller has
    just written them (`pair_stats_path`), as the pipeline's statistics stage does.
    """
    check_metric("pearson", threshold)
    check_metric("agreement", agreement_threshold)
    pairs = adjacent_pairs(layers)
    d_sae, _ = layer_sizes(store, layers)
    block = (features[0], min(features[1], *d_sae.values()))
    if block[0] >= block[1]:
        raise FeatstoreError(f"feature range {features[0]}:{features[1]} is outside 0:{block[1]}")
    # Every co-active pair is streamed to disk and read back lazily; only the `n_edges` drawn
    # (the strongest graph edges: Pearson >= threshold, co-active on MIN_BOTH tokens) are held.
    full = {(a, b): pl.scan_parquet(pair_stats_path(store, a, b) if fresh_tables else
                                    save_pair_table(store, PairQuery(a, b, engine=engine)).path)
            for a, b in pairs}  # fmt: skip
    edge = passing({"pearson": threshold}, MIN_BOTH)
    graph_edges = pl.concat(
        [t.filter(edge).with_columns(layer_a=pl.lit(a, pl.Int64), layer_b=pl.lit(b, pl.Int64))
         .select("layer_a", pl.col("feature_a").cast(pl.Int64), "layer_b",
                 pl.col("feature_b").cast(pl.Int64), "pearson", "n_both")
         for (a, b), t in full.items()]
    )  # fmt: skip
    strongest = strongest_edges(graph_edges, "pearson", n_edges)
    ranged = {
        (a, b): pair_stats(
            store,
            PairQuery(a, b, engine=engine, features_a=block, features_b=block, all_pairs=True),
        )
        for a, b in pairs
    }
    context = describe_context(store, layers, threshold)
    thresholds = {"pearson": threshold, "agreement": agreement_threshold, "jaccard": threshold}
    # Pairs that never fire together are not rows here (they can still pass an agreement bar).
    population = "co-active feature pairs"
    out = Path(out)
    return [
        block_heatmap(
            ranged, out / "heatmap.png", title_context=context, features=block, threshold=threshold
        ),
        cooccurrence_histograms(
            full,
            out / "cooccurrence.png",
            title_context=context,
            thresholds=thresholds,
            population=population,
        ),
        threshold_bars(
            full,
            out / "threshold_counts.png",
            title_context=context,
            thresholds=thresholds,
            population=population,
        ),
        layered_drawing(
            edges_graph(strongest, "pearson", threshold),
            out / "graph.png",
            title_context=context,
            n_edges=n_edges,
        ),
    ]
