"""The cross-layer feature graph: SAE features as nodes, strong pair statistics as edges.

Input is one polars frame of pair statistics per layer pair (the shape `featstore.stats.pair_stats`
returns: `feature_a, feature_b` plus statistic columns); an edge goes from feature `a` of the lower
layer to feature `b` of the higher one wherever the chosen measure (any of `featstore.measures`)
reaches the threshold and, for a data measure, the pair was active together on `min_both` tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import polars as pl

from featstore.analysis.decoders import decoder_cosine, store_decoders
from featstore.defaults import DEFAULT_ENGINE, EDGE_THRESHOLD, MIN_BOTH, PAIR_SUMS, pair_schema
from featstore.errors import FeatstoreError
from featstore.files import atomic_file, write_parquet_atomic
from featstore.names import node_id
from featstore.stats.measures import DATA_FREE, above, check_measure, passing
from featstore.stats.measures import RANGES as METRICS  # measures an edge can be thresholded on
from featstore.stats.query import PairQuery, merged_feature_stats, pair_stats
from featstore.store.local import Store

__all__ = ["METRICS", "MIN_BOTH", "above", "build_graph", "check_metric", "export_graph"]
KEYS = ("feature_a", "feature_b")
# Statistic columns of `pair_stats`, typed so that an empty edge list keeps its schema.
STAT_SCHEMA: dict[str, pl.DataType] = pair_schema((*PAIR_SUMS, "pearson", "agreement", "jaccard"))
EDGE_KEYS: dict[str, pl.DataType] = {
    "layer_a": pl.Int64(),
    "feature_a": pl.Int64(),
    "layer_b": pl.Int64(),
    "feature_b": pl.Int64(),
}

PairFrames = Mapping[tuple[int, int], pl.DataFrame]


check_metric = check_measure


def support(metric: str, min_both: int) -> int:
    """The min_both that applies: none to a data-free measure."""
    if min_both < 0:
        raise FeatstoreError(f"min_both must be >= 0, got {min_both}")
    return 0 if metric in DATA_FREE else min_both


def check_pair_frame(pair: tuple[int, int], frame: pl.DataFrame, metric: str, min_both: int = 0):
    a, b = pair
    if a >= b:
        raise FeatstoreError(f"layer pair {a}-{b}: the first layer must be below the second")
    need = (*KEYS, metric, *(["n_both"] if min_both > 0 else []))
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise FeatstoreError(f"pair statistics {a}-{b} lack column(s) {', '.join(missing)}")


def build_graph(
    pair_frames: PairFrames,
    metric: str = "pearson",
    threshold: float = EDGE_THRESHOLD,
    min_both: int | None = None,
) -> nx.DiGraph:
    """Directed graph of feature pairs with `metric >= threshold` (and, for a data measure,
    `n_both >= min_both`); edges carry every statistic. `min_both` None: `MIN_BOTH` for frames
    that have an `n_both` column, none for frames without."""
    check_metric(metric, threshold)
    graph = nx.DiGraph(metric=metric, threshold=float(threshold))
    for (a, b), frame in sorted(pair_frames.items()):
        known = MIN_BOTH if "n_both" in frame.columns else 0
        need = support(metric, known if min_both is None else min_both)
        check_pair_frame((a, b), frame, metric, need)
        for row in frame.filter(passing({metric: threshold}, need)).iter_rows(named=True):
            fa, fb = row.pop("feature_a"), row.pop("feature_b")
            u, v = node_id(a, fa), node_id(b, fb)
            graph.add_node(u, layer=a, feature=fa)
            graph.add_node(v, layer=b, feature=fb)
            # A null statistic (Pearson of a flat feature) is left out, as GraphML expects.
            graph.add_edge(u, v, **{k: x for k, x in row.items() if x is not None})
    return graph


# -- export --------------------------------------------------------------------------------------


def write_graphml(graph: nx.DiGraph, path: str | os.PathLike[str]) -> Path:
    with atomic_file(path) as tmp:
        nx.write_graphml(graph, tmp)
    return Path(path)


def edge_list(graph: nx.DiGraph) -> pl.DataFrame:
    """One row per edge: `layer_a, feature_a, layer_b, feature_b` and the edge's statistics."""
    rows = [
        {
            "layer_a": graph.nodes[u]["layer"],
            "feature_a": graph.nodes[u]["feature"],
            "layer_b": graph.nodes[v]["layer"],
            "feature_b": graph.nodes[v]["feature"],
            **attrs,
        }
        for u, v, attrs in graph.edges(data=True)
    ]
    if not rows:
        return pl.DataFrame(schema={**EDGE_KEYS, **STAT_SCHEMA})
    frame = pl.from_dicts(rows, infer_schema_length=None)
    known = {k: t for k, t in {**EDGE_KEYS, **STAT_SCHEMA}.items() if k in frame.columns}
    extra = [c for c in frame.columns if c not in known]
    return frame.cast(known).select(*known, *extra).sort(list(EDGE_KEYS))


