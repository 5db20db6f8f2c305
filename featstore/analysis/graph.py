"""The cross-layer feature graph: SAE features as nodes, strong pair statistics as edges.

Input is one polars frame of pair statistics per layer pair (the shape `featstore.stats.pair_stats`
returns: `feature_a, feature_b` plus statistic columns); an edge goes from feature `a` of the lower
layer to feature `b` of the higher one wherever the chosen measure (any of `featstore.measures`)
reaches the threshold and, for a data measure, the pair was active together on `min_both` tokens.

From a store (`export_graph`), the graph's primary form is a Parquet edge table written block by
block as the statistics yield the passing pairs (`edges.parquet`: `layer_a, feature_a, layer_b,
feature_b` and the statistics) with a node table (`nodes.parquet`: each feature with an edge, its
out- and in-degree) and `summary.json`, all computed from the table on disk, never held whole.
`graph.graphml` (for Gephi and networkx) is streamed from the table, edge by edge, up to
`GRAPHML_MAX_EDGES` edges (the strongest by |metric| beyond it; the summary names the cap and how
many it holds). Consumers read the edge table with filters (`read_edges`); networkx is used only
for in-memory graphs of few edges (`build_graph`: tests, the drawing, Louvain communities).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import polars as pl

from featstore.analysis.decoders import saved_decoder_cosine, store_decoders
from featstore.defaults import (
    DEFAULT_ENGINE,
    EDGE_THRESHOLD,
    GRAPHML_MAX_EDGES,
    MIN_BOTH,
    PAIR_SUMS,
    pair_schema,
)
from featstore.errors import FeatstoreError
from featstore.files import atomic_file, write_parquet_atomic, write_parquet_frames, writing
from featstore.names import node_id
from featstore.stats.measures import DATA_FREE, above, check_measure, passing
from featstore.stats.measures import RANGES as METRICS  # measures an edge can be thresholded on
from featstore.stats.query import PairQuery, merged_feature_stats, pair_blocks
from featstore.store.local import Store

__all__ = [
    "METRICS",
    "MIN_BOTH",
    "above",
    "build_graph",
    "check_metric",
    "export_graph",
    "read_edges",
]
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
        return empty_edges()
    return edge_columns(pl.from_dicts(rows, infer_schema_length=None)).sort(list(EDGE_KEYS))


def empty_edges() -> pl.DataFrame:
    return pl.DataFrame(schema={**EDGE_KEYS, **STAT_SCHEMA})


def edge_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """The edge table's column order and types: `EDGE_KEYS`, the known statistics, the rest."""
    known = {k: t for k, t in {**EDGE_KEYS, **STAT_SCHEMA}.items() if k in frame.columns}
    extra = [c for c in frame.columns if c not in known]
    return frame.cast(known).select(*known, *extra)


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


Edges = pl.DataFrame | pl.LazyFrame  # an edge table in memory, or a scan of edges.parquet
Graph = nx.DiGraph | Edges  # what the graph's consumers take


def as_edges(graph: Graph) -> Edges:
    """The edge table of a graph: a networkx graph's `edge_list`, else the table itself."""
    return edge_list(graph) if isinstance(graph, nx.DiGraph) else graph


def degrees(edges: Edges, side: str, layer: int) -> pl.Series:
    """Edges per feature of `layer` on one side (`a`: out-degree, `b`: in-degree)."""
    mine = edges.lazy().filter(pl.col(f"layer_{side}") == layer)
    return mine.group_by(f"feature_{side}").len().collect(engine="streaming")["len"]


def share(count: int, total: int | None) -> float | None:
    return count / total if total else None


def graph_summary(
    graph: nx.DiGraph | Edges,
    layers: Sequence[int],
    d_sae_by_layer: Mapping[int, int],
    active_by_layer: Mapping[int, int] | None = None,
    *,
    metric: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """JSON-ready counts: edges per layer pair, degree distributions, successor shares.

    `graph`: a networkx graph (its metric and threshold are its own) or an edge table, in memory
    or lazy (a scan of edges.parquet: every count is a query on it, the table is never held).
    `active_by_layer` is the number of features with at least one active token (for the share of
    live features with a successor); without it that share is None.
    """
    if isinstance(graph, nx.DiGraph):
        metric, threshold = graph.graph.get("metric"), graph.graph.get("threshold")
        graph = edge_list(graph)
    edges = graph.lazy()
    layers = sorted(layers)
    per_pair = edges.group_by("layer_a", "layer_b").len().sort("layer_a", "layer_b")
    per_pair = per_pair.collect(engine="streaming")
    successors = {}
    for here, nxt in itertools.pairwise(layers):
        step = edges.filter((pl.col("layer_a") == here) & (pl.col("layer_b") == nxt))
        n = step.select(pl.col("feature_a").n_unique()).collect(engine="streaming").item()
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
        "metric": metric,
        "threshold": threshold,
        "layers": layers,
        "nodes": node_table(edges).height,
        "edges": int(per_pair["len"].sum()),
        "edges_per_pair": {f"{a}-{b}": n for a, b, n in per_pair.iter_rows()},
        "out_degree": {str(lay): degree_summary(degrees(edges, "a", lay)) for lay in layers},
        "in_degree": {str(lay): degree_summary(degrees(edges, "b", lay)) for lay in layers},
        "successors": successors,
    }


