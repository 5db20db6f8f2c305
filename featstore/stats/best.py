"""Each feature's best partner in another layer by one measure, block by block of feature_a.

`best_partners` keeps, per feature, only its best value and partner: memory is two arrays per
layer (plus one block of pairs on the general path), never features x features. For Pearson,
cosine, necessity and sufficiency the compiled pass (`kernel.best_block`) finds the best while
it sums each feature's pairs and writes no pair out (~10x faster than finishing every co-active
pair); the other measures scan the pair sums (`PairScan`). Both give the same values (the same
formulas in the same order) and partners (ties: the lower one). Features co-active with no
partner (on `min_both` tokens) have none: the caller decides what that means (for a best
necessity or Pearson, 0 is a fair floor; docs/MEASURES.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from featstore.errors import FeatstoreError
from featstore.stats import kernel
from featstore.stats.compact import Compact
from featstore.stats.finish import MEASURE_COLUMNS, measure_values
from featstore.stats.measures import Spread
from featstore.stats.scan import PairScan, stacked_matrices
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store.local import FeatureStats, Store

SCHEMA = {"feature": pl.Int32, "partner": pl.Int32, "value": pl.Float64}


def _block_best(keys: np.ndarray, partners: np.ndarray, values: np.ndarray):
    """(key, partner, value) of each key's largest value (ties: the lower partner)."""
    order = np.lexsort((partners, -values, keys))
    keys, partners, values = keys[order], partners[order], values[order]
    first = np.r_[True, keys[1:] != keys[:-1]] if keys.size else np.zeros(0, bool)
    return keys[first], partners[first], values[first]


def best_partners(
    store: Store,
    a: int,
    b: int,
    measure: str,
    *,
    side: str = "a",
    min_both: int = 1,
    shards: Sequence[str] | None = None,
    variant: Variant | None = None,
) -> pl.DataFrame:
    """Per feature of layer `a` (side "a") or `b` (side "b") co-active with some feature of the
    other layer on >= `min_both` tokens: its best partner by `measure` and the value."""
    if measure not in MEASURE_COLUMNS:
        raise FeatstoreError(
            f"unknown measure {measure!r}: use one of {', '.join(MEASURE_COLUMNS)}"
        )
    if side not in ("a", "b"):
        raise FeatstoreError(f"side must be 'a' or 'b', got {side!r}")
    scan = PairScan.open(store, a, b, shards=shards, variant=variant, save=False)
    if measure in COMPILED:
        value, partner = compiled_best(scan, measure, min_both)[side]
        found = np.flatnonzero(partner >= 0)
        return pl.DataFrame(
            {"feature": found, "partner": partner[found], "value": value[found]}, schema=SCHEMA
        )
    d = scan.stats_a.count.size if side == "a" else scan.stats_b.count.size
    value = np.full(d, -np.inf)
    partner = np.full(d, -1, np.int64)
    for _, counts in scan.sums():
        v = measure_values(counts, *scan.stats, [measure])[measure]
        keep = (counts.n_both >= min_both) & np.isfinite(v)
        mine, other = (counts.feature_a, counts.feature_b)[:: 1 if side == "a" else -1]
        keys, partners, values = _block_best(mine[keep], other[keep], v[keep])
        better = (values > value[keys]) | ((values == value[keys]) & (partners < partner[keys]))
        value[keys[better]], partner[keys[better]] = values[better], partners[better]
    found = np.flatnonzero(partner >= 0)
    return pl.DataFrame(
        {"feature": found, "partner": partner[found], "value": value[found]}, schema=SCHEMA
    )


COMPILED = ("pearson", "cosine", "necessity", "sufficiency")  # measures `best_block` computes


