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
from featstore.stats.finish import MEASURE_COLUMNS, measure_values
from featstore.stats.measures import Spread
from featstore.stats.scan import PairScan, stacked_matrices
from featstore.stats.shardsums import Variant
from featstore.store.local import Store

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


def _form(scan: PairScan, measure: str) -> tuple:
    """`kernel.best_block`'s (form, scale, row, col, row_u, col_u, clip_lo, clip_hi) for
    `measure`: `finish.measure_values`' formula, in its order of operations."""
    sa, sb = scan.stats
    ones_a, ones_b = np.ones(sa.count.size), np.ones(sb.count.size)
    zero_a, zero_b = np.zeros(sa.count.size), np.zeros(sb.count.size)
    if measure == "pearson":
        pa, pb = Spread.of(sa), Spread.of(sb)
        return kernel.SUM_FORM, float(sa.n_tokens), pa.inv, pb.inv, pa.u, pb.u, -1.0, 1.0
    if measure == "cosine":
        qa, qb = (np.asarray(x, np.float64) for x in (sa.sumsq, sb.sumsq))
        return kernel.SUM_OVER_ROOT, 1.0, qa, qb, zero_a, zero_b, 0.0, 1.0
    count_a, count_b = (np.asarray(x, np.float64) for x in (sa.count, sb.count))
    row, col = (ones_a, count_b) if measure == "necessity" else (count_a, ones_b)
    return kernel.COUNT_RATIO, 1.0, row, col, zero_a, zero_b, -np.inf, np.inf


def compiled_best(scan: PairScan, measure: str, min_both: int) -> dict[str, tuple]:
    """{"a": (value, partner) per feature of a, "b": the same per feature of b} over the whole
    layers (partner -1 where none), by `kernel.best_block` on blocks of a, two threads."""
    from concurrent.futures import ThreadPoolExecutor

    m_a, m_b, cuts = stacked_matrices(scan.store, scan.a, scan.b, scan.shards, scan.variant)
    a_t = m_a.T.tocsr()
    arrays = kernel.kernel_arrays(a_t) + kernel.kernel_arrays(m_b)
    form = _form(scan, measure)
    factors = [np.ascontiguousarray(x, np.float64) for x in form[2:6]]
    work = kernel.pattern(a_t, np.int64) @ np.diff(m_b.indptr)
    limit = -(-int(work.sum()) // kernel.PIPELINE_BLOCKS)
    blocks = kernel.balanced_ranges(work, max(limit, 1))
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
