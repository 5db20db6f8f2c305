"""Per-feature summaries of one layer, from one pass over its activations.

A feature page needs the feature's strongest activations (to show their contexts) and the
distribution of its values (a histogram). The store keeps activations by token (CSR), so finding
one feature's activations means reading the whole layer; this module does that once per layer
and keeps, for every feature, its `TOP` strongest activations (shard, row, value, token) and a
histogram of its nonzero values on fixed log-spaced bins. Memory: d_sae x TOP entries plus
d_sae x bins counts (24,576 features: about 30 MB), never a copy of the activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from featstore.store import spec
from featstore.store.local import Store

TOP = 32  # strongest activations kept per feature
HIST_EDGES = np.geomspace(1e-4, 1e4, 81)  # log-spaced: 10 bins per decade
BLOCK_TOKENS = 1 << 14
REDUCE_AT = 1 << 21  # candidates held before they are cut back to TOP per feature


@dataclass(frozen=True)
class Hits:
    """Activations, grouped by feature, strongest first (ties: earlier shard, then row)."""

    feature: np.ndarray  # int32
    shard: np.ndarray  # int32: index into LayerSummary.shards
    row: np.ndarray  # int64: row of the shard
    value: np.ndarray  # float32

    @staticmethod
    def concat(parts: list[Hits]) -> Hits:
        return Hits(*(np.concatenate([getattr(p, f) for p in parts]) for f in Hits.FIELDS))

    def take(self, order: np.ndarray) -> Hits:
        return Hits(*(getattr(self, f)[order] for f in Hits.FIELDS))

    def strongest(self, top: int) -> Hits:
        """At most `top` per feature, sorted by feature then value descending."""
        bits = self.value.astype(np.float32).view(np.uint32).astype(np.int64)  # >= 0: monotone
        key = (self.feature.astype(np.int64) << 32) | (0xFFFFFFFF - bits)
        ordered = self.take(np.argsort(key, kind="stable"))
        first = np.searchsorted(ordered.feature, ordered.feature, side="left")
        return ordered.take(np.flatnonzero(np.arange(first.size) - first < top))


Hits.FIELDS = ("feature", "shard", "row", "value")


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    shards: tuple[str, ...]
    d_sae: int
    hits: Hits  # the TOP strongest of every feature, grouped by feature
    offsets: np.ndarray  # (d_sae + 1,): feature f's hits are [offsets[f], offsets[f + 1])
    tokens: np.ndarray  # token id of each hit (-1 where the shard has no token table)
    histogram: np.ndarray  # (d_sae, len(HIST_EDGES) + 1): below the first edge, bins, above

    def top(self, feature: int) -> Hits:
        return self.hits.take(np.arange(self.offsets[feature], self.offsets[feature + 1]))

    def top_tokens(self, feature: int) -> np.ndarray:
        return self.tokens[self.offsets[feature] : self.offsets[feature + 1]]


def _block_hits(store: Store, layer: int, shard: str, index: int) -> Iterator[Hits]:
    for start, block in store.iter_blocks(layer, shard, BLOCK_TOKENS):
        rows = np.repeat(np.arange(block.shape[0], dtype=np.int64), np.diff(block.indptr)) + start
        keep = block.data > 0
        yield Hits(
            block.indices[keep].astype(np.int32),
            np.full(int(keep.sum()), index, np.int32),
            rows[keep],
            block.data[keep].astype(np.float32),
        )


def _hit_tokens(store: Store, shards: tuple[str, ...], hits: Hits) -> np.ndarray:
    """The token id at each hit (-1 where its shard has no token table or a shorter one)."""
    out = np.full(hits.row.size, -1, np.int64)
    have = set(store.token_shards())
    for i, shard in enumerate(shards):
        mine = np.flatnonzero(hits.shard == i)
        if shard in have and mine.size:
            column = store.tokens(shard)["token"].to_numpy()
            inside = mine[hits.row[mine] < column.size]
            out[inside] = column[hits.row[inside]]
    return out


def summarise_layer(store: Store, layer: int, top: int = TOP) -> LayerSummary:
    """One pass over a layer's shards: every feature's strongest activations and histogram."""
    shards = tuple(store.shards(layer))
    d_sae = int(store.info(layer, shards[0])[spec.SHAPE][1]) if shards else 0
    n_bins = HIST_EDGES.size + 1
    histogram = np.zeros(d_sae * n_bins, np.int64)
    kept: list[Hits] = []
    held = 0
    for i, shard in enumerate(shards):
        for hits in _block_hits(store, layer, shard, i):
            bins = np.searchsorted(HIST_EDGES, hits.value, side="right")
            histogram += np.bincount(hits.feature * n_bins + bins, minlength=histogram.size)
            kept.append(hits.strongest(top))
            held += kept[-1].row.size
            if held > REDUCE_AT:
                kept = [Hits.concat(kept).strongest(top)]
                held = kept[0].row.size
    empty = Hits(*(np.zeros(0, t) for t in (np.int32, np.int32, np.int64, np.float32)))
    best = Hits.concat(kept).strongest(top) if kept else empty
    offsets = np.searchsorted(best.feature, np.arange(d_sae + 1), side="left")
    return LayerSummary(
        layer, shards, d_sae, best, offsets, _hit_tokens(store, shards, best),
        histogram.reshape(d_sae, n_bins),
    )  # fmt: skip
