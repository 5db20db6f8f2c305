"""Stores written by earlier featstores still read (issue 13): `tests/data/store_v{1,2,3}` were
written by the featstore of spec version 1 (commit 62a0980), 2 (commit fecad02) and 3 (commit
b76d73d) with `tests/data/build_old_store.py` (layers 6 and 7 of shard s0, its token table, a
vocabulary and the pair sums of 6-7). Each is read here by zarr alone,
the independent reader, and by the current featstore: the values must be equal, `featstore check`
must be clean on a copy, and the copy must take a new commit of the current version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import zarr
from helpers import cli

from featstore.stats.shardsums import load_shard_pairs
from featstore.store import spec
from featstore.store.check import check_store
from featstore.store.home import open_store

DATA = Path(__file__).parent / "data"


@pytest.fixture(params=[1, 2, 3])
def old_home(request, tmp_path) -> tuple[int, Path]:
    home = tmp_path / "home"
    shutil.copytree(DATA / f"store_v{request.param}", home / spec.ROOT)
    return request.param, home


def by_zarr(home: Path, path: str) -> dict:
    """A group's arrays and attributes read by zarr alone."""
    group = zarr.open_group(zarr.storage.LocalStore(home / spec.ROOT, read_only=True), mode="r")
    group = group[path]
    return {"attrs": dict(group.attrs), **{n: a[:] for n, a in group.arrays()}}


def test_an_old_store_reads_as_zarr_reads_it(old_home):
    version, home = old_home
    assert by_zarr(home, "")["attrs"][spec.FEATSTORE_VERSION] == version
    store = open_store(home)
    assert store.layers() == [6, 7] and store.token_shards() == ["s0"]
    raw_tokens = by_zarr(home, "tokens/s0")
    table = store.tokens("s0")
    for column in ("seq", "pos", "token"):
        np.testing.assert_array_equal(table[column].to_numpy(), raw_tokens[column])
    for layer in (6, 7):
        raw = by_zarr(home, f"activations/layer_{layer}/s0")
        expected = sp.csr_matrix(
            (raw["data"], raw["indices"], raw["indptr"]), shape=raw["attrs"]["shape"]
        )
        got = store.read(layer, "s0")
        assert got.shape == (24, 16) and got.nnz == expected.nnz > 0
        np.testing.assert_array_equal(got.toarray(), expected.toarray())
        np.testing.assert_array_equal(
            store.read(layer, "s0", 5, 13).toarray(), expected[5:13].toarray()
        )
        stats = store.feature_stats(layer, "s0")
        np.testing.assert_array_equal(stats.count, raw["feature_count"])
        np.testing.assert_array_equal(stats.count, np.diff(expected.tocsc().indptr))
        np.testing.assert_allclose(stats.total, raw["feature_sum"])
    vocab = by_zarr(home, "vocab")
    words = [
        bytes(vocab["bytes"][a:b]).decode()
        for a, b in zip(vocab["offsets"][:-1], vocab["offsets"][1:], strict=True)
    ]
    assert store.vocab() == words and words[-2:] == ["caf\u00e9", "\u00fcber"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_old_pair_sums_read_as_zarr_reads_them(version, tmp_path):
    home = DATA / f"store_v{version}"
    raw = zarr.open_group(zarr.storage.LocalStore(home, read_only=True), mode="r")["pairs/6-7/s0"]
    store = open_store(tmp_path / "home", url=str(home))  # read in place: nothing written
    saved = load_shard_pairs(store, 6, 7, "s0")
    assert saved is not None, "the old pair sums should be fresh for the old activations"
    for name in ("feature_a", "feature_b", "n_both", "sum_xy"):
        np.testing.assert_array_equal(getattr(saved, name), raw[name][:])
    # ... and they are the sums of the stored activations (numpy as the reference)
    a, b = (store.read(layer, "s0").toarray().astype(np.float64) for layer in (6, 7))
    both = (a > 0).T.astype(np.int64) @ (b > 0)
    np.testing.assert_array_equal(both[saved.feature_a, saved.feature_b], saved.n_both)
    np.testing.assert_allclose((a.T @ b)[saved.feature_a, saved.feature_b], saved.sum_xy)


def test_check_is_clean_on_a_copy_and_a_new_commit_lands(old_home, capsys):
    version, home = old_home
    assert check_store(open_store(home)) == []
    status, out, err = cli(capsys, home, "check")
    assert status == 0 and not err, err
    sql = "SELECT count(*) AS n FROM activations WHERE layer = 7"
    status, out, err = cli(capsys, home, "sql", sql)
    assert status == 0 and str(by_zarr(home, "activations/layer_7/s0")["data"].size) in out, err
    # The current featstore writes into the old store; the root keeps its version, and every
    # reader takes the new group with the old ones.
    store = open_store(home)
    new = sp.random(24, 16, density=0.5, format="csr", random_state=1, dtype=np.float32)
    store.write_activations(6, "s0", new)
    np.testing.assert_array_equal(store.read(6, "s0").toarray(), new.toarray())
    assert store.tokens("s0").height == 24 and check_store(store) == []
    assert by_zarr(home, "")["attrs"][spec.FEATSTORE_VERSION] == version
    table = pl.DataFrame({"seq": np.zeros(24, np.int64), "pos": np.arange(24), "token": 3})
    store.write_tokens("s0", table)  # other rows: the old layers go with it
    assert store.shards(6) == store.shards(7) == []
    assert ["orphan" in p for p in check_store(store)] == [True]  # a table no layer uses
