"""Exact all-pairs statistics of the features of two layers, finished from additive sums.

From the per-feature sums (`Store.feature_stats`) and the per-pair sums (`featstore.pairs`) over
n tokens, for feature i of layer a and j of layer b (zeros included):
pearson = (n*sum_xy - S_i*S_j) / sqrt((n*Q_i - S_i^2)(n*Q_j - S_j^2)) (null where a feature
never varies), agreement = #(both > 0 or both == 0)/n, jaccard = #(both > 0)/#(either > 0).

Activations are non-negative, so a pair that is never co-active has pearson <= 0 and Jaccard 0:
results above a positive threshold come from co-active pairs alone, and `threshold_counts`
counts the other pairs from the per-feature sums, without any d_a x d_b array.

`featstore.measures` adds sufficiency, necessity, mutual information and PMI (same sums, no
other pass), 95% intervals on request, thresholds on any measure with a minimum support
`min_both`, and the variants of `featstore.pairs.Variant` (`active_threshold`, the `null` model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.files import atomic_file
from featstore.progress import Progress, Ticker
from featstore.stats import measures
from featstore.stats.finish import (
    Conditions,
    check_threshold,
    finish_stats,
    passing_rows,
    pearson_screen,
    typed_frame,
)
from featstore.stats.kernel import run_ahead
from featstore.stats.measures import FLAT_VARIANCE, Spread
from featstore.stats.pairquery import PairQuery
from featstore.stats.scan import PairScan, check_range
from featstore.stats.shardsums import (
    ENGINES,
    PairCounts,
    Range,
    merged_feature_stats,
    merged_pair_counts,
    save_shard_pairs,
    shard_pair_counts,
    shards_of_pair,
    sparse_pair_counts,
    update_shard_pairs,
)
from featstore.store import spec
from featstore.store.local import FeatureStats, Store
from featstore.store.sql import PAIR_STATS_SCHEMA

__all__ = [
    "ENGINES",
    "FLAT_VARIANCE",
    "Spread",
    "PairCounts",
    "PairQuery",
    "finish_stats",
    "merged_feature_stats",
    "merged_pair_counts",
    "pair_blocks",
    "pair_report",
    "pair_stats_path",
    "pair_stats",
    "passes",
    "save_pair_table",
    "save_shard_pairs",
    "shard_pair_counts",
    "shards_of_pair",
    "sparse_pair_counts",
    "threshold_counts",
    "update_shard_pairs",
]

# Blocks finished at once (numpy and scipy release the GIL): the two cores share the work.
PIPELINE_WORKERS = 2
T = TypeVar("T")


# -- never-co-active pairs ------------------------------------------------------------------------


def _count_products_at_most(u: np.ndarray, w: np.ndarray, s: float) -> int:
    """#{(i, j): fl(u_i * w_j) <= s} for u > 0 and sorted w, exactly as the products round."""
    if not u.size or not w.size:
        return 0
    k = np.searchsorted(w, s / u, side="right")
    while True:  # s / u rounds: step k over the (rare) values on the wrong side
        last = np.maximum(k - 1, 0)
        over = (k > 0) & (u * w[last] > s)
        step = np.minimum(k, w.size - 1)
        under = ~over & (k < w.size) & (u * w[step] <= s)
        if not (over.any() or under.any()):
            return int(k.sum())
        k = np.where(over, np.searchsorted(w, w[last], side="left"), k)
        k = np.where(under, np.searchsorted(w, w[step], side="right"), k)


def _never_coactive_pearson(
    co: pl.DataFrame, a: Spread, b: Spread, ranges: tuple[Range, Range], t: float
) -> int:
    """How many never-co-active pairs in the ranges have pearson = -(u_i*u_j) >= t."""
    if t > 0:
        return 0
    ua, ub = (s.u[lo:hi] for s, (lo, hi) in zip((a, b), ranges, strict=True))
    ua, ub = ua[np.isfinite(ua)], np.sort(ub[np.isfinite(ub)])
    fa, fb = co["feature_a"].to_numpy(), co["feature_b"].to_numpy()
    products = a.u[fa] * b.u[fb]  # NaN (never passing) where either feature is flat
    if t <= -1:  # pearson is clipped at -1: every defined pair passes
        return ua.size * ub.size - int(np.isfinite(products).sum())
    return _count_products_at_most(ua, ub, -t) - int((products <= -t).sum())


