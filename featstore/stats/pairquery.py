"""One question about the feature pairs of two layers, as a frozen, validated object.

`PairQuery` carries everything `featstore.stats.query.pair_stats` / `pair_report` take: the
layers, which shards and features, the thresholds, the variant of the sums, the engine and what
to save. The CLI (`featstore stats`) and the Dagster statistics assets build it in one call
(`PairQuery.of`); a bad field is one line naming it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from featstore import settings
from featstore.defaults import DEFAULT_ENGINE, ENGINES
from featstore.errors import FeatstoreError
from featstore.stats.finish import Conditions, conditions
from featstore.stats.scan import MAX_BLOCK_PAIRS
from featstore.stats.shardsums import Range, Variant


@dataclass(frozen=True)
class PairQuery:
    """The pairs of `layer_a` x `layer_b` asked for, and how to compute them.

    shards: None takes every shard the two layers share. features_a / features_b: half-open
    ranges (None: all); all_pairs lists never-co-active pairs of the ranges too. min_pearson,
    min_jaccard and `thresholds` (measure -> minimum, any data measure of docs/MEASURES.md)
    keep the pairs at or above all; min_both the pairs co-active on at least that many tokens.
    variant: which sums (`Variant`: activity thresholds, BOS positions kept, the null model;
    None: the plain one). intervals adds 95%
    bounds. engine computes sums not saved yet (all with recompute). save: write the whole plain
    table to `{home}/pair_stats/{a}-{b}.parquet`; None saves only when the whole table is asked
    for without thresholds. keep_sums: also save each shard's pair sums computed, a cache that
    lets a later call skip those shards but costs tens of times the activations' size
    (docs/SCALING.md); off, no pair state is kept and results are the same bit for bit.
    """

    layer_a: int
    layer_b: int
    shards: tuple[str, ...] | None = None
    features_a: Range | None = None
    features_b: Range | None = None
    all_pairs: bool = False
    min_pearson: float | None = None
    min_jaccard: float | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    min_both: int = 0
    variant: Variant = Variant()
    intervals: bool = False
    engine: str = DEFAULT_ENGINE
    recompute: bool = False
    save: bool | None = None
    keep_sums: bool = False
    max_block_pairs: int = MAX_BLOCK_PAIRS

    # From CLI arguments or a Dagster config in one call (the variant: `settings.of(Variant, ...)`).
    of = classmethod(settings.of)

    def __post_init__(self) -> None:
        least = {"layer_a": 0, "layer_b": 0, "min_both": 0, "max_block_pairs": 1}
        for name, at_least in least.items():
            object.__setattr__(self, name, _integer(name, getattr(self, name), at_least))
        for name in ("all_pairs", "intervals", "recompute", "keep_sums"):
            if not isinstance(getattr(self, name), bool):
                raise FeatstoreError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.save is not None and not isinstance(self.save, bool):
            raise FeatstoreError(f"save must be true, false or unset, got {self.save!r}")
        if self.engine not in ENGINES:
            raise FeatstoreError(f"unknown engine {self.engine!r} (engines: {', '.join(ENGINES)})")
        object.__setattr__(self, "shards", _shards(self.shards))
        for name in ("features_a", "features_b"):
            object.__setattr__(self, name, _feature_range(name, getattr(self, name)))
        if self.variant is None:
            object.__setattr__(self, "variant", Variant())
        if not isinstance(self.variant, Variant):
            raise FeatstoreError(f"variant must be a Variant, got {self.variant!r}")
        if not isinstance(self.thresholds, Mapping):
            try:
                object.__setattr__(self, "thresholds", dict(self.thresholds))
            except (TypeError, ValueError):
                raise FeatstoreError(
                    f"thresholds must map measures to minimums, got {self.thresholds!r}"
                ) from None
        object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))
        self.rules  # noqa: B018 -- checks every threshold

    @property
    def layers(self) -> tuple[int, int]:
        return self.layer_a, self.layer_b

    @property
    def rules(self) -> Conditions:
        """The thresholds as checked conditions (measure, minimum)."""
        return conditions(self.min_pearson, self.min_jaccard, self.thresholds)

    @property
    def whole_table(self) -> bool:
        """Whether the query covers the plain table of every pair (thresholds aside)."""
        ranged = self.features_a is not None or self.features_b is not None or self.all_pairs
        return self.shards is None and not ranged and self.variant.plain

    @property
    def saves(self) -> bool:
        """`save`, where unset: the whole table is asked for, without thresholds."""
        if self.save is not None:
            return self.save
        return self.whole_table and not self.rules and self.min_both <= 0


def _integer(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise FeatstoreError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def _shards(shards: Sequence[str] | None) -> tuple[str, ...] | None:
    if shards is None:
        return None
    if isinstance(shards, str) or not all(isinstance(s, str) and s for s in shards):
        raise FeatstoreError(f"shards must be a list of shard names, got {shards!r}")
    if not shards:
        raise FeatstoreError("shards is empty: name at least one shard, or none for all")
    return tuple(shards)


def _feature_range(name: str, rng: Sequence[int] | None) -> Range | None:
    if rng is None:
        return None
    try:
        lo, hi = rng
    except (TypeError, ValueError):
        raise FeatstoreError(f"{name} must be a range (lo, hi), got {rng!r}") from None
    whole = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (lo, hi))
    if not whole or not 0 <= lo < hi:
        raise FeatstoreError(f"{name} must be a range 0 <= lo < hi, got {rng!r}")
    return int(lo), int(hi)
