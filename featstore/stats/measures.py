"""The cross-layer measures of a feature pair from the data, and their confidence intervals.

Every data measure comes from the additive sums `featstore.stats` already keeps: the 2 x 2 table
of active/inactive tokens (n tokens, count_a and count_b active, n_both active together) and, for
Pearson, the per-feature sums (`Spread`). No measure needs another pass over the activations.
`featstore.decoders.decoder_cosine` needs no data at all: it compares SAE decoder directions.
docs/MEASURES.md defines each measure and says which can be high for never-co-active pairs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.special import ndtri

from featstore.errors import FeatstoreError
from featstore.stats.shardsums import (
    Range,
    Variant,
    ensure_shard_pairs,
    load_shard_pairs,
    variant_stats,
)
from featstore.store.local import FeatureStats, Store

FLAT_VARIANCE = 1e-9  # n*Q - S^2 below this share of n*Q is rounding: the feature never varies
Z95 = float(ndtri(0.975))  # the normal quantile of a two-sided 95% interval
# Every measure an edge can be thresholded on, with the range a threshold must lie in.
RANGES: dict[str, tuple[float, float]] = {
    "pearson": (-1.0, 1.0),
    "agreement": (0.0, 1.0),
    "jaccard": (0.0, 1.0),
    "sufficiency": (0.0, 1.0),
    "necessity": (0.0, 1.0),
    "mutual_information": (0.0, math.log(2.0)),
    "pmi": (-math.inf, math.inf),
    "cosine": (0.0, 1.0),
    "decoder_cosine": (-1.0, 1.0),
}
DATA_FREE = ("decoder_cosine",)  # measures that need no activations (no n_both either)


@dataclass(frozen=True)
class Table:
    """The 2 x 2 table of each pair (arrays that broadcast): tokens, tokens where a (b) is active,
    tokens where both are."""

    n: np.ndarray | int
    count_a: np.ndarray
    count_b: np.ndarray
    n_both: np.ndarray

    @functools.cached_property  # each is used by several measures
    def n_either(self) -> np.ndarray:
        return self.count_a + self.count_b - self.n_both

    @functools.cached_property
    def excess(self) -> np.ndarray:
        """n*n_both - count_a*count_b, exactly (int64): every cell's n*n_ij - n_i*n_j up to sign."""
        n, ca, cb, nb = (
            np.asarray(x, np.int64) for x in (self.n, self.count_a, self.count_b, self.n_both)
        )
        return (n * nb - ca * cb).astype(np.float64)


def _ratio(num, den) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(num, np.float64) / np.asarray(den, np.float64)


def agreement(t: Table) -> np.ndarray:
    """Share of tokens where both or neither is active."""
    return _ratio(np.asarray(t.n) - t.n_either + t.n_both, t.n)


def jaccard(t: Table) -> np.ndarray:
    return _ratio(t.n_both, t.n_either)


def sufficiency(t: Table) -> np.ndarray:
    """P(b active | a active)."""
    return _ratio(t.n_both, t.count_a)


def necessity(t: Table) -> np.ndarray:
    """P(a active | b active)."""
    return _ratio(t.n_both, t.count_b)


def pmi(t: Table) -> np.ndarray:
    """log P(both) / (P(a) P(b)) = log lift: -inf for a never-co-active pair of live features."""
    # log1p of the exact excess keeps the digits that log(n*n_both / (count_a*count_b)) loses.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log1p(_ratio(t.excess, np.multiply(t.count_a, t.count_b, dtype=np.float64)))


