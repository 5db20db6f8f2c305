"""Pair sums of two layers over several shards, block by block of feature_a, in memory.

`PairScan` is one scan of a layer pair: it checks the shards and feature ranges, reads the
per-feature sums, and yields the pair sums block by block (`PairScan.sums`), finished on request
(`PairScan.blocks`). Shards with fresh saved sums are read (only the block's rows, by their
`indptr`); the others are computed by an engine on the way and added in memory, never written:
a query does not save sums to read them back (`featstore.pairs.update_shard_pairs` saves them).
The blocks of the computed shards are cut at common feature boundaries (`merged_blocks`), so
memory holds about one block of each.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import zarr

from featstore.defaults import DEFAULT_ENGINE
from featstore.errors import FeatstoreError
from featstore.stats import shardsums
from featstore.stats.compact import Compact, Filling
from featstore.stats.finish import finish_stats
from featstore.stats.kernel import PairCounts, Range, Screen, iter_sparse_pair_counts
from featstore.stats.shardsums import (
    ENGINES,
    Variant,
    check_shard,
    ensure_shard_pairs,
    saved_groups,
    shards_of_pair,
    variant_stats,
)
from featstore.store import spec
from featstore.store.local import FeatureStats, Store

ALL_PAIRS_LIMIT = 50_000_000  # most pairs `all_pairs` may list; narrow the ranges beyond
MAX_BLOCK_PAIRS = 20_000_000  # saved shard pairs merged at once (~1 GB of work arrays)


def check_range(name: str, rng: Range | None, d: int) -> Range:
    """A feature range [lo, hi) inside [0, d); None means all features."""
    if rng is None:
        return 0, d
    lo, hi = (int(x) for x in rng)
    if not 0 <= lo < hi <= d:
        raise FeatstoreError(f"{name} {lo}:{hi} is empty or outside the layer's features 0:{d}")
    return lo, hi


def check_all_pairs(features_a: Range, features_b: Range) -> None:
    size = (features_a[1] - features_a[0]) * (features_b[1] - features_b[0])
    if size > ALL_PAIRS_LIMIT:
        raise FeatstoreError(
            f"all_pairs would list {size} pairs (limit {ALL_PAIRS_LIMIT}): "
            "narrow features_a/features_b"
        )


def with_all_pairs(counts: PairCounts, features_a: Range, features_b: Range) -> PairCounts:
    """Every pair of the two ranges, co-active or not (n_both = sum_xy = 0), row-major."""
    check_all_pairs(features_a, features_b)
    (lo_a, hi_a), (lo_b, hi_b) = features_a, features_b
    width_a, width_b = hi_a - lo_a, hi_b - lo_b
    inside = counts.select(features_a, features_b)
    where = (inside.feature_a - lo_a).astype(np.int64) * width_b + (inside.feature_b - lo_b)
    n_both = np.zeros(width_a * width_b, np.int64)
    sum_xy = np.zeros(width_a * width_b, np.float64)
    n_both[where], sum_xy[where] = inside.n_both, inside.sum_xy
    fa = np.repeat(np.arange(lo_a, hi_a, dtype=np.int32), width_b)
    fb = np.tile(np.arange(lo_b, hi_b, dtype=np.int32), width_a)
    return PairCounts(counts.n_tokens, counts.d_a, counts.d_b, fa, fb, n_both, sum_xy)


@dataclass(frozen=True)
class PairScan:
    """The pair sums of two layers over `shards`, finished block by block of feature_a: fresh
    saved shard sums (`saved`) are read, the others (`todo`) computed by `engine` on the way."""

    store: Store
    a: int
    b: int
    shards: list[str]
    variant: Variant
    range_a: Range
    range_b: Range
    stats_a: FeatureStats
    stats_b: FeatureStats
    engine: str = DEFAULT_ENGINE
    saved: Mapping[str, Any] = field(default_factory=dict)  # shard -> its saved zarr group
    todo: tuple[str, ...] = ()

    @staticmethod
    def open(
        store: Store,
        a: int,
        b: int,
        *,
        engine: str = DEFAULT_ENGINE,
        shards: Sequence[str] | None = None,
        features_a: Range | None = None,
        features_b: Range | None = None,
        recompute: bool = False,
        variant: Variant | None = None,
        save: bool = True,
    ) -> PairScan:
        """Check the arguments; with `save`, compute (by `engine`) and save the shard sums
        lacking (all with `recompute`) now, else leave them to be computed during the scan,
        in memory (a variant's per-feature sums too)."""
        variant = variant or Variant()
        if engine not in ENGINES:
            raise FeatstoreError(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})")
        chosen = shards_of_pair(store, a, b, shards)
        variant = variant.resolved(chosen)
        _, d_a, d_b = check_shard(store, a, b, chosen[0])
        range_a = check_range("features_a", features_a, d_a)
        range_b = check_range("features_b", features_b, d_b)
        if save:
            ensure_shard_pairs(store, a, b, chosen, engine, recompute, variant)
            recompute = False
        groups = {} if recompute else saved_groups(store, a, b, chosen, variant)
        todo = tuple(s for s in chosen if groups.get(s) is None)
        saved = {s: g for s, g in groups.items() if g is not None}
        stats = variant_stats(store, a, b, chosen, variant, computed=todo)
        return PairScan(store, a, b, chosen, variant, range_a, range_b, *stats, engine, saved, todo)

    @property
    def stats(self) -> tuple[FeatureStats, FeatureStats]:
        return self.stats_a, self.stats_b

    def sums(
        self,
        all_pairs: bool = False,
        max_block_pairs: int = MAX_BLOCK_PAIRS,
        sort: bool = True,
        screen: Screen | None = None,
    ) -> Iterator[tuple[Range, PairCounts]]:
        """(range of feature_a, its pair sums inside the ranges) in order; memory: one block of
        ~`max_block_pairs` saved pairs, or of the engine's, per shard. Each scan computes the
        `todo` shards again. Without `sort` a block may come unsorted, and with a `screen` hold
        only the pairs passing it (`merged_blocks`)."""
        if all_pairs:
            check_all_pairs(self.range_a, self.range_b)
        blocks = merged_blocks(
            self.store, self.a, self.b, self.saved, self.todo, self.range_a,
            engine=self.engine, max_pairs=max_block_pairs, sort=sort,
            screen=None if all_pairs else screen, variant=self.variant,
        )  # fmt: skip
        whole_b = self.range_b == (0, self.stats_b.count.size)
        for block, pair_sums in blocks:
            pair_sums = pair_sums if whole_b else pair_sums.select(None, self.range_b)
            if all_pairs:
                pair_sums = with_all_pairs(pair_sums, block, self.range_b)
            yield block, pair_sums

    def blocks(
        self, all_pairs: bool = False, max_block_pairs: int = MAX_BLOCK_PAIRS
    ) -> Iterator[tuple[Range, pl.DataFrame]]:
        """(range of feature_a, its finished pairs) in order (see `sums`)."""
        for block, pair_sums in self.sums(all_pairs, max_block_pairs):
            yield block, finish_stats(pair_sums, self.stats_a, self.stats_b)


