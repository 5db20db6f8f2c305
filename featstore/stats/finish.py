"""Finishing pair sums into statistics, and the threshold rules a query tests on the way.

`finish_stats` turns pair sums (`PairCounts`) and per-feature sums into every data measure of
each pair (columns as `SCHEMA`). A query's thresholds (`conditions`) are tested first on only
the measures they name (`passing_rows`), behind a Pearson screen (`pearson_screen`) that the
sparse engine also applies as it computes the sums; `finish_stats` then runs on those rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import polars as pl

from featstore.defaults import pair_schema
from featstore.errors import FeatstoreError
from featstore.stats import measures
from featstore.stats.measures import Spread
from featstore.stats.shardsums import PairCounts, Screen
from featstore.store.local import FeatureStats

CHUNK_PAIRS = 1 << 15  # pairs tested at once (`passing_rows`): their temporaries stay in cache
SCHEMA = pair_schema()  # the pair table's columns (featstore.defaults)
TABLE_COLUMNS = ("agreement", "jaccard", *measures.NEW_COLUMNS)  # from the 2 x 2 table
MEASURE_COLUMNS = (*measures.SUM_COLUMNS, *TABLE_COLUMNS)  # every data measure of a pair


def _pearson(n: int, sum_xy: np.ndarray, a: Spread, b: Spread, fa, fb) -> np.ndarray:
    # In place, one gather per term. A never-co-active pair (sum_xy 0) gets exactly
    # -(u_i*u_j): the form threshold_counts sorts by.
    out = sum_xy * float(n)
    out *= a.inv[fa]
    out *= b.inv[fb]
    uu = a.u[fa]
    uu *= b.u[fb]
    out -= uu
    return np.clip(out, -1.0, 1.0, out=out)


def measure_values(
    counts: PairCounts,
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    names: Iterable[str],
    spreads: tuple[Spread, Spread] | None = None,
) -> dict[str, np.ndarray]:
    """The named columns of `SCHEMA` (pearson, cosine, n_either, `TABLE_COLUMNS`) of each pair;
    `spreads`: the `Spread` of each layer's stats, when already known."""
    n, fa, fb = counts.n_tokens, counts.feature_a, counts.feature_b
    names = list(names)
    out = {}
    if "pearson" in names:
        spread_a, spread_b = spreads or (Spread.of(stats_a), Spread.of(stats_b))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["pearson"] = _pearson(n, counts.sum_xy, spread_a, spread_b, fa, fb)
    if "cosine" in names:
        sumsq_a, sumsq_b = stats_a.sumsq[fa], stats_b.sumsq[fb]
        out["cosine"] = measures.cosine(counts.sum_xy, sumsq_a, sumsq_b)
    table = None
    for name in names:
        if name in measures.SUM_COLUMNS:
            continue
        if table is None:
            table = measures.Table(n, stats_a.count[fa], stats_b.count[fb], counts.n_both)
        out[name] = table.n_either if name == "n_either" else measures.COUNT_MEASURES[name](table)
    return out