def mutual_information(t: Table) -> np.ndarray:
    """Mutual information (nats) of the two binary variables 'a active' and 'b active'."""
    n = np.asarray(t.n, np.float64)
    excess = t.excess
    ca, cb, nb = (np.asarray(x, np.float64) for x in (t.count_a, t.count_b, t.n_both))
    n_a0, n_b0 = n - ca, n - cb
    cells = (  # (n_ij, n_i, n_j, sign of n*n_ij - n_i*n_j)
        (nb, ca, cb, 1.0),
        (ca - nb, ca, n_b0, -1.0),
        (cb - nb, n_a0, cb, -1.0),
        (n_a0 - cb + nb, n_a0, n_b0, 1.0),
    )
    total = np.zeros(np.broadcast(n, excess, ca, cb).shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        for n_ij, n_i, n_j, sign in cells:
            term = np.multiply(n_i, n_j, out=np.empty(total.shape))
            np.divide(excess, term, out=term)
            if sign < 0:
                np.negative(term, out=term)
            np.log1p(term, out=term)  # log(n*n_ij / (n_i*n_j)), its digits kept
            term *= n_ij
            np.add(total, term, out=total, where=np.broadcast_to(n_ij, total.shape) > 0)
        total /= n  # 0 log 0 = 0 above; NaN (no tokens) stays NaN
        return np.maximum(total, 0.0, out=total)


COUNT_MEASURES: dict[str, Callable[[Table], np.ndarray]] = {
    "agreement": agreement,
    "jaccard": jaccard,
    "sufficiency": sufficiency,
    "necessity": necessity,
    "mutual_information": mutual_information,
    "pmi": pmi,
}
NEW_COLUMNS = ("sufficiency", "necessity", "mutual_information", "pmi")  # beside pearson, ...
SUM_COLUMNS = ("pearson", "cosine")  # from the sums of the activations, not the 2 x 2 table


# -- Pearson from the per-feature sums ------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Per-feature Pearson terms: pearson_ij = n*sum_xy*inv_i*inv_j - u_i*u_j (NaN where flat)."""

    inv: np.ndarray  # 1 / sqrt(n*Q - S^2)
    u: np.ndarray  # S / sqrt(n*Q - S^2), > 0 where defined

    @staticmethod
    def of(stats: FeatureStats) -> Spread:
        n = float(stats.n_tokens)
        var_n = n * stats.sumsq - stats.total**2
        flat = var_n <= FLAT_VARIANCE * n * stats.sumsq
        inv = 1.0 / np.sqrt(np.where(flat, np.nan, var_n))
        return Spread(inv, stats.total * inv)


def cosine(sum_xy: np.ndarray, sumsq_a: np.ndarray, sumsq_b: np.ndarray) -> np.ndarray:
    """Uncentred activation cosine sum_xy / sqrt(sumsq_a * sumsq_b) (NaN where a feature never
    fires): Pearson without subtracting the means, in [0, 1] for non-negative activations."""
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.sqrt(np.asarray(sumsq_a, np.float64) * np.asarray(sumsq_b, np.float64))
        out = np.asarray(sum_xy, np.float64) / np.where(norm > 0, norm, np.nan)
    return np.clip(out, 0.0, 1.0)


# -- 95% intervals ---------------------------------------------------------------------------------


def wilson(k, m, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of the proportion k/m (NaN where m is 0)."""
    k, m = np.asarray(k, np.float64), np.asarray(m, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / m
        denom = 1.0 + z * z / m
        center = (p + z * z / (2.0 * m)) / denom
        half = z * np.sqrt(p * (1.0 - p) / m + z * z / (4.0 * m * m)) / denom
    return np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)


def fisher(r, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Fisher-z interval of a Pearson correlation over n tokens (NaN where n <= 3)."""
    r, n = np.asarray(r, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.arctanh(r)
        half = z / np.sqrt(np.where(n > 3, n - 3.0, np.nan))
        return np.tanh(centre - half), np.tanh(centre + half)


def intervals(t: Table, pearson: np.ndarray) -> dict[str, np.ndarray]:
    """Columns `{m}_lo`, `{m}_hi` for pearson (Fisher z) and jaccard, sufficiency, necessity
    (Wilson)."""
    bounds = {
        "pearson": fisher(pearson, t.n),
        "jaccard": wilson(t.n_both, t.n_either),
        "sufficiency": wilson(t.n_both, t.count_a),
        "necessity": wilson(t.n_both, t.count_b),
    }
    return {f"{m}_{side}": b[i] for m, b in bounds.items() for i, side in enumerate(("lo", "hi"))}


INTERVAL_COLUMNS = tuple(
    f"{m}_{s}" for m in ("pearson", "jaccard", "sufficiency", "necessity") for s in ("lo", "hi")
)


# -- thresholds ------------------------------------------------------------------------------------


def above(metric: str, threshold: float) -> pl.Expr:
    """Rows whose `metric` reaches `threshold`; NaN and inf never do (polars puts NaN above all)."""
    return pl.col(metric).is_finite() & (pl.col(metric) >= threshold)


def check_measure(metric: str, threshold: float) -> None:
    """Raise a one-line FeatstoreError for an unknown measure or an out-of-range threshold."""
    if metric not in RANGES:
        raise FeatstoreError(f"unknown metric {metric!r}: use one of {', '.join(RANGES)}")
    lo, hi = RANGES[metric]
    if not isinstance(threshold, numbers.Real) or not lo <= threshold <= hi:
        raise FeatstoreError(
            f"threshold for {metric} must be a number in [{lo}, {hi}], got {threshold!r}"
        )


def passing(thresholds: Mapping[str, float], min_both: int = 0) -> pl.Expr:
    """Rows with n_both >= min_both reaching every threshold (null or NaN reaches none)."""
    expr = pl.col("n_both") >= min_both if min_both > 0 else pl.lit(True)
    for metric, threshold in thresholds.items():
        check_measure(metric, threshold)
        expr &= above(metric, threshold)
    return expr


# -- applied to finished frames ------------------------------------------------------------------


def with_intervals(
    frame: pl.DataFrame, stats_a: FeatureStats, stats_b: FeatureStats
) -> pl.DataFrame:
    """`frame` (finished pairs) with the 95% bounds `INTERVAL_COLUMNS`."""
    fa, fb = frame["feature_a"].to_numpy(), frame["feature_b"].to_numpy()
    n = frame["n_tokens"].to_numpy()
    table = Table(n, stats_a.count[fa], stats_b.count[fb], frame["n_both"].to_numpy())
    bounds = intervals(table, frame["pearson"].fill_null(np.nan).to_numpy())
    return frame.with_columns(
        pl.Series(k, v, dtype=pl.Float64, nan_to_null=True) for k, v in bounds.items()
    )


def measure_counts(
    co: pl.DataFrame,
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    named: Mapping[str, float | None],
    min_both: int,
    ranges: tuple[Range, Range],
) -> dict[str, int]:
    """`threshold_counts` of any measures: co-active rows, plus (min_both <= 0) the pairs never
    active together that pass, counted from the per-feature sums (`never_coactive_counts`)."""
    given = {m: t for m, t in named.items() if t is not None}
    out = {m: co.filter(passing({m: t}, min_both)).height for m, t in given.items()}
    out["all"] = co.filter(passing(given, min_both)).height
    if min_both <= 0:
        co = co.sort("feature_a", "feature_b")
        coactive = sorted_coactive(co["feature_a"].to_numpy(), co["feature_b"].to_numpy())
        never = never_coactive_counts(stats_a, stats_b, given, ranges, coactive)
        out = {k: n + never[k] for k, n in out.items()}
    return out


# -- high without ever firing together -------------------------------------------------------------


def never_coactive_values(
    measure: str, stats_a: FeatureStats, stats_b: FeatureStats, rows: Range, cols: Range
) -> np.ndarray:
    """The measure every pair of the ranges would have with n_both = 0 (rows x cols array)."""
    if measure == "pearson":  # sum_xy = 0: pearson = -(u_i * u_j), as stats computes it
        ua, ub = Spread.of(stats_a).u, Spread.of(stats_b).u
        return np.clip(-np.outer(ua[slice(*rows)], ub[slice(*cols)]), -1.0, 1.0)
    if measure == "cosine":  # sum_xy = 0: cosine 0 where both features fire
        qa, qb = stats_a.sumsq[slice(*rows), None], stats_b.sumsq[None, slice(*cols)]
        return cosine(np.zeros((1, 1)), qa, qb)
    if measure not in COUNT_MEASURES:
        raise FeatstoreError(f"{measure} is not a data measure of the 2 x 2 table")
    table = Table(
        stats_a.n_tokens,
        stats_a.count[slice(*rows), None],
        stats_b.count[None, slice(*cols)],
        np.zeros((1, 1), np.int64),
    )
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    return np.broadcast_to(COUNT_MEASURES[measure](table), shape)


Coactive = Callable[[Range], tuple[np.ndarray, np.ndarray]]  # rows -> (feature_a, feature_b)


def never_coactive_masks(
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    thresholds: Mapping[str, float],
    ranges: tuple[Range, Range],
    coactive: Coactive,
    chunk_rows: int = 256,
) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """By chunks of feature_a rows: (first row, values at n_both = 0, masks of the pairs never
    active together that reach each threshold); memory chunk_rows x (range of b)."""
    (lo_a, hi_a), (lo_b, hi_b) = ranges
    for lo in range(lo_a, hi_a, chunk_rows):
        rows = (lo, min(lo + chunk_rows, hi_a))
        fa, fb = coactive(rows)
        inside = (fb >= lo_b) & (fb < hi_b)
        values, masks = {}, {}
        for measure, threshold in thresholds.items():
            values[measure] = never_coactive_values(measure, stats_a, stats_b, rows, (lo_b, hi_b))
            with np.errstate(invalid="ignore"):
                masks[measure] = np.isfinite(values[measure]) & (values[measure] >= threshold)
            masks[measure][fa[inside] - lo, fb[inside] - lo_b] = False
        yield lo, values, masks


def sorted_coactive(feature_a: np.ndarray, feature_b: np.ndarray) -> Coactive:
    """`Coactive` over pairs sorted by feature_a."""

    def rows(rng: Range) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(feature_a, np.asarray(rng, feature_a.dtype))  # ints would copy it
        return feature_a[lo:hi], feature_b[lo:hi]

    return rows


def never_coactive_counts(
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    thresholds: Mapping[str, float],
    ranges: tuple[Range, Range],
    coactive: Coactive,
) -> dict[str, int]:
    """Never-co-active pairs of the ranges reaching each threshold (keys: the measures, `all`)."""
    out = dict.fromkeys([*thresholds, "all"], 0)
    for _, _, masks in never_coactive_masks(stats_a, stats_b, thresholds, ranges, coactive):
        for measure, mask in masks.items():
            out[measure] += int(mask.sum())
        if masks:
            out["all"] += int(np.logical_and.reduce(list(masks.values())).sum())
    if not thresholds:  # no threshold: every never-co-active pair passes
        (lo_a, hi_a), (lo_b, hi_b) = ranges
        fa, fb = coactive(ranges[0])
        out["all"] = (hi_a - lo_a) * (hi_b - lo_b) - int(((fb >= lo_b) & (fb < hi_b)).sum())
    return out


def never_coactive_pairs(
    store: Store,
    a: int,
    b: int,
    measure: str,
    threshold: float,
    *,
    shards: list[str],
    variant: Variant | None = None,
    limit: int = 1_000_000,
) -> tuple[pl.DataFrame, int]:
    """Pairs never active together whose `measure` still reaches `threshold` (e.g. the mutual
    information of mutually exclusive features), from the per-feature counts alone.

    Returns the first `limit` such pairs (feature_a, feature_b, the measure) and how many there
    are; the saved per-shard sums say which pairs were ever co-active.
    """
    check_measure(measure, threshold)
    variant = (variant or Variant()).resolved(shards)
    ensure_shard_pairs(store, a, b, shards, variant=variant)
    stats_a, stats_b = variant_stats(store, a, b, shards, variant)

    def coactive(rows: Range) -> tuple[np.ndarray, np.ndarray]:
        parts = [load_shard_pairs(store, a, b, s, rows, variant) for s in shards]
        return (
            np.concatenate([p.feature_a for p in parts]),
            np.concatenate([p.feature_b for p in parts]),
        )

    ranges = ((0, stats_a.count.size), (0, stats_b.count.size))
    found, kept, total = [], 0, 0
    for lo, values, masks in never_coactive_masks(
        stats_a, stats_b, {measure: threshold}, ranges, coactive
    ):
        fa, fb = np.nonzero(masks[measure])
        total += fa.size
        if kept < limit:
            found.append(
                pl.DataFrame(
                    {
                        "feature_a": (fa + lo).astype(np.int32),
                        "feature_b": fb.astype(np.int32),
                        measure: values[measure][fa, fb],
                    }
                )
            )
            kept += fa.size
    schema = {"feature_a": pl.Int32, "feature_b": pl.Int32, measure: pl.Float64}
    frame = pl.concat(found) if found else pl.DataFrame(schema=schema)
    return frame.head(limit), total