def merged_blocks(
    store: Store,
    a: int,
    b: int,
    saved: Mapping[str, zarr.Group],
    todo: Sequence[str],
    features_a: Range,
    *,
    engine: str = DEFAULT_ENGINE,
    max_pairs: int,
    sort: bool = True,
    screen: Screen | None = None,
    variant: shardsums.Variant = shardsums.PLAIN,
) -> Iterator[tuple[Range, PairCounts]]:
    """(range of feature_a, pair sums over every shard there) covering `features_a` in order.

    `saved` maps shards to their fresh saved groups (of `variant`'s sums); the `todo` shards
    are computed by `engine`. Without `todo`, blocks hold ~`max_pairs` saved pairs; with it,
    they follow the engine's blocks. Without `sort`, a block computed from one shard alone may
    come unsorted by feature_b within each feature_a (`PairCounts.sorted` sorts it), which
    saves the engine a pass, and hold only the pairs passing a `screen`.

    The shards' sums are added in the order of their names, each shard's taken alone (the
    canonical order: the same bits whichever shards are saved, `iter_sparse_pair_counts`).
    """
    saved = dict(sorted(saved.items()))
    todo = sorted(todo)
    if not todo:
        groups = list(saved.values())
        for block in shardsums.group_blocks(store, groups, features_a, max_pairs):
            yield block, PairCounts.total([shardsums.read_pairs(store, g, block) for g in groups])
        return
    lo_a, hi_a = features_a
    # Parts to add up come sorted and whole: a sum of shards' sums passes no screen by parts.
    alone = (len(todo) == 1 or engine == "sparse") and not saved
    sort, screen = sort or not alone, screen if alone else None
    if engine == "sparse" and not saved:  # the shards as one matrix: one stream, screened whole
        m_a, m_b, cuts = stacked_matrices(store, a, b, todo, variant)
        streams = [iter_sparse_pair_counts(m_a, m_b, sort=sort, screen=screen, segments=cuts)]
        empties = [PairCounts.empty(m_a.shape[0], m_a.shape[1], m_b.shape[1])]
    else:
        streams = [
            shardsums.iter_shard_pair_counts(
                store, a, b, s, engine, sort=sort, screen=screen, variant=variant
            )
            for s in todo
        ]
        empties = [
            PairCounts.empty(*shardsums.variant_shape(store, a, b, s, variant)) for s in todo
        ]
    for cut, parts in _aligned(streams, empties):
        block = (max(cut[0], lo_a), min(cut[1], hi_a))
        if block[0] >= block[1]:
            continue
        if block != cut:  # the scan covers part of the engine's block
            parts = [p.select(block) for p in parts]
        by_shard = dict(zip(todo, parts, strict=False))  # a stacked stream has one part
        by_shard |= {s: shardsums.read_pairs(store, g, block) for s, g in saved.items()}
        yield block, PairCounts.total([by_shard[s] for s in sorted(by_shard)])


