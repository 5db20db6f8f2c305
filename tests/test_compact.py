"""The kernels' compact layer form: exact values in small types, A's side per feature range."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.errors import FeatstoreError
from featstore.stats import kernel, scan
from featstore.stats.compact import Compact, Filling


def test_store_values_keep_float32_and_ids_fit_uint16():
    m = sparse_acts(200, 300, 0.05, 1)
    c = Compact.of(m)
    assert (c.indices.dtype, c.data.dtype) == (np.uint16, np.float32)
    back = sp.csr_matrix((c.data, c.indices.astype(np.int32), c.indptr), shape=c.shape)
    np.testing.assert_array_equal(back.toarray(), m.toarray())


def test_values_float32_cannot_hold_stay_float64_and_wide_layers_keep_int32_ids():
    m = sparse_acts(50, 70_000, 0.001, 2).astype(np.float64)
    m.data[0] = 1 / 3  # not a float32
    c = Compact.of(m)
    assert (c.indices.dtype, c.data.dtype) == (np.int32, np.float64)
    assert c.data[0] == 1 / 3


def test_compacting_drops_stored_zeros_without_touching_the_callers_matrix():
    m = sparse_acts(40, 30, 0.2, 3)
    m.data[::3] = 0
    stored = m.nnz
    c = Compact.of(m)
    assert m.nnz == stored and c.nnz == int((m.data != 0).sum())
    assert c.data.all()


@pytest.mark.parametrize("lo, hi", [(0, 37), (5, 6), (10, 30), (36, 37)])
def test_feature_major_range_is_scipys_transpose_of_those_columns(lo, hi):
    m = sparse_acts(300, 37, 0.1, 4)
    ptr, rows, values = Compact.of(m).feature_major(lo, hi)
    t = m.T.tocsr()  # columns x rows, rows sorted
    assert ptr.size == 38 and np.all(np.diff(ptr)[:lo] == 0) and np.all(np.diff(ptr)[hi:] == 0)
    for j in range(lo, hi):
        got = slice(ptr[j], ptr[j + 1])
        want = slice(t.indptr[j], t.indptr[j + 1])
        np.testing.assert_array_equal(rows[got], t.indices[want])
        np.testing.assert_array_equal(values[got], t.data[want])


def test_sums_from_a_side_built_in_several_chunks_equal_scipy_bit_for_bit(monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK_ENTRIES", 500)  # A's side in many pieces
    a, b = sparse_acts(600, 40, 0.1, 5), sparse_acts(600, 25, 0.12, 6)
    blocks = list(kernel.iter_sparse_pair_counts(a, b, max_work=400, segments=[0, 250, 600]))
    assert len(blocks) > 4
    got = kernel.PairCounts.total(blocks, same_tokens=True)
    x, y = a.astype(np.float64), b.astype(np.float64)
    want = (x[:250].T @ y[:250]).toarray() + (x[250:].T @ y[250:]).toarray()
    both = ((x > 0).astype(np.int64).T @ (y > 0).astype(np.int64)).toarray()
    np.testing.assert_array_equal(got.sum_xy, want[got.feature_a, got.feature_b])
    np.testing.assert_array_equal(got.n_both, both[got.feature_a, got.feature_b])
    assert got.nnz == int((both > 0).sum())


def test_chunks_group_whole_blocks_under_the_limit():
    counts = np.array([5, 5, 5, 5, 20, 1, 1])
    runs = kernel.chunked([(0, 2), (2, 4), (4, 5), (5, 7)], counts, 20)
    assert runs == [((0, 4), [(0, 2), (2, 4)]), ((4, 5), [(4, 5)]), ((5, 7), [(5, 7)])]


def test_filling_refuses_parts_that_break_the_sizes_announced():
    part = sparse_acts(10, 8, 0.3, 7)
    too_small = Filling(10, part.nnz - 1, 8)
    with pytest.raises(FeatstoreError, match="overflows"):
        too_small.add(part)
    short = Filling(20, 2 * part.nnz, 8)
    short.add(part)
    with pytest.raises(FeatstoreError, match="announced"):
        short.done()
    with pytest.raises(FeatstoreError, match="overflows"):
        Filling(10, part.nnz, 9).add(part)


def test_stacked_layers_are_the_shards_in_compact_form(tmp_path):
    acts = {layer: {s: sparse_acts(60 + 10 * k, 50, 0.1, layer + k) for k, s in
                    enumerate(("s0", "s1"))} for layer in (6, 7)}  # fmt: skip
    store = build_store(tmp_path / "home", acts)
    m_a, m_b, cuts = scan.stacked_matrices(store, 6, 7, ["s0", "s1"])
    assert cuts.tolist() == [0, 60, 130]
    for c, layer in ((m_a, 6), (m_b, 7)):
        assert isinstance(c, Compact) and c.data.dtype == np.float32
        want = sp.vstack([acts[layer]["s0"], acts[layer]["s1"]]).toarray()
        back = sp.csr_matrix((c.data, c.indices.astype(np.int32), c.indptr), shape=c.shape)
        np.testing.assert_array_equal(back.toarray(), want)


def test_feature_majors_of_rising_ranges_are_each_ranges_transpose():
    m = sparse_acts(300, 37, 0.1, 7)
    c, t = Compact.of(m), m.T.tocsr()
    ranges = [(0, 3), (3, 10), (12, 12), (15, 30), (30, 37)]  # gaps and an empty range too
    for (lo, hi), (ptr, rows, values) in zip(ranges, c.feature_majors(ranges), strict=True):
        assert np.all(np.diff(ptr)[:lo] == 0) and np.all(np.diff(ptr)[hi:] == 0)
        for j in range(lo, hi):
            want = slice(t.indptr[j], t.indptr[j + 1])
            np.testing.assert_array_equal(rows[ptr[j] : ptr[j + 1]], t.indices[want])
            np.testing.assert_array_equal(values[ptr[j] : ptr[j + 1]], t.data[want])


def test_feature_majors_refuse_ranges_that_go_back():
    c = Compact.of(sparse_acts(50, 20, 0.2, 8))
    with pytest.raises(FeatstoreError, match="must rise"):
        list(c.feature_majors([(5, 10), (8, 12)]))


def test_a_matrix_whose_row_ids_do_not_rise_is_refused_not_half_filled():
    c = Compact.of(sparse_acts(50, 20, 0.3, 9))
    row = int(np.flatnonzero(np.diff(c.indptr) >= 2)[0])
    ids = c.indices.copy()
    ids[c.indptr[row] : c.indptr[row + 1]] = ids[c.indptr[row] : c.indptr[row + 1]][::-1]
    bad = Compact(c.indptr, ids, c.data, c.shape)  # what no reader hands out (they check)
    top = int(ids[c.indptr[row]])  # the row now starts at its largest id
    with pytest.raises(FeatstoreError, match="must rise within each row"):
        bad.feature_major(0, top)  # its smaller ids lie behind that one
