"""Every layer pair in one pass over the shards, and shard sums in a canonical order: the same
bits as each pair computed alone, as saved shard sums merged, and as scipy's product of the
shards added in order."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.errors import FeatstoreError
from featstore.stats import allpairs, kernel, query, scan, shardsums
from featstore.stats.query import PairQuery
from featstore.store.local import Store

LAYERS = (6, 7, 8, 9)
SHARDS = {"s0": 60, "s1": 45, "s2": 70}


@pytest.fixture
def store(tmp_path) -> Store:
    acts = {
        layer: {
            shard: sparse_acts(n, 14, 0.3, seed=10 * layer + k)
            for k, (shard, n) in enumerate(SHARDS.items())
        }
        for layer in LAYERS
    }
    return build_store(tmp_path / "home", acts)


def scipy_sums(store: Store, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """sum_xy and n_both of every pair: scipy's product of each shard, added in shard order."""
    total, both = np.zeros((14, 14)), np.zeros((14, 14), np.int64)
    for shard in SHARDS:
        x, y = (store.read(layer, shard).astype(np.float64) for layer in (a, b))
        total = total + (x.T @ y).toarray()
        both += ((x > 0).astype(np.int64).T @ (y > 0).astype(np.int64)).toarray()
    return total, both


def test_segments_sum_each_shard_alone_then_add_in_order(store):
    m_a, m_b, cuts = scan.stacked_matrices(store, 6, 7, list(SHARDS))
    assert cuts.tolist() == [0, 60, 105, 175]
    got = kernel.PairCounts.total(
        list(kernel.iter_sparse_pair_counts(m_a, m_b, max_work=50, segments=cuts)),
        same_tokens=True,
    )
    sums, both = scipy_sums(store, 6, 7)
    np.testing.assert_array_equal(got.sum_xy, sums[got.feature_a, got.feature_b])  # bit for bit
    np.testing.assert_array_equal(got.n_both, both[got.feature_a, got.feature_b])
    assert got.nnz == int((both > 0).sum())


def test_in_memory_sums_equal_saved_shard_sums_merged_bit_for_bit(store):
    kwargs = {"min_pearson": -0.2, "min_jaccard": 0.02}
    in_memory = query.pair_report(store, PairQuery(6, 8, **kwargs))
    for shard in ("s0", "s2"):  # some shards saved, the others computed
        shardsums.update_shard_pairs(store, 6, 8, shard)
    mixed = query.pair_report(store, PairQuery(6, 8, **kwargs))
    shardsums.update_shard_pairs(store, 6, 8, "s1")
    saved = query.pair_report(store, PairQuery(6, 8, **kwargs))
    for other in (mixed, saved):
        assert other[0].equals(in_memory[0]) and other[1] == in_memory[1]


@pytest.mark.parametrize(
    "query_kwargs",
    [
        pytest.param({"min_pearson": 0.1}, id="screened"),
        pytest.param({"min_pearson": -1.0, "min_jaccard": 0.0}, id="every-pair"),
        pytest.param({"min_pearson": 0.05, "variant": shardsums.Variant(null=True)}, id="null"),
    ],
)
def test_every_pair_in_one_pass_equals_each_pair_alone(store, monkeypatch, query_kwargs):
    reads = []
    original = store.read
    monkeypatch.setattr(store, "read", lambda layer, shard, *r: reads.append(layer)
                        or original(layer, shard, *r))  # fmt: skip
    ask = functools.partial(PairQuery, **query_kwargs)
    together = allpairs.pair_reports(store, LAYERS, ask, count=True)
    assert sorted(together) == [(6, 7), (6, 8), (6, 9), (7, 8), (7, 9), (8, 9)]
    if "variant" not in query_kwargs:  # the null model keys layer b apart: read again
        assert sorted(reads) == sorted(LAYERS * len(SHARDS))  # each (layer, shard) once
    uncounted = allpairs.pair_reports(store, LAYERS, ask)  # the default: the screen stays on
    for (a, b), (frame, counts) in together.items():
        alone = query.pair_report(store, PairQuery(a, b, **query_kwargs))
        assert frame.height > 0
        assert frame.equals(alone[0]) and counts == alone[1] and counts
        assert uncounted[(a, b)][0].equals(frame) and uncounted[(a, b)][1] == {}


def test_every_pair_uses_the_pearson_screen_unless_counting(store, monkeypatch):
    """Issue 12's leftover: counting every pair turns the kernel's Pearson screen off, so the
    one-pass reports leave counting off unless asked (as `pair_stats`)."""
    screens = []
    original = query.pearson_screen
    monkeypatch.setattr(query, "pearson_screen", lambda *a: screens.append(1) or original(*a))
    ask = functools.partial(PairQuery, min_pearson=0.1)
    allpairs.pair_reports(store, (6, 7), ask)
    assert screens == [1]
    allpairs.pair_reports(store, (6, 7), ask, count=True)
    assert screens == [1]


def test_max_distance_picks_the_near_pairs(store):
    assert allpairs.layer_pairs(LAYERS, max_distance=1) == [(6, 7), (7, 8), (8, 9)]
    ask = functools.partial(PairQuery, min_pearson=0.3)
    assert sorted(allpairs.pair_reports(store, (9, 7, 8), ask)) == [(7, 8), (7, 9), (8, 9)]
    with pytest.raises(FeatstoreError, match="two distinct layers"):
        allpairs.layer_pairs([7, 7])


def test_segments_that_do_not_cover_the_tokens_are_refused():
    x = sp.csr_matrix(np.eye(4, dtype=np.float32))
    for bad in ([0, 3], [1, 4], [0, 3, 2, 4], [4]):
        with pytest.raises(FeatstoreError, match="segments must rise from 0 to 4"):
            list(kernel.iter_sparse_pair_counts(x, x, segments=bad))