def form_of(measure: str, sa: FeatureStats, sb: FeatureStats) -> tuple:
    """The compiled kernels' (form, scale, row, col, row_u, col_u, clip_lo, clip_hi) for
    `measure` over per-feature sums `sa`, `sb`: `finish.measure_values`' formula, in its order
    of operations (so the values are its values, bit for bit)."""
    zero_a, zero_b = np.zeros(sa.count.size), np.zeros(sb.count.size)
    if measure == "pearson":
        pa, pb = Spread.of(sa), Spread.of(sb)
        return kernel.SUM_FORM, float(sa.n_tokens), pa.inv, pb.inv, pa.u, pb.u, -1.0, 1.0
    if measure == "cosine":
        qa, qb = (np.asarray(x, np.float64) for x in (sa.sumsq, sb.sumsq))
        return kernel.SUM_OVER_ROOT, 1.0, qa, qb, zero_a, zero_b, 0.0, 1.0
    count_a, count_b = (np.asarray(x, np.float64) for x in (sa.count, sb.count))
    if measure == "jaccard":
        return kernel.COUNT_JACCARD, 1.0, count_a, count_b, zero_a, zero_b, -np.inf, np.inf
    if measure not in ("necessity", "sufficiency"):
        raise FeatstoreError(f"{measure!r} has no compiled form: use one of {', '.join(FORMS)}")
    row, col = (np.ones_like(count_a), count_b) if measure == "necessity" else (
        count_a, np.ones_like(count_b))  # fmt: skip
    return kernel.COUNT_RATIO, 1.0, row, col, zero_a, zero_b, -np.inf, np.inf


FORMS = (*COMPILED, "jaccard")  # measures `form_of` gives


def kernel_inputs(m_a, m_b) -> tuple[tuple, list[tuple[int, int]]]:
    """The compiled kernels' matrix arrays for stacked layers, and blocks of A's features of
    about equal work (~`kernel.PIPELINE_BLOCKS`, for two threads)."""
    m_a, m_b = Compact.of(m_a), Compact.of(m_b)
    arrays = m_a.feature_major(0, m_a.shape[1]) + m_b.arrays()
    work = m_a.feature_work(np.diff(m_b.indptr))
    limit = -(-int(work.sum()) // kernel.PIPELINE_BLOCKS)
    return arrays, kernel.balanced_ranges(work, max(limit, 1))


def best_both(
    store: Store, a: int, b: int, measure: str, *, min_both: int = 1,
    shards: Sequence[str] | None = None, variant: Variant | None = None,
) -> dict[str, tuple]:  # fmt: skip
    """`compiled_best` of layers a and b over `shards` as `variant` sees them: both sides'
    best partners by `measure` (one of `COMPILED`) from one pass."""
    if measure not in COMPILED:
        raise FeatstoreError(f"no compiled best for {measure!r}: use one of {', '.join(COMPILED)}")
    scan = PairScan.open(store, a, b, shards=shards, variant=variant, save=False)
    return compiled_best(scan, measure, min_both)


def compiled_best(scan: PairScan, measure: str, min_both: int) -> dict[str, tuple]:
    """{"a": (value, partner) per feature of a, "b": the same per feature of b} over the whole
    layers (partner -1 where none), by `kernel.best_block` on blocks of a, two threads."""
    from concurrent.futures import ThreadPoolExecutor

    m_a, m_b, cuts = stacked_matrices(scan.store, scan.a, scan.b, scan.shards, scan.variant)
    arrays, blocks = kernel_inputs(m_a, m_b)
    form = form_of(measure, *scan.stats)
    factors = [np.ascontiguousarray(x, np.float64) for x in form[2:6]]
    d_a, d_b = m_a.shape[1], m_b.shape[1]
    value_a, part_a = np.full(d_a, -np.inf), np.full(d_a, -1, np.int64)
    value_b, part_b = np.full(d_b, -np.inf), np.full(d_b, -1, np.int64)
    seg = np.asarray(cuts, np.int64)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(kernel.best_block, *arrays, lo, hi, seg, form[0], form[1], *factors,
                        form[6], form[7], int(min_both))  # fmt: skip
            for lo, hi in blocks
        ]
        for (lo, hi), job in zip(blocks, jobs, strict=True):  # in order: ties keep the lower a
            best_a, p_a, best_b, p_b = job.result()
            value_a[lo:hi], part_a[lo:hi] = best_a, p_a
            better = best_b > value_b
            value_b[better], part_b[better] = best_b[better], p_b[better]
    return {"a": (value_a, part_a), "b": (value_b, part_b)}