# Within `one_pass`: (layer, shards, variant, side) -> (that layer's stacked matrix, cuts).
Kept = dict[tuple, tuple[Compact, np.ndarray]]
_ONE_PASS: contextvars.ContextVar[Kept | None] = contextvars.ContextVar("one_pass", default=None)


@contextlib.contextmanager
def one_pass() -> Iterator[Kept]:
    """Within it, each layer's shards are read once (`stacked_matrices`) for every layer pair
    computed: all pairs among some layers in one pass over the shards. Yields the matrices kept
    (keyed by layer first), from which the caller may drop the layers it no longer needs."""
    kept: Kept = {}
    token = _ONE_PASS.set(kept)
    try:
        yield kept
    finally:
        _ONE_PASS.reset(token)


def stacked_matrices(
    store: Store, a: int, b: int, shards: Sequence[str], variant: Variant = shardsums.PLAIN
) -> tuple[Compact, Compact, np.ndarray]:
    """Both layers over `shards`, as the variant sees them, stacked in the order given (in the
    kernels' `Compact` form: 6 bytes a nonzero at 24,576 features), and the shards' token
    boundaries: the engine sums each shard alone and adds the shards' sums in order
    (`iter_sparse_pair_counts(segments=)`), the same sums as the saved shard sums merged, and
    a screen sees them whole. Within `one_pass` each layer is read once."""
    kept = _ONE_PASS.get()
    kept = {} if kept is None else kept
    keys = [(layer, tuple(shards), variant, side if variant.null else "") for layer, side in
            ((a, "a"), (b, "b"))]  # fmt: skip
    missing = [i for i, key in enumerate(keys) if key not in kept]
    if missing:
        rows = [check_shard(store, a, b, shard)[0] for shard in shards]
        if variant.plain:  # filled shard by shard: the layers of each shard of one commit
            layers = [(a, b)[i] for i in missing]
            fills = [_filling(store, layer, shards) for layer in layers]
            for s in shards:
                parts = store.consistently(lambda s=s: [store.read(x, s) for x in layers])
                for fill, part in zip(fills, parts, strict=True):
                    fill.add(part)
            made = {i: fill.done() for i, fill in zip(missing, fills, strict=True)}
        else:
            both = [shardsums.variant_matrices(store, a, b, s, variant) for s in shards]
            made = {i: Compact.stacked([pair[i] for pair in both]) for i in missing}
            rows = [pair[0].shape[0] for pair in both]  # a variant may drop tokens
        cuts = np.cumsum([0, *rows])
        for i in missing:
            kept[keys[i]] = made[i], cuts
    (m_a, cuts), (m_b, _) = kept[keys[0]], kept[keys[1]]
    return m_a, m_b, cuts


def _filling(store: Store, layer: int, shards: Sequence[str]) -> Filling:
    """A `Filling` for `layer` over `shards`, sized by their attributes (a shard changed before
    it is read no longer fits: one line, run again)."""
    infos = [store.info(layer, s) for s in shards]
    rows = sum(int(info[spec.SHAPE][0]) for info in infos)
    nnz = sum(int(info["nnz"]) for info in infos)
    return Filling(rows, nnz, int(infos[0][spec.SHAPE][1]))


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