def node_table(edges: Edges) -> pl.DataFrame:
    """Every feature with an edge: `node` (its GraphML id), `layer`, `feature`, `out_degree`,
    `in_degree`, sorted by layer and feature (memory: the nodes, never the edges)."""
    keys = ["layer", "feature"]
    lazy = edges.lazy()
    ends = [
        lazy.group_by(
            pl.col(f"layer_{s}").alias("layer"), pl.col(f"feature_{s}").alias("feature")
        ).agg(pl.len().cast(pl.Int64).alias(name))
        for s, name in (("a", "out_degree"), ("b", "in_degree"))
    ]
    nodes = ends[0].join(ends[1], on=keys, how="full", coalesce=True).collect(engine="streaming")
    nodes = nodes.with_columns(pl.col("out_degree", "in_degree").fill_null(0)).sort(keys)
    node = pl.format("L{}:{}", "layer", "feature")  # featstore.names.node_id
    return nodes.select(node.alias("node"), *keys, "out_degree", "in_degree")


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


def strongest_edges(edges: Edges, metric: str, n_edges: int) -> pl.DataFrame:
    """The `n_edges` rows with the largest finite |metric| (ties: by layers and features), as
    `strongest_subgraph` picks them; a lazy table is never held, only the rows kept."""
    if n_edges < 0:
        raise FeatstoreError(f"n_edges must be >= 0, got {n_edges}")
    order = [pl.col(metric).abs(), *EDGE_KEYS]
    kept = edges.lazy().filter(pl.col(metric).is_finite())
    strongest = kept.top_k(n_edges, by=order, reverse=[False, True, True, True, True])
    return strongest.collect(engine="streaming")


def edges_graph(edges: pl.DataFrame, metric: str, threshold: float) -> nx.DiGraph:
    """A networkx graph of an edge table held in memory (few edges: a drawing, a test)."""
    graph = nx.DiGraph(metric=metric, threshold=float(threshold))
    for row in edges.iter_rows(named=True):
        a, fa, b, fb = (row.pop(k) for k in EDGE_KEYS)
        graph.add_node(node_id(a, fa), layer=a, feature=fa)
        graph.add_node(node_id(b, fb), layer=b, feature=fb)
        graph.add_edge(node_id(a, fa), node_id(b, fb), **{k: x for k, x in row.items()
                                                          if x is not None})  # fmt: skip
    return graph


# -- GraphML streamed from the edge table ---------------------------------------------------------

GRAPHML_HEAD = (
    "<?xml version='1.0' encoding='utf-8'?>\n"
    '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
    'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
)
BATCH = 65_536  # edges per batch read from the table and written as GraphML


