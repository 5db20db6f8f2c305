"""Which edges a causal run measures: the correlation graph's, or a sample stratified by a
measure's bins, plus random pairs of the same sources as a control.

- `graph`: every pair of a layer pair with Pearson >= `min_pearson` (the correlation graph), or a
  seeded sample of `max_edges` of them.
- `bins`: `per_bin` pairs drawn at random from each bin of `measure` (Balcells et al. 2024: 10
  pairs in each of 10 Jaccard bins between 0.01 and 1.0; fewer where a bin holds fewer).
- `random`: `random_pairs` pairs of an asked source with a target drawn uniformly from the later
  SAE (any pair, co-active or not, in the graph or not): the rate of causal edges among them
  estimates how many the correlation graph misses beyond the measured ones.

The pairs are chosen from the layer pair's whole `pair_stats` table when it was written; else,
for the `graph` sample, from the correlation graph's edge table (`graph/edges.parquet`) when it
holds every pair that can be asked (a Pearson graph of the pair's layers at a threshold <=
`min_pearson`; its edges carry the graph's support `min_both`, and a random pair outside it has a
null `pearson`). The statistics stage of a large store computes only the pairs reaching a
threshold and writes no table (`featstore.stages.Plan.stats_min_pearson`): the graph is then
where the correlation edges are. Both are read lazily, filtered before they are collected: only
the pairs passing a threshold or lying in a bin are held, never a whole table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featstore.defaults import EDGE_THRESHOLD
from featstore.errors import FeatstoreError
from featstore.stats.measures import above, check_measure
from featstore.stats.query import pair_stats_path
from featstore.store import spec
from featstore.store.local import Store

SAMPLES = ("graph", "bins")
PAIR = ["feature_a", "feature_b"]
COLUMNS = {
    "feature_a": pl.Int64,
    "feature_b": pl.Int64,
    "asked_by": pl.String,  # graph | bin | random
    "pearson": pl.Float64,  # of the pair in pair_stats; null when never co-active
    "bin": pl.Int32,  # bins: the bin's index; else null
    "bin_value": pl.Float64,  # bins: the pair's value of the binned measure
}


@dataclass(frozen=True)
class EdgeChoice:
    """How the measured edges of each layer pair are chosen."""

    sample: str = "graph"
    min_pearson: float = EDGE_THRESHOLD  # a correlation-graph edge
    max_edges: int | None = None  # graph: at most this many per layer pair (a seeded sample)
    measure: str = "jaccard"  # bins: the binned measure
    bins: tuple[float, ...] = tuple(np.linspace(0.01, 1.0, 11).round(4).tolist())
    per_bin: int = 10
    random_pairs: int = 100  # per layer pair
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample not in SAMPLES:
            raise FeatstoreError(f"unknown edge sample {self.sample!r}: use one of {SAMPLES}")
        check_measure("pearson", self.min_pearson)
        edges = np.asarray(self.bins, dtype=np.float64)
        if len(edges) < 2 or not np.all(np.diff(edges) > 0) or not np.isfinite(edges).all():
            raise FeatstoreError(f"bins must be 2 or more increasing numbers, got {self.bins}")
        for value in (edges[0], edges[-1]):
            check_measure(self.measure, float(value))
        for name in ("max_edges", "per_bin", "random_pairs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FeatstoreError(f"{name} must be >= 0, got {value}")


def asked_edges(
    store: Store, a: int, b: int, d_b: int, choice: EdgeChoice, sources: np.ndarray | None = None
) -> pl.DataFrame | None:
    """The pairs of layers a -> b to measure (`COLUMNS`); None when no table holds the pairs
    to choose from (`pair_table`).

    `sources`: only these source features (None: any)."""
    table = pair_table(store, a, b, choice)
    if table is None:
        return None
    scan = table.select(
        pl.col(PAIR).cast(pl.Int64), pl.col("pearson").cast(pl.Float64),
        pl.col(choice.measure).cast(pl.Float64).alias("bin_value"),
    )
    if sources is not None:
        keep = pl.Series(np.asarray(sources, np.int64)).implode()
        scan = scan.filter(pl.col("feature_a").is_in(keep))
    asked = _graph(scan, choice) if choice.sample == "graph" else _bins(scan, choice)
    control = _random(asked["feature_a"].unique().sort().to_numpy(), d_b, choice)
    control = control.join(asked, on=PAIR, how="anti")
    known = scan.select(*PAIR, "pearson").join(control.lazy(), on=PAIR, how="semi").collect()
    control = control.join(known, on=PAIR, how="left")
    control = control.with_columns(asked_by=pl.lit("random"))
    both = pl.concat([asked, control], how="diagonal_relaxed")
    return both.select(pl.col(k).cast(v) for k, v in COLUMNS.items())


def pair_table(store: Store, a: int, b: int, choice: EdgeChoice) -> pl.LazyFrame | None:
    """The pairs of layers a -> b the choice draws from, lazily: the whole pair table when it was
    written, else (`graph` sample) the correlation graph's edges of the pair when the graph was
    built on Pearson at a threshold <= `min_pearson` with a and b adjacent among its layers;
    None when neither."""
    path = pair_stats_path(store, a, b)
    if path.exists():
        return pl.scan_parquet(path)
    if choice.sample != "graph":
        return None
    from featstore.analysis import graph

    folder = store.home / spec.GRAPH_DIR
    layers = graph.graph_layers(folder)
    if layers is None:
        return None
    built = graph.graph_settings(folder)
    if built["metric"] != "pearson" or built["threshold"] > choice.min_pearson or (
            (a, b) not in graph.adjacent_pairs(layers)):  # fmt: skip
        return None
    return graph.read_edges(folder).filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))


def _graph(scan: pl.LazyFrame, choice: EdgeChoice) -> pl.DataFrame:
    edges = scan.filter(above("pearson", choice.min_pearson)).collect()
    if choice.max_edges is not None and edges.height > choice.max_edges:
        edges = edges.sample(choice.max_edges, seed=choice.seed)
    return edges.with_columns(asked_by=pl.lit("graph"), bin=None, bin_value=None)


def _bins(scan: pl.LazyFrame, choice: EdgeChoice) -> pl.DataFrame:
    """`per_bin` random pairs of each bin [lo, hi) (the last bin includes its upper edge)."""
    edges = np.asarray(choice.bins)
    inside = scan.filter(pl.col("bin_value").is_finite() & pl.col("bin_value").is_between(
        edges[0], edges[-1]))
    inner = [(pl.col("bin_value") >= float(e)).cast(pl.Int32) for e in edges[1:-1]]
    binned = inside.with_columns(bin=pl.sum_horizontal(pl.lit(0, pl.Int32), *inner))
    rank = pl.int_range(pl.len()).shuffle(seed=choice.seed).over("bin")
    return binned.filter(rank < choice.per_bin).collect().with_columns(asked_by=pl.lit("bin"))


def _random(sources: np.ndarray, d_b: int, choice: EdgeChoice) -> pl.DataFrame:
    rng = np.random.default_rng(choice.seed)
    n = choice.random_pairs if len(sources) else 0
    return pl.DataFrame(
        {"feature_a": rng.choice(sources, n) if n else np.zeros(0, np.int64),
         "feature_b": rng.integers(0, d_b, n)},
        schema={"feature_a": pl.Int64, "feature_b": pl.Int64},
    ).unique(PAIR)