def write_edge_list(graph: nx.DiGraph, path: str | os.PathLike[str]) -> Path:
    return write_parquet_atomic(edge_list(graph), path)


# -- summary -------------------------------------------------------------------------------------


def degree_summary(degrees: pl.Series) -> dict[str, Any]:
    """Count, mean, quantiles and a power-of-two histogram of the (nonzero) degrees."""
    values = degrees.to_numpy().astype(np.int64)
    if values.size == 0:
        return {"nodes": 0, "mean": 0.0, "max": 0, "quantiles": {}, "histogram": {}}
    probs = (0.5, 0.9, 0.99)
    # Bins [1], [2, 3], [4, 7], ...: degrees span orders of magnitude in a real model.
    counts = np.bincount(np.floor(np.log2(values)).astype(np.int64))
    return {
        "nodes": int(values.size),
        "mean": float(values.mean()),
        "max": int(values.max()),
        "quantiles": {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in probs},
        "histogram": {
            ("1" if k == 0 else f"{1 << k}-{(2 << k) - 1}"): int(n)
            for k, n in enumerate(counts)
            if n
        },
    }


def degrees(edges: pl.DataFrame, side: str, layer: int) -> pl.Series:
    """Edges per feature of `layer` on one side (`a`: out-degree, `b`: in-degree)."""
    mine = edges.filter(pl.col(f"layer_{side}") == layer)
    return mine.group_by(f"feature_{side}").len()["len"]


def share(count: int, total: int | None) -> float | None:
    return count / total if total else None