def _xml_type(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_integer():
        return "long"
    if dtype.is_float():
        return "double"
    return "string"


def _xml_text(name: str, dtype: pl.DataType) -> pl.Expr:
    """A column as GraphML text: numbers as polars writes them (shortest round-trip form),
    booleans as true/false, strings escaped."""
    col = pl.col(name)
    if dtype == pl.Boolean:
        return pl.when(col).then(pl.lit("true")).otherwise(pl.lit("false"))
    text = col.cast(pl.String)
    if _xml_type(dtype) == "string":
        for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;")):
            text = text.str.replace_all(raw, escaped, literal=True)
    return text


def _data_lines(frame: pl.DataFrame, keys: Mapping[str, str], head: pl.Expr, tail: str) -> str:
    """One GraphML element per row: `head`, a `<data>` per non-null column of `keys`, `tail`."""
    parts = [head]
    for name, key in keys.items():
        text = _xml_text(name, frame.schema[name])
        parts.append(pl.when(pl.col(name).is_null()).then(pl.lit("")).otherwise(
            pl.concat_str(pl.lit(f'<data key="{key}">'), text, pl.lit("</data>"))))  # fmt: skip
    line = pl.concat_str(*parts, pl.lit(tail))
    return "".join(frame.select(line).to_series().to_list())


def write_graphml_table(
    edges: Sequence[pl.DataFrame] | Iterator[pl.DataFrame],
    nodes: pl.DataFrame,
    schema: Mapping[str, pl.DataType],
    path: str | os.PathLike[str],
    *,
    metric: str,
    threshold: float,
) -> Path:
    """GraphML of the nodes (`node_table`) and the edge batches (edge table rows), written as it
    goes, whole or not at all; `nx.read_graphml` gives the graph `build_graph` makes (a null
    statistic left out, as there)."""
    stats = {c: t for c, t in schema.items() if c not in EDGE_KEYS}
    node_keys = {"layer": "n0", "feature": "n1"}
    edge_keys = {c: f"e{k}" for k, c in enumerate(stats)}
    declared = [("graph", "metric", "g0", "string"), ("graph", "threshold", "g1", "double")]
    declared += [("node", c, k, "long") for c, k in node_keys.items()]
    declared += [("edge", c, k, _xml_type(stats[c])) for c, k in edge_keys.items()]
    source = pl.format('<edge source="L{}:{}" target="L{}:{}">', *EDGE_KEYS)
    with atomic_file(path) as tmp, writing(str(path)), open(tmp, "w", encoding="utf-8") as out:
        out.write(GRAPHML_HEAD)
        for kind, name, key, xml in declared:
            out.write(f'<key id="{key}" for="{kind}" attr.name="{name}" attr.type="{xml}" />\n')
        out.write('<graph edgedefault="directed">\n')
        out.write(f'<data key="g0">{metric}</data>\n<data key="g1">{float(threshold)!r}</data>\n')
        for lo in range(0, nodes.height, BATCH):
            part = nodes.slice(lo, BATCH)
            out.write(
                _data_lines(part, node_keys, pl.format('<node id="{}">', "node"), "</node>\n")
            )
        for part in edges:
            out.write(_data_lines(part, edge_keys, source, "</edge>\n"))
        out.write("</graph>\n</graphml>\n")
    return Path(path)


# -- from a store --------------------------------------------------------------------------------

GRAPHML = "graph.graphml"
EDGES = "edges.parquet"
NODES = "nodes.parquet"
SUMMARY = "summary.json"
METADATA_KEY = "featstore.graph"  # the edge table's key-value metadata: metric, threshold, ...


def adjacent_pairs(layers: Sequence[int]) -> list[tuple[int, int]]:
    ordered = sorted(set(layers))
    if len(ordered) < 2:
        raise FeatstoreError(f"a feature graph needs at least two layers, got {list(layers)}")
    return list(itertools.pairwise(ordered))


def store_edge_blocks(
    store: Store,
    layers: Sequence[int],
    *,
    metric: str,
    threshold: float,
    engine: str = DEFAULT_ENGINE,
    min_both: int = MIN_BOTH,
    top_k: int = 10,
) -> Iterator[pl.DataFrame]:
    """The edges of each adjacent layer pair, block by block as the statistics yield them
    (`pair_blocks`: blocks of layer-a features), with the layers as columns (`edge_columns`);
    for `decoder_cosine`, the `top_k` cosines of each feature (`decoders.decoder_cosine`) of a
    pair at a time. At least one block, empty when no pair passes. Bad arguments are refused
    here, before a block is asked for."""
    check_metric(metric, threshold)
    need = support(metric, min_both)
    pairs = adjacent_pairs(layers)
    for layer in sorted(set(layers)):
        if not store.shards(layer):
            raise FeatstoreError(f"layer {layer} has no activations in store {store.home}")
    return _edge_blocks(store, pairs, metric, threshold, engine, need, top_k)


def _edge_blocks(
    store: Store, pairs: list[tuple[int, int]], metric: str, threshold: float, engine: str,
    need: int, top_k: int,
) -> Iterator[pl.DataFrame]:  # fmt: skip
    rule = passing({metric: threshold}, need)
    yielded = False
    for a, b in pairs:
        if metric in DATA_FREE:
            w = store_decoders(store, [a, b])
            frames = iter([saved_decoder_cosine(store, w[a], w[b], top_k)])
        else:
            q = PairQuery(a, b, engine=engine, thresholds={metric: threshold}, min_both=need)
            frames = (frame for frame, _ in pair_blocks(store, q, count=False))
        for frame in frames:
            check_pair_frame((a, b), frame, metric, need)
            kept = frame.filter(rule)
            if kept.height:
                yielded = True
                layered = kept.with_columns(
                    layer_a=pl.lit(a, pl.Int64), layer_b=pl.lit(b, pl.Int64)
                )
                yield edge_columns(layered)
    if not yielded:
        yield empty_edges() if metric not in DATA_FREE else empty_edges().select(
            *EDGE_KEYS, pl.lit(None, pl.Float64).alias(metric))  # fmt: skip


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
    """Pair statistics of each adjacent layer pair passing the edge test, held in memory (for
    small graphs and tests; `store_edge_blocks` streams them)."""
    blocks = store_edge_blocks(store, layers, metric=metric, threshold=threshold, engine=engine,
                               min_both=min_both, top_k=top_k)  # fmt: skip
    edges = pl.concat(list(blocks))
    return {
        (a, b): edges.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).drop(
            "layer_a", "layer_b"
        )  # fmt: skip
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


def read_edges(folder: str | os.PathLike[str]) -> pl.LazyFrame:
    """A lazy scan of a graph folder's edge table (filter it before collecting)."""
    path = Path(folder) / EDGES
    if not path.is_file():
        raise FeatstoreError(f"no feature graph at {path}: build it first (featstore graph)")
    return pl.scan_parquet(path)


def graph_settings(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The metric, threshold and min_both a graph folder's edge table was built with."""
    import pyarrow.parquet as pq

    read_edges(folder)  # a missing table is one line
    path = Path(folder) / EDGES
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY.encode() not in meta:
        raise FeatstoreError(f"{path} has no {METADATA_KEY} metadata: rebuild it")
    try:
        settings = json.loads(meta[METADATA_KEY.encode()])
    except ValueError:
        settings = None
    if not (isinstance(settings, dict) and settings.get("metric") in METRICS
            and isinstance(settings.get("threshold"), int | float)):  # fmt: skip
        raise FeatstoreError(f"{path}: its {METADATA_KEY} metadata is damaged: rebuild it")
    return settings


def graph_layers(folder: str | os.PathLike[str]) -> list[int] | None:
    """The layers a graph folder was built over (its summary.json); None when there is no
    summary; a damaged one is one line."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    try:
        layers = json.loads(path.read_text(encoding="utf-8")).get("layers")
    except (OSError, ValueError, AttributeError):
        layers = None
    if not (isinstance(layers, list) and layers
            and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):  # fmt: skip
        raise FeatstoreError(f"{path} is damaged (no list of layers): rebuild the graph")
    return layers


def export_graph(
    store: Store,
    out: str | os.PathLike[str],
    *,
    layers: Sequence[int],
    metric: str = "pearson",
    threshold: float = EDGE_THRESHOLD,
    engine: str = DEFAULT_ENGINE,
    min_both: int = MIN_BOTH,
    graphml_max_edges: int | None = GRAPHML_MAX_EDGES,
) -> dict[str, Any]:
    """Build the graph of adjacent layers block by block: edges.parquet, nodes.parquet,
    summary.json and graph.graphml (the strongest `graphml_max_edges` edges by |metric| when
    there are more; None: every edge) under `out`; returns the summary."""
    if graphml_max_edges is not None and graphml_max_edges < 0:
        raise FeatstoreError(f"graphml_max_edges must be >= 0, got {graphml_max_edges}")
    blocks = store_edge_blocks(store, layers, metric=metric, threshold=threshold, engine=engine,
                               min_both=min_both)  # fmt: skip
    d_sae, active = layer_sizes(store, layers)
    out = Path(out)
    settings = {"metric": metric, "threshold": float(threshold),
                "min_both": support(metric, min_both)}  # fmt: skip
    write_parquet_frames(blocks, out / EDGES, {METADATA_KEY: json.dumps(settings)})
    edges = read_edges(out)
    nodes = node_table(edges)
    write_parquet_atomic(nodes, out / NODES)
    summary = graph_summary(edges, layers, d_sae, active, metric=metric, threshold=threshold)
    summary["min_both"] = settings["min_both"]
    capped = graphml_max_edges is not None and summary["edges"] > graphml_max_edges
    if capped:
        chosen = strongest_edges(edges, metric, graphml_max_edges).sort(*EDGE_KEYS)
        nodes = node_table(chosen)
        parts = (chosen.slice(lo, BATCH) for lo in range(0, chosen.height, BATCH))
    else:
        parts = _batches(out / EDGES)
    write_graphml_table(parts, nodes, edges.collect_schema(), out / GRAPHML, metric=metric,
                        threshold=threshold)  # fmt: skip
    summary["graphml"] = {"max_edges": graphml_max_edges, "edges": (
        graphml_max_edges if capped else summary["edges"]), "strongest_only": capped}  # fmt: skip
    with atomic_file(out / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _batches(path: Path) -> Iterator[pl.DataFrame]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
        yield pl.from_arrow(batch)
