"""Pair sums of two layers over several shards, block by block of feature_a, in memory.

Shards with fresh saved sums are read (only the block's rows, by their `indptr`); the others are
computed by an engine on the way and added in memory, never written: a query does not save sums
to read them back (`featstore.pairs.update_shard_pairs` saves them). The blocks of the computed
shards are cut at common feature boundaries, so memory holds about one block of each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import zarr

from featstore import pairs
from featstore.pairsums import PairCounts, Range, Screen
from featstore.store import Store


def merged_blocks(
    store: Store,
    a: int,
    b: int,
    saved: Mapping[str, zarr.Group],
    todo: Sequence[str],
    features_a: Range,
    *,
    engine: str = "sparse",
    max_pairs: int,
    sort: bool = True,
    screen: Screen | None = None,
    variant: pairs.Variant = pairs.PLAIN,
) -> Iterator[tuple[Range, PairCounts]]:
    """(range of feature_a, pair sums over every shard there) covering `features_a` in order.

    `saved` maps shards to their fresh saved groups (of `variant`'s sums); the `todo` shards
    are computed by `engine`. Without `todo`, blocks hold ~`max_pairs` saved pairs; with it,
    they follow the engine's blocks. Without `sort`, a block computed from one shard alone may
    come unsorted by feature_b within each feature_a (`PairCounts.sorted` sorts it), which
    saves the engine a pass, and hold only the pairs passing a `screen`.
    """
    if not todo:
        groups = list(saved.values())
        for block in pairs.group_blocks(store, groups, features_a, max_pairs):
            yield block, PairCounts.total([pairs.read_pairs(store, g, block) for g in groups])
        return
    lo_a, hi_a = features_a
    # Parts to add up come sorted and whole: a sum of shards' sums passes no screen by parts.
    alone = len(todo) == 1 and not saved
    sort, screen = sort or not alone, screen if alone else None
    streams = [
        pairs.iter_shard_pair_counts(
            store, a, b, s, engine, sort=sort, screen=screen, variant=variant
        )
        for s in todo
    ]
    empties = [PairCounts.empty(*pairs.check_shard(store, a, b, s)) for s in todo]
    for cut, parts in _aligned(streams, empties):
        block = (max(cut[0], lo_a), min(cut[1], hi_a))
        if block[0] >= block[1]:
            continue
        if block != cut:  # the scan covers part of the engine's block
            parts = [p.select(block) for p in parts]
        parts += [pairs.read_pairs(store, g, block) for g in saved.values()]
        yield block, PairCounts.total(parts)


def _aligned(
    streams: list[Iterator[PairCounts]], empties: list[PairCounts]
) -> Iterator[tuple[Range, list[PairCounts]]]:
    """The blocks of several streams (blocks of feature_a in order, each feature's pairs in one
    block) cut at common boundaries: (range of feature_a, each stream's pairs there)."""
    d_a = empties[0].d_a
    pending: list[list[PairCounts]] = [[] for _ in streams]
    complete = [0] * len(streams)  # features below this are all seen, per stream
    done = 0
    while done < d_a:
        i = int(np.argmin(complete))
        block = next(streams[i], None)
        if block is None:
            complete[i] = d_a
        elif block.nnz:
            pending[i].append(block)
            complete[i] = int(block.feature_a[-1]) + 1
        cut = min(complete)
        if cut <= done:
            continue
        parts = []
        for k, empty in enumerate(empties):
            held = PairCounts.total([empty, *pending[k]], same_tokens=True)
            n = int(np.searchsorted(held.feature_a, np.int32(cut)))  # an int would copy it
            parts.append(held.subset(slice(0, n)))
            pending[k] = [held.subset(slice(n, None))] if n < held.nnz else []
        yield (done, cut), parts
        done = cut
    for stream in streams:  # run each to its end (a feature past d_a cannot come)
        if any(block.nnz for block in stream):
            raise RuntimeError("an engine gave pairs past the last feature")
