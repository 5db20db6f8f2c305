"""Each feature's best partner in another layer by one measure, block by block of feature_a.

`best_partners` scans the pair sums (`PairScan`) and keeps, per feature, only its best value and
partner: memory is one block of pairs plus two arrays per layer, never features x features.
Features co-active with no partner (on `min_both` tokens) have none: the caller decides what
that means (for a best necessity or Pearson, 0 is a fair floor; docs/MEASURES.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from featstore.errors import FeatstoreError
from featstore.stats.finish import MEASURE_COLUMNS, measure_values
from featstore.stats.scan import PairScan
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