def graph_summary(
    graph: nx.DiGraph,
    layers: Sequence[int],
    d_sae_by_layer: Mapping[int, int],
    active_by_layer: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """JSON-ready counts: edges per layer pair, degree distributions, successor shares.

    `active_by_layer` is the number of features with at least one active token (for the share of
    live features with a successor); without it that share is None.
    """
    layers = sorted(layers)
    edges = edge_list(graph)
    per_pair = edges.group_by("layer_a", "layer_b").len().sort("layer_a", "layer_b")
    successors = {}
    for here, nxt in itertools.pairwise(layers):
        step = edges.filter((pl.col("layer_a") == here) & (pl.col("layer_b") == nxt))
        n = step["feature_a"].n_unique()
        active = None if active_by_layer is None else int(active_by_layer[here])
        successors[str(here)] = {
            "next_layer": nxt,
            "with_successor": n,
            "active": active,
            "d_sae": int(d_sae_by_layer[here]),
            "share_of_active": share(n, active),
            "share_of_d_sae": share(n, int(d_sae_by_layer[here])),
        }
    return {
        "metric": graph.graph.get("metric"),
        "threshold": graph.graph.get("threshold"),
        "layers": layers,
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "edges_per_pair": {f"{a}-{b}": n for a, b, n in per_pair.iter_rows()},
        "out_degree": {str(lay): degree_summary(degrees(edges, "a", lay)) for lay in layers},
        "in_degree": {str(lay): degree_summary(degrees(edges, "b", lay)) for lay in layers},
        "successors": successors,
    }


def strongest_subgraph(graph: nx.DiGraph, n_edges: int) -> nx.DiGraph:
    """The `n_edges` edges with the largest |metric| (the one the graph was built on), as a copy."""
    if n_edges < 0:
        raise FeatstoreError(f"n_edges must be >= 0, got {n_edges}")
    metric = graph.graph.get("metric", "pearson")

    def strength(edge: tuple[str, str, dict[str, Any]]) -> tuple[float, str, str]:
        u, v, attrs = edge
        value = attrs.get(metric, math.nan)
        return (-abs(value) if not math.isnan(value) else math.inf, u, v)

    keep = sorted(graph.edges(data=True), key=strength)[:n_edges]
    sub = graph.edge_subgraph((u, v) for u, v, _ in keep).copy()
    sub.graph.update(graph.graph)
    return sub


# -- from a store --------------------------------------------------------------------------------

GRAPHML = "graph.graphml"
EDGES = "edges.parquet"
SUMMARY = "summary.json"


def adjacent_pairs(layers: Sequence[int]) -> list[tuple[int, int]]:
    ordered = sorted(set(layers))
    if len(ordered) < 2:
        raise FeatstoreError(f"a feature graph needs at least two layers, got {list(layers)}")
    return list(itertools.pairwise(ordered))


def store_pair_frames(
    store: Store,
    layers: Sequence[int],
    *,
    metric: str,
    threshold: float,
    engine: str = DEFAULT_ENGINE,
    min_both: int = MIN_BOTH,
    top_k: int = 10,
) -> dict[tuple[int, int], pl.DataFrame]:
    """Pair statistics of each adjacent layer pair passing the edge test, filtered by the stats
    API; for `decoder_cosine`, the `top_k` cosines of each feature (`decoders.decoder_cosine`)."""
    check_metric(metric, threshold)
    if metric in DATA_FREE:
        pairs = adjacent_pairs(layers)
        w = store_decoders(store, [x for p in pairs for x in p])
        return {
            (a, b): decoder_cosine(w[a], w[b], top_k).filter(above(metric, threshold))
            for a, b in pairs
        }
    return {
        (a, b): pair_stats(
            store, PairQuery(a, b, engine=engine, thresholds={metric: threshold}, min_both=min_both)
        )
        for a, b in adjacent_pairs(layers)
    }


def layer_sizes(store: Store, layers: Sequence[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Per layer: d_sae, and how many features fire on at least one token (all shards)."""
    d_sae, active = {}, {}
    for layer in layers:
        shards = store.shards(layer)
        if not shards:
            raise FeatstoreError(f"layer {layer} has no activations in store {store.home}")
        count = merged_feature_stats(store, layer, shards).count
        d_sae[layer], active[layer] = int(count.size), int((count > 0).sum())
    return d_sae, active


def export_graph(
    store: Store,
    out: str | os.PathLike[str],
    *,
    layers: Sequence[int],
    metric: str = "pearson",
    threshold: float = EDGE_THRESHOLD,
    engine: str = DEFAULT_ENGINE,
    min_both: int = MIN_BOTH,
) -> tuple[nx.DiGraph, dict[str, Any]]:
    """Build the graph of adjacent layers and write graph.graphml, edges.parquet, summary.json."""
    frames = store_pair_frames(
        store, layers, metric=metric, threshold=threshold, engine=engine, min_both=min_both
    )
    graph = build_graph(frames, metric=metric, threshold=threshold, min_both=min_both)
    summary = graph_summary(graph, layers, *layer_sizes(store, layers))
    summary["min_both"] = support(metric, min_both)
    out = Path(out)
    write_graphml(graph, out / GRAPHML)
    write_edge_list(graph, out / EDGES)
    with atomic_file(out / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return graph, summary
