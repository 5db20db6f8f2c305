"""Every pair among some layers in one pass over the shards (layers 6-9: 6 pairs).

`pair_reports` runs `pair_report` (a `PairQuery` per pair) for each pair inside
`scan.one_pass`: each layer's shards are read, checked and stacked once and kept while a later
pair still needs them, so 4 layers cost 4 reads instead of 12. The sums of each pair are those
`pair_report` computes alone, bit for bit
(the same stacked matrices, the same kernel).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import polars as pl

from featstore.errors import FeatstoreError
from featstore.stats.query import PairQuery, pair_report
from featstore.stats.scan import one_pass
from featstore.store.local import Store

Pair = tuple[int, int]
T = TypeVar("T")


def layer_pairs(layers: Sequence[int], max_distance: int | None = None) -> list[Pair]:
    """Every (a, b) with a < b among `layers` (each once), at most `max_distance` apart."""
    chosen = sorted(set(int(x) for x in layers))
    if len(chosen) < 2:
        raise FeatstoreError(f"need at least two distinct layers, got {list(layers)}")
    pairs = list(itertools.combinations(chosen, 2))
    return [(a, b) for a, b in pairs if max_distance is None or b - a <= max_distance]


def pair_reports(
    store: Store,
    layers: Sequence[int],
    ask: Callable[[int, int], PairQuery] = PairQuery,
    *,
    max_distance: int | None = None,
    count: bool = False,
) -> dict[Pair, tuple[pl.DataFrame, dict[str, int]]]:
    """`pair_report(store, ask(a, b), count=count)` of every pair of
    `layers_pairs(layers, max_distance)`, reading each layer once (`in_one_pass`). `ask` makes
    each pair's query, e.g. `functools.partial(PairQuery, min_pearson=0.2)`. `count` as
    `pair_report`'s, but off by default (as `pair_stats`): counting every pair over the
    thresholds turns the kernel's Pearson screen off; without it each pair's counts are an empty
    dict."""
    pairs = layer_pairs(layers, max_distance)
    return in_one_pass(pairs, lambda a, b: pair_report(store, ask(a, b), count=count))


def in_one_pass(pairs: Sequence[Pair], work: Callable[[int, int], T]) -> dict[Pair, T]:
    """`work(a, b)` of each pair in order inside `scan.one_pass`: each layer's shards are read
    once, and a layer no later pair needs is dropped from memory."""
    out = {}
    with one_pass() as kept:
        for k, (a, b) in enumerate(pairs):
            out[(a, b)] = work(a, b)
            needed = {layer for pair in pairs[k + 1 :] for layer in pair}
            for key in [key for key in kept if key[0] not in needed]:
                del kept[key]
    return out