def prefix_counts(
    store: Store, a: int, b: int, shards: Sequence[str], ends: Sequence[int],
    thresholds: dict[str, float], min_both: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Pairs above each threshold over the prefixes `shards[:e]` (e in `ends`, rising, the last
    all of them), in one compiled pass over all the shards (`kernel.prefix_block`: the running
    sums after each shard are the prefix's sums; nothing per pair is kept): per prefix and
    measure (in `thresholds`' order) `above`, `stable` (also above over all shards), `change`
    (sum of |value - value over all| on the stable ones), and `n_tokens` per prefix."""
    from concurrent.futures import ThreadPoolExecutor

    ends = [int(e) for e in ends]
    if not ends or ends != sorted(set(ends)) or ends[0] < 1 or ends[-1] != len(shards):
        raise FeatstoreError(f"prefix ends must rise from 1 to {len(shards)}, got {ends}")
    names = list(thresholds)
    m_a, m_b, cuts = stacked_matrices(store, a, b, list(shards))
    forms = []
    for e in ends:
        stats = [merged_feature_stats(store, layer, shards[:e]) for layer in (a, b)]
        forms.append([form_of(m, *stats) for m in names])
    kind = np.array([f[0] for f in forms[0]], np.int64)
    scale = np.array([[f[1] for f in per] for per in forms])
    factors = [np.ascontiguousarray([[f[k] for f in per] for per in forms], np.float64)
               for k in range(2, 6)]  # fmt: skip
    clips = [np.array([f[k] for f in forms[0]], np.float64) for k in (6, 7)]
    floor = np.array([thresholds[m] for m in names], np.float64)
    arrays, blocks = kernel_inputs(m_a, m_b)
    seg = np.asarray(cuts, np.int64)
    out = {k: np.zeros((len(ends), len(names)), t) for k, t in
           (("above", np.int64), ("stable", np.int64), ("change", np.float64))}  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(kernel.prefix_block, *arrays, lo, hi, seg, np.asarray(ends, np.int64),
                        kind, scale, *factors, *clips, floor, int(min_both))  # fmt: skip
            for lo, hi in blocks
        ]
        for job in jobs:
            for key, part in zip(("above", "stable", "change"), job.result(), strict=True):
                out[key] += part
    return {**out, "n_tokens": seg[ends]}


def ratio_pairs(
    store: Store, a: int, b: int, least: float, *, min_both: int = 1,
    shards: Sequence[str] | None = None, variant: Variant | None = None,
) -> pl.DataFrame:  # fmt: skip
    """The pairs of layers a, b co-active on >= `min_both` tokens whose necessity or
    sufficiency is >= `least`, from one compiled pass (`kernel.ratio_block`): feature_a,
    feature_b, n_both, necessity, sufficiency (the values of `measures`), sorted by (a, b)."""
    from concurrent.futures import ThreadPoolExecutor

    scan = PairScan.open(store, a, b, shards=shards, variant=variant, save=False)
    m_a, m_b, cuts = stacked_matrices(store, a, b, scan.shards, scan.variant)
    arrays, blocks = kernel_inputs(m_a, m_b)
    count_a, count_b = (np.asarray(s.count, np.float64) for s in scan.stats)
    seg = np.asarray(cuts, np.int64)
    parts = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(kernel.ratio_block, *arrays, lo, hi, seg, count_a, count_b,
                        float(least), int(min_both), kernel.SCREENED_CAPACITY)  # fmt: skip
            for lo, hi in blocks
        ]
        for job in jobs:
            fa, fb, n_both, _, m = job.result()
            parts.append((fa[:m], fb[:m], n_both[:m]))
    fa, fb, n_both = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.lexsort((fb, fa))
    fa, fb, n_both = fa[order], fb[order], n_both[order]
    return pl.DataFrame(
        {"feature_a": fa, "feature_b": fb, "n_both": n_both,
         "necessity": n_both / count_b[fb], "sufficiency": n_both / count_a[fa]},
        schema={"feature_a": pl.Int32, "feature_b": pl.Int32, "n_both": pl.Int64,
                "necessity": pl.Float64, "sufficiency": pl.Float64},
    )  # fmt: skip