def passes(min_pearson: float | None = None, min_jaccard: float | None = None) -> pl.Expr:
    """Rows at or above every threshold given (a null statistic passes none)."""
    expr = pl.lit(True)
    if min_pearson is not None:
        expr &= pl.col("pearson") >= min_pearson
    if min_jaccard is not None:
        expr &= pl.col("jaccard") >= min_jaccard
    return expr


def threshold_counts(
    frame: pl.DataFrame,
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    *,
    min_pearson: float | None = None,
    min_jaccard: float | None = None,
    features_a: Range | None = None,
    features_b: Range | None = None,
    thresholds: Mapping[str, float] | None = None,
    min_both: int = 0,
) -> dict[str, int]:
    """Pairs passing each threshold (and all) among ALL pairs of the ranges, never-co-active too.

    `frame` holds the finished co-active pairs (rows with n_both 0 are ignored). Keys: `pairs`,
    `co_active`, `pearson` / `jaccard` / each measure of `thresholds` (when that threshold is
    given) and `all`. With `min_both` >= 1 only pairs active together that often pass.
    """
    check_threshold("min_pearson", min_pearson)
    check_threshold("min_jaccard", min_jaccard)
    ranges = (
        check_range("features_a", features_a, stats_a.count.size),
        check_range("features_b", features_b, stats_b.count.size),
    )
    (lo_a, hi_a), (lo_b, hi_b) = ranges
    co = frame.filter(
        (pl.col("n_both") > 0)
        & pl.col("feature_a").is_between(lo_a, hi_a, closed="left")
        & pl.col("feature_b").is_between(lo_b, hi_b, closed="left")
    )
    total = (hi_a - lo_a) * (hi_b - lo_b)
    never = total - co.height
    out = {"pairs": total, "co_active": co.height}
    if thresholds or min_both > 0:
        # Jaccard lies in [0, 1]: a min_jaccard below 0 passes what 0 passes.
        jaccard = None if min_jaccard is None else max(min_jaccard, 0.0)
        named = {"pearson": min_pearson, "jaccard": jaccard, **(thresholds or {})}
        return out | measures.measure_counts(co, stats_a, stats_b, named, min_both, ranges)
    # Never-co-active pairs passing each threshold: Jaccard 0 where defined (some feature fires).
    silent = int((stats_a.count[lo_a:hi_a] == 0).sum()) * int((stats_b.count[lo_b:hi_b] == 0).sum())
    jaccard_never = never - silent if min_jaccard is not None and min_jaccard <= 0 else 0
    pearson_never = 0
    if min_pearson is not None:
        spreads = Spread.of(stats_a), Spread.of(stats_b)
        pearson_never = _never_coactive_pearson(co, *spreads, ranges, min_pearson)
        out["pearson"] = co.filter(passes(min_pearson)).height + pearson_never
    if min_jaccard is not None:
        out["jaccard"] = co.filter(passes(None, min_jaccard)).height + jaccard_never
    if min_pearson is not None:  # a pair with a pearson has both features firing: Jaccard 0
        all_never = pearson_never if min_jaccard is None or min_jaccard <= 0 else 0
    else:
        all_never = jaccard_never if min_jaccard is not None else never
    out["all"] = co.filter(passes(min_pearson, min_jaccard)).height + all_never
    return out


# -- the whole table ------------------------------------------------------------------------------


def pair_stats(store: Store, query: PairQuery) -> pl.DataFrame:
    """Statistics of the co-active pairs (every pair of the ranges with `all_pairs`) passing
    the query's thresholds; see `pair_blocks`."""
    return pair_report(store, query, count=False)[0]


