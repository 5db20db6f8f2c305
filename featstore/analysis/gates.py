"""AND and OR gates: a feature of layer L+1 with exactly two partners in layer L of necessity
(AND: it fires only where both fire) or sufficiency (OR: either one makes it fire) >= 0.999
(spar-2024's logic gates), and how many later features have two or more such partners.

Necessity of (a, b) is P(a active | b active), sufficiency P(b active | a active)
(docs/MEASURES.md). Only pairs passing the threshold are kept (one compiled pass finds both
kinds' pairs, `featstore.stats.best.ratio_pairs`), with a minimum support `min_both` so that a
rare feature seen once or twice by chance inside a gate's tokens is no partner.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from featstore.files import write_parquet_atomic
from featstore.stats.best import ratio_pairs
from featstore.stats.measures import check_measure
from featstore.stats.shardsums import Variant
from featstore.store.local import Store

THRESHOLD = 0.999  # spar-2024's
MIN_BOTH = 10
KIND_MEASURE = {"and": "necessity", "or": "sufficiency"}
PARENT_SCHEMA = {
    "layer_a": pl.Int32,
    "layer_b": pl.Int32,
    "kind": pl.Utf8,
    "feature_b": pl.Int32,
    "parents": pl.List(pl.Int32),
    "n_parents": pl.UInt32,
}


def parent_sets(
    store: Store,
    a: int,
    b: int,
    *,
    threshold: float = THRESHOLD,
    min_both: int = MIN_BOTH,
    shards: Sequence[str] | None = None,
    variant: Variant | None = None,
) -> pl.DataFrame:
    """Per kind (and/or) and feature of layer b: its partners in layer a at `threshold`, both
    kinds from one compiled pass (`featstore.stats.best.ratio_pairs`)."""
    check_measure("necessity", threshold)
    pairs = ratio_pairs(store, a, b, threshold, min_both=min_both, shards=shards, variant=variant)
    parts = [pl.DataFrame(schema=PARENT_SCHEMA)]
    for kind, measure in KIND_MEASURE.items():
        grouped = (
            pairs.filter(pl.col(measure) >= threshold)
            .group_by("feature_b")
            .agg(parents=pl.col("feature_a").sort(), n_parents=pl.len())
        )
        parts.append(
            grouped.with_columns(layer_a=pl.lit(a), layer_b=pl.lit(b), kind=pl.lit(kind))
            .select(list(PARENT_SCHEMA))
            .cast(PARENT_SCHEMA)  # type: ignore[arg-type]
        )
    return pl.concat(parts).sort("layer_a", "kind", "feature_b")


def gates(parents: pl.DataFrame) -> pl.DataFrame:
    """The gates among `parent_sets`: exactly two partners (parent_1 < parent_2)."""
    two = parents.filter(pl.col("n_parents") == 2)
    return two.select(
        "layer_a", "layer_b", "kind", "feature_b",
        parent_1=pl.col("parents").list.get(0), parent_2=pl.col("parents").list.get(1),
    )  # fmt: skip


def all_parent_sets(
    store: Store, layers: Sequence[int], *, threshold: float = THRESHOLD,
    min_both: int = MIN_BOTH, shards: Sequence[str] | None = None, variant: Variant | None = None,
) -> pl.DataFrame:  # fmt: skip
    """`parent_sets` of every pair of successive layers."""
    layers = sorted(layers)
    return pl.concat(
        [
            parent_sets(
                store, a, b, threshold=threshold, min_both=min_both, shards=shards, variant=variant
            )  # fmt: skip
            for a, b in zip(layers[:-1], layers[1:], strict=True)
        ]
    )


def run_gates(
    store: Store, layers: Sequence[int], out: Path, *, shards: Sequence[str] | None = None,
    threshold: float = THRESHOLD, min_both: int = MIN_BOTH, parents: pl.DataFrame | None = None,
) -> dict[str, Path]:  # fmt: skip
    """Parent sets (`all_parent_sets`, unless given) and gates of every pair of successive
    layers, written under `out`."""
    if parents is None:
        parents = all_parent_sets(
            store, layers, threshold=threshold, min_both=min_both, shards=shards
        )
    return {
        "parent_sets": write_parquet_atomic(parents, out / "parent_sets.parquet"),
        "gates": write_parquet_atomic(gates(parents), out / "gates.parquet"),
    }