def typed_frame(columns: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Columns typed as `SCHEMA`; NaN (an undefined statistic) becomes null."""
    return pl.DataFrame(
        [pl.Series(k, v, dtype=SCHEMA[k], nan_to_null=True) for k, v in columns.items()]
    )


def finish_stats(
    counts: PairCounts,
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    known: Mapping[str, np.ndarray] | None = None,
) -> pl.DataFrame:
    """Every data measure of each pair in `counts` (columns as `SCHEMA`); `known`: measures
    already computed for these pairs (`measure_values`), not computed again."""
    known = {m: v for m, v in (known or {}).items() if m != "n_both"}
    names = [m for m in ("n_either", *MEASURE_COLUMNS) if m not in known]
    values = {**known, **measure_values(counts, stats_a, stats_b, names)}
    return typed_frame(
        {
            "feature_a": counts.feature_a,
            "feature_b": counts.feature_b,
            "n_tokens": np.full(counts.nnz, counts.n_tokens, dtype=np.int64),
            "n_both": counts.n_both,
            "n_either": values["n_either"],
            "sum_xy": counts.sum_xy,
            **{m: values[m] for m in ("pearson", *TABLE_COLUMNS, "cosine")},
        }
    )


Conditions = list[tuple[str, float]]  # (measure, least value) a row must reach, all of them


def conditions(
    min_pearson: float | None, min_jaccard: float | None, thresholds: Mapping[str, float]
) -> Conditions:
    """The checked thresholds of a query, as conditions."""
    check_threshold("min_pearson", min_pearson)
    check_threshold("min_jaccard", min_jaccard)
    for measure, threshold in thresholds.items():
        measures.check_measure(measure, threshold)
        if measure not in MEASURE_COLUMNS:
            raise FeatstoreError(
                f"{measure} is not a statistic of the activations: see measures.{measure}"
            )
    named = [("pearson", min_pearson), ("jaccard", min_jaccard), *thresholds.items()]
    return [(m, float(t)) for m, t in named if t is not None]


def passing_mask(
    values: Mapping[str, np.ndarray], n_both: np.ndarray, rules: Conditions, min_both: int = 0
) -> np.ndarray | None:
    """Rows with n_both >= min_both reaching every condition (None: no test, every row).

    The same rows as `passes` & `measures.passing` select in a finished frame: an undefined
    (NaN) or infinite value reaches no threshold."""
    if not rules and min_both <= 0:
        return None
    keep = n_both >= min_both if min_both > 0 else None
    with np.errstate(invalid="ignore"):
        for measure, threshold in rules:
            reach = np.isfinite(values[measure]) & (values[measure] >= threshold)
            keep = reach if keep is None else keep & reach
    return keep


def passing_rows(
    counts: PairCounts,
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    rules: Conditions,
    min_both: int = 0,
    every: bool = False,
) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """(positions of the pairs passing, as `passing_mask`; None: every pair) and the values of
    the measures the rules name there (and n_both where the rules need it), or with `every`
    of every pair.

    Without `every`, a positive Pearson threshold first screens the pairs (`pearson_screen`):
    the rules are tested on the pairs it keeps. Chunk by chunk of `CHUNK_PAIRS`: the
    temporaries stay in cache."""
    if not rules and min_both <= 0:
        return None, {}
    tested = list(dict.fromkeys(m for m, _ in rules))
    spreads = Spread.of(stats_a), Spread.of(stats_b)
    screen = None if every else pearson_screen((stats_a, stats_b), rules, spreads)
    maybe = None if screen is None else screen.positions(counts, CHUNK_PAIRS)
    if maybe is not None:
        counts = counts.subset(maybe)
    with_counts = min_both > 0 or bool(set(tested) - set(measures.SUM_COLUMNS))
    found, kept = [], {m: [] for m in tested + ["n_both"] * with_counts}
    for lo in range(0, counts.nnz, CHUNK_PAIRS):
        part = counts.subset(slice(lo, lo + CHUNK_PAIRS))
        values = measure_values(part, stats_a, stats_b, tested, spreads)
        rows = np.flatnonzero(passing_mask(values, part.n_both, rules, min_both))
        values |= {"n_both": part.n_both} if with_counts else {}
        found.append(rows + lo)
        for m, v in values.items():
            kept[m].append(v if every else v[rows])
    rows = np.concatenate(found) if found else np.zeros(0, np.int64)
    rows = rows if maybe is None else maybe[rows]
    empty = np.zeros(0, np.float64)
    return rows, {m: np.concatenate(v) if v else empty for m, v in kept.items()}


def pearson_screen(
    stats: tuple[FeatureStats, FeatureStats],
    rules: Conditions,
    spreads: tuple[Spread, Spread] | None = None,
) -> Screen | None:
    """The screen of the pairs that may reach the highest positive Pearson threshold of
    `rules` (None where there is none): n*sum_xy*inv_i*inv_j is pearson without its term
    -u_i*u_j (<= 0), so never below it; tested with a margin far above their roundings. Two
    factors per pair instead of four; most pairs fail it, and Pearson is computed for the rest.
    `spreads`: the `Spread` of each layer's stats, when already known."""
    threshold = _highest_pearson(rules)
    if threshold <= 0:
        return None
    spread_a, spread_b = spreads or (Spread.of(stats[0]), Spread.of(stats[1]))
    return Screen(spread_a.inv * float(stats[0].n_tokens), spread_b.inv, threshold * (1 - 1e-9))


def _highest_pearson(rules: Conditions) -> float:
    """The highest Pearson threshold of `rules` (0 without one)."""
    return max((t for m, t in rules if m == "pearson"), default=0.0)


def check_threshold(name: str, value: float | None) -> float | None:
    if value is not None and not (isinstance(value, int | float) and -1 <= value <= 1):
        raise FeatstoreError(f"{name} must be a number in [-1, 1], got {value!r}")
    return value