def pair_report(
    store: Store, query: PairQuery, *, count: bool = True
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The pairs passing the query's thresholds, and `threshold_counts` over all pairs of its
    ranges: `pair_blocks` gathered (all its rows held at once; stream `pair_blocks` where they
    may be many, e.g. the whole table of GPT-2-sized layers)."""
    kept, counts = [], Counter[str]()
    for frame, block_counts in pair_blocks(store, query, count=count):
        kept.append(frame)
        counts.update(block_counts)
    return pl.concat(kept), dict(counts)


def pair_blocks(
    store: Store, query: PairQuery, *, count: bool = True, progress: Progress | None = None
) -> Iterator[tuple[pl.DataFrame, dict[str, int]]]:
    """Per block of feature_a, in order: the pairs passing the query's thresholds, and the
    block's `threshold_counts` over all its pairs (without `count`, empty dicts); memory is
    bounded by a block, however many rows.

    Shard sums are reused when saved and fresh, else computed by the query's engine in memory
    (and saved for later calls with `PairQuery.keep_sums`). The work goes by blocks of
    feature_a (`PairScan.sums`); the thresholds are tested first, on only the measures they
    name, and the other measures computed for the rows that pass. When the query saves
    (`PairQuery.saves`) and covers the whole plain table (`PairQuery.whole_table`; thresholds
    aside), that table is written to `{home}/pair_stats/{a}-{b}.parquet` for the `pair_stats`
    SQL table (complete once the last block is yielded). `progress` hears how many features of
    layer a are done.
    """
    q = query
    a, b = q.layers
    rules, save = q.rules, q.saves
    scan = PairScan.open(
        store, a, b, engine=q.engine, shards=q.shards, features_a=q.features_a,
        features_b=q.features_b, recompute=q.recompute, variant=q.variant, save=q.keep_sums,
    )  # fmt: skip
    write_table = save and q.whole_table
    # Counts over all pairs and the whole table need every pair; a query only those that may pass.
    screen = None if count or write_table else pearson_screen(scan.stats, rules)
    finish = functools.partial(
        _query_block, scan, rules=rules, min_both=q.min_both, whole_table=write_table,
        intervals=q.intervals,
        count=(q.min_pearson, q.min_jaccard, q.thresholds) if count else None,
    )  # fmt: skip
    with (
        _table_writer(store if write_table else None, a, b) as write,
        ThreadPoolExecutor(max_workers=PIPELINE_WORKERS) as pool,
    ):
        # A table written is sorted by (feature_a, feature_b), whatever the engine: readers prune
        # its row groups by feature.
        blocks = scan.sums(q.all_pairs, q.max_block_pairs, write_table, screen)
        blocks = _ticking(blocks, Ticker(progress, f"pair statistics {a}-{b}", _width(scan)))
        for whole, frame, block_counts in _pipelined(pool, finish, blocks, PIPELINE_WORKERS):
            if whole is not None:
                write(whole)
            yield frame, block_counts


@dataclass(frozen=True)
class SavedTable:
    """What `save_pair_table` wrote: where, how many rows, over how many tokens, the top rows."""

    path: Path
    rows: int
    n_tokens: int
    top: pl.DataFrame


def save_pair_table(
    store: Store, query: PairQuery, *, top: int = 10, progress: Progress | None = None
) -> SavedTable:
    """Write the table of every co-active pair of the query's layers over all shards to
    `pair_stats_path`, block by block (`pair_blocks`): only a block and the `top` rows by
    Pearson are held. The query asks for the whole plain table (`PairQuery.whole_table`;
    its engine and `recompute` apply)."""
    if not query.whole_table or query.rules or query.min_both > 0:
        raise FeatstoreError(f"save_pair_table takes the whole plain table, not {query}")
    a, b = query.layers
    rows, n_tokens, best = 0, 0, pl.DataFrame()
    whole = dataclasses.replace(query, save=True, intervals=False)
    for frame, _ in pair_blocks(store, whole, count=False, progress=progress):
        rows += frame.height
        n_tokens = int(frame["n_tokens"][0]) if frame.height else n_tokens
        best = pl.concat([best, frame.top_k(top, by="pearson")]) if best.height else frame
        best = best.top_k(top, by="pearson")
    return SavedTable(pair_stats_path(store, a, b), rows, n_tokens, best)


def _query_block(
    scan: PairScan,
    block: Range,
    pair_sums: PairCounts,
    *,
    rules: Conditions,
    min_both: int,
    whole_table: bool,
    intervals: bool,
    count: tuple[float | None, float | None, Mapping[str, float]] | None,
) -> tuple[pl.DataFrame | None, pl.DataFrame, dict[str, int]]:
    """One block of `pair_report`: (every pair finished, with `whole_table`; the pairs passing
    the rules, finished, with their 95% bounds given `intervals`; `threshold_counts` of the
    block's range, given `count`: (min_pearson, min_jaccard, thresholds))."""
    rows, values = passing_rows(pair_sums, *scan.stats, rules, min_both, every=count is not None)
    whole = finish_stats(pair_sums, *scan.stats) if whole_table else None
    if rows is None and whole is not None:
        frame = whole
    else:
        frame = _finish_rows(pair_sums, scan.stats, (rows, values), every=count is not None)
    if intervals:
        frame = measures.with_intervals(frame, *scan.stats)
    if count is None:
        return whole, frame, {}
    min_pearson, min_jaccard, thresholds = count
    ids = {k: getattr(pair_sums, k) for k in ("feature_a", "feature_b", "n_both")}
    co = whole if whole is not None else typed_frame(ids | values)
    counted = threshold_counts(
        co, *scan.stats, min_pearson=min_pearson, min_jaccard=min_jaccard, features_a=block,
        features_b=scan.range_b, thresholds=thresholds, min_both=min_both,
    )  # fmt: skip
    return whole, frame, counted


def _width(scan: PairScan) -> int:
    return scan.range_a[1] - scan.range_a[0]


def _ticking(
    blocks: Iterable[tuple[Range, PairCounts]], ticker: Ticker
) -> Iterator[tuple[Range, PairCounts]]:
    """The blocks, counting the features of layer a each covers."""
    for block, sums in blocks:
        ticker.step(block[1] - block[0], " features of layer a")
        yield block, sums


def _pipelined(
    pool: ThreadPoolExecutor, fn: Callable[..., T], items: Iterable[tuple], ahead: int
) -> Iterator[T]:
    """`fn(*item)` of each item, in order, up to `ahead` items computed at once on `pool`."""

    def start(item: tuple) -> Callable[[], T]:
        return pool.submit(fn, *item).result

    return run_ahead((functools.partial(start, item) for item in items), ahead)


def _finish_rows(
    pair_sums: PairCounts,
    stats: tuple[FeatureStats, FeatureStats],
    found: tuple[np.ndarray | None, dict[str, np.ndarray]],
    every: bool,
) -> pl.DataFrame:
    """`finish_stats` of the pairs at `passing_rows`' positions (`found`), sorted; the values
    found (of every pair with `every`) are not computed again."""
    rows, values = found
    order = pair_sums.order(rows)
    at = _compose(rows, order)
    pick = at if every else order
    values = values if pick is None else {m: v[pick] for m, v in values.items()}
    return finish_stats(pair_sums if at is None else pair_sums.subset(at), *stats, values)


def _compose(rows: np.ndarray | None, order: np.ndarray | None) -> np.ndarray | None:
    """The positions `rows` (None: all) taken in `order` (None: as they are)."""
    if rows is None or order is None:
        return rows if order is None else order
    return rows[order]


def pair_stats_path(store: Store, a: int, b: int) -> Path:
    return store.home / spec.PAIR_STATS_DIR / f"{a}-{b}.parquet"


@contextlib.contextmanager
def _table_writer(store: Store | None, a: int, b: int) -> Iterator[Callable[[pl.DataFrame], None]]:
    """A function appending finished blocks, with their layers, to the store's merged file of
    the pair (`pair_stats_path`; no store: no file), under the file's write lock."""
    if store is None:
        yield lambda frame: None
        return
    path = pair_stats_path(store, a, b)
    layers = [pl.lit(a, pl.Int32).alias("layer_a"), pl.lit(b, pl.Int32).alias("layer_b")]
    # No dictionaries: pair statistics hardly repeat, and trying them doubles the write time.
    with store.lock(f"{spec.PAIR_STATS_DIR}/{a}-{b}"):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's, never read
            stale.unlink(missing_ok=True)
        with (
            atomic_file(path) as tmp,
            pq.ParquetWriter(tmp, PAIR_STATS_SCHEMA, use_dictionary=False) as writer,
        ):
            yield lambda frame: writer.write_table(
                frame.select(*layers, *PAIR_STATS_SCHEMA.names[2:])
                .to_arrow()
                .cast(PAIR_STATS_SCHEMA)
            )


def describe_counts(counts: dict[str, int], query: PairQuery) -> str:
    """One line: how many of all pairs pass each threshold of the query."""
    parts = [f"{counts['pairs']} pairs, {counts['co_active']} co-active"]
    for measure, threshold in query.rules:
        parts.append(f"{measure} >= {threshold}: {counts[measure]}")
    if query.min_both > 0:
        parts.append(f"(n_both >= {query.min_both})")
    parts.append(f"all thresholds: {counts['all']}")
    return "; ".join(parts)
