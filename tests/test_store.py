"""The store: round trips against scipy, atomic replacement, clear errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore import FeatstoreError, open_store
from featstore.errors import StoreBusyError
from featstore.store import spec
from featstore.store.local import FeatureStats


def random_csr(n: int = 300, d: int = 64, density: float = 0.05, seed: int = 0) -> sp.csr_matrix:
    m = sp.random(n, d, density=density, format="csr", dtype=np.float32, random_state=seed)
    m.data = np.abs(m.data) + 0.01
    return m


@pytest.fixture
def store(tmp_path: Path):
    return open_store(tmp_path / "home", create=True)


@pytest.mark.parametrize(
    ("n", "d", "density"),
    [
        pytest.param(300, 64, 0.05, id="random"),
        pytest.param(1, 16, 1.0, id="single-token-dense"),
        pytest.param(50, 8, 0.0, id="all-zero"),
    ],
)
def test_round_trip_equals_scipy(store, n, d, density):
    m = random_csr(n, d, density)
    store.write_activations(6, "s0", m, {"source": "test"})
    back = store.read(6, "s0")
    assert back.shape == (n, d)
    np.testing.assert_array_equal(back.toarray(), m.toarray())
    assert store.info(6, "s0")["nnz"] == m.nnz


def test_token_range_read_matches_slice(store):
    m = random_csr(1000, 32)
    store.write_activations(7, "s0", m)
    np.testing.assert_array_equal(store.read(7, "s0", 123, 456).toarray(), m[123:456].toarray())
    blocks = [b for _, b in store.iter_blocks(7, "s0", block_tokens=97)]
    np.testing.assert_array_equal(sp.vstack(blocks).toarray(), m.toarray())


def test_blockwise_writer_equals_one_write(store):
    m = random_csr(500, 40, seed=3)
    with store.activation_writer(8, "blocks", 40) as w:
        for lo in range(0, 500, 77):
            w.append(m[lo : lo + 77])
    np.testing.assert_array_equal(store.read(8, "blocks").toarray(), m.toarray())


def test_writer_across_chunk_boundaries_equals_scipy(store):
    """Appends spanning several Zarr chunks (buffered, written whole) read back exactly."""
    m = random_csr(3000, 1000, density=0.2, seed=4)  # ~600k nonzeros: 2+ NNZ chunks
    assert m.nnz > 2 * spec.NNZ_CHUNK
    with store.activation_writer(8, "big", 1000) as w:
        for lo in range(0, 3000, 701):
            w.append(m[lo : lo + 701])
    back = store.read(8, "big")
    np.testing.assert_array_equal(back.indptr, m.indptr)
    np.testing.assert_array_equal(back.toarray(), m.toarray())
    part = store.read(8, "big", 1400, 2900)
    np.testing.assert_array_equal(part.toarray(), m[1400:2900].toarray())


def test_feature_stats_match_numpy(store):
    m = random_csr(400, 30, 0.2, seed=1)
    store.write_activations(6, "s0", m)
    dense = m.toarray().astype(np.float64)
    stats = store.feature_stats(6, "s0")
    np.testing.assert_array_equal(stats.count, (dense > 0).sum(0))
    np.testing.assert_allclose(stats.total, dense.sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sumsq, (dense**2).sum(0), rtol=1e-6)
    both = stats + FeatureStats.of(m)
    assert both.n_tokens == 800


def test_layers_shards_and_tokens(store):
    store.write_activations(9, "b", random_csr(10))
    store.write_activations(6, "a", random_csr(10))
    table = pl.DataFrame({"seq": [0, 0, 1], "pos": [0, 1, 0], "token": [5, 6, 7]})
    store.write_tokens("a", table)
    assert store.layers() == [6, 9]
    assert store.shards(6) == ["a"]
    assert store.tokens("a").to_dicts() == table.cast(pl.Int32).to_dicts()


def test_rewrite_replaces_whole(store):
    store.write_activations(6, "s0", random_csr(300))
    small = random_csr(5, seed=9)
    store.write_activations(6, "s0", small)
    np.testing.assert_array_equal(store.read(6, "s0").toarray(), small.toarray())


def test_crash_mid_write_keeps_old_version(store):
    old = random_csr(100)
    store.write_activations(6, "s0", old)
    with pytest.raises(RuntimeError):
        with store.activation_writer(6, "s0", 64) as w:
            w.append(random_csr(50, seed=2))
            raise RuntimeError("killed")
    np.testing.assert_array_equal(store.read(6, "s0").toarray(), old.toarray())
    assert not any((store.root_path / spec.STAGING).iterdir())


def test_crash_between_renames_is_recovered(store, tmp_path):
    m = random_csr(20)
    store.write_activations(6, "s0", m)
    # The state a kill leaves between "park the old group" and "rename the new one in".
    parked = store.root_path / spec.TRASH / "x"
    parked.parent.mkdir(parents=True, exist_ok=True)
    os.rename(store.root_path / spec.activation_path(6, "s0"), parked)
    (parked / ".target").write_text(spec.activation_path(6, "s0"))
    again = open_store(tmp_path / "home")
    np.testing.assert_array_equal(again.read(6, "s0").toarray(), m.toarray())


def test_second_writer_of_same_shard_is_refused(store):
    with store.lock(spec.activation_path(6, "s0")):
        with pytest.raises(StoreBusyError, match="being written by another process"):
            store.write_activations(6, "s0", random_csr(10))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        pytest.param(np.ones((3, 3)), "expected a scipy sparse matrix", id="dense"),
        pytest.param(sp.csr_matrix(np.array([[np.nan, 1.0]])), "NaN", id="nan"),
        pytest.param(sp.csr_matrix(np.array([[-1.0, 1.0]])), "non-negative", id="negative"),
    ],
)
def test_bad_activations_are_refused_and_store_unchanged(store, matrix, message):
    with pytest.raises(FeatstoreError, match=message):
        store.write_activations(6, "s0", matrix)
    assert store.layers() == []


def test_missing_store_is_one_line_error(tmp_path):
    with pytest.raises(FeatstoreError, match="no featstore store"):
        open_store(tmp_path / "nowhere")


def test_newer_spec_version_is_refused(store, tmp_path):
    meta_path = store.root_path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"][spec.FEATSTORE_VERSION] = spec.SPEC_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FeatstoreError, match="spec version"):
        open_store(tmp_path / "home")


def test_corrupt_chunk_names_layer_shard_and_file(store):
    store.write_activations(6, "s0", random_csr(200, density=0.3))
    chunk = next((store.root_path / spec.activation_path(6, "s0") / "data").rglob("c/*"))
    chunk.write_bytes(b"garbage")
    with pytest.raises(FeatstoreError, match=r"layer 6 shard s0.*data"):
        store.read(6, "s0")


def test_unknown_layer_is_one_line_error(store):
    store.write_activations(6, "s0", random_csr(10))
    with pytest.raises(FeatstoreError, match="layer 5 not in store"):
        store.read(5, "s0")


def test_bad_shard_name_is_refused(store):
    with pytest.raises(FeatstoreError, match="bad shard name"):
        store.write_activations(6, "../evil", random_csr(10))


def test_check_finds_every_problem(store):
    from featstore.store.check import check_store

    for shard in ("good", "bad"):
        m = random_csr(100, density=0.2)
        store.write_tokens(
            shard, pl.DataFrame({"seq": range(100), "pos": [0] * 100, "token": [1] * 100})
        )
        store.write_activations(6, shard, m)
    assert check_store(store) == []
    chunk = next((store.root_path / spec.activation_path(6, "bad") / "data").rglob("c/*"))
    chunk.write_bytes(b"garbage")
    store.write_activations(7, "orphan", random_csr(10))
    problems = check_store(store)
    assert any("layer 6 shard bad" in p and "data" in p for p in problems)
    assert any("layer 7 shard orphan" in p and "token table has None" in p for p in problems)
    assert not any("good" in p for p in problems)


def test_sequences_of_a_shard_that_is_not_whole_sequences_is_one_error(tmp_path):
    store = build_store(tmp_path / "whole", {6: {"s": sparse_acts(24, 5, 0.3, seed=1)}})
    got = store.sequences("s")  # 24 tokens in sequences of 8 (helpers.token_frame)
    want = store.tokens("s")["token"].to_numpy()
    assert got.shape == (3, 8) and (got.ravel() == want).all()
    ragged = build_store(tmp_path / "ragged", {6: {"s": sparse_acts(20, 5, 0.3, seed=1)}})
    with pytest.raises(FeatstoreError, match="20 tokens are not whole sequences of 8"):
        ragged.sequences("s")
