"""The pair tables' copies sorted by feature_b (`featstore.store.pairindex`): a feature's
predecessors read from it equal the Parquet table's, a rewritten table or a damaged, foreign or
half-written file is rebuilt, a link in the folder's place is refused, and the explorer falls
back to scanning the table where no index can be written."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, correlated_layers

from featstore.errors import FeatstoreError
from featstore.explorer import reads
from featstore.stats.query import PairQuery, pair_stats, pair_stats_path
from featstore.store import pairindex, spec


@pytest.fixture
def store(tmp_path):
    acts = correlated_layers((6, 7), n_tokens=96, d=12, seed=2)
    store = build_store(
        tmp_path / "home", {k: {"s0": sp.csr_matrix(x.astype(np.float32))} for k, x in acts.items()}
    )
    pair_stats(store, PairQuery(6, 7, save=True))
    return store


def predecessors(file, feature, min_both):
    con = duckdb.connect()
    con.execute(f"ATTACH '{file}' AS p (READ_ONLY)")
    query = pairindex.PREDECESSORS.format(db="p")
    return con.sql(query, params={"feature": feature, "min_both": min_both}).pl()


def from_table(store, feature, min_both):
    table = pl.read_parquet(pair_stats_path(store, 6, 7))
    return table.filter((pl.col("feature_b") == feature) & (pl.col("n_both") >= min_both)).select(
        "feature_a", "feature_b", "n_both", "sum_xy"
    )


def same(got, want):
    key = ["feature_a"]
    got, want = got.sort(key), want.sort(key)
    assert got["feature_a"].to_list() == want["feature_a"].cast(pl.Int64).to_list()
    assert got["n_both"].to_list() == want["n_both"].to_list()
    np.testing.assert_array_equal(got["sum_xy"].to_numpy(), want["sum_xy"].to_numpy())


def test_predecessors_equal_the_table(store):
    file = pairindex.ensure(store, 6, 7, pair_stats_path(store, 6, 7))
    assert file == store.home / spec.PAIR_INDEX_DIR / "6-7.duckdb"
    for feature in range(12):
        for min_both in (0, 2):
            same(predecessors(file, feature, min_both), from_table(store, feature, min_both))
    con = duckdb.connect()
    con.execute(f"ATTACH '{file}' AS p (READ_ONLY)")
    col = con.sql("SELECT feature_b FROM p.pairs").fetchnumpy()["feature_b"]
    assert (np.diff(col) >= 0).all()  # sorted: a feature filter reads only its row groups


def test_a_rewritten_table_is_reindexed(store):
    parquet = pair_stats_path(store, 6, 7)
    file = pairindex.ensure(store, 6, 7, parquet)
    table = pl.read_parquet(parquet)
    table.with_columns(n_both=pl.col("n_both") + 1).write_parquet(parquet)
    assert not pairindex.fresh(file, parquet)
    pairindex.ensure(store, 6, 7, parquet)
    same(predecessors(file, 3, 0), from_table(store, 3, 0))


@pytest.mark.parametrize("damage", ["garbage", "other meta", "folder"])
def test_a_damaged_or_foreign_file_is_rebuilt(store, damage):
    parquet = pair_stats_path(store, 6, 7)
    file = pairindex.index_path(store.home, 6, 7)
    file.parent.mkdir()
    if damage == "garbage":
        file.write_bytes(b"not a duckdb file")
    elif damage == "other meta":
        pairindex.ensure(store, 6, 7, parquet)
        con = duckdb.connect(str(file))
        con.execute("UPDATE meta SET value = '0:0:0' WHERE key = 'stamp'")
        con.close()
    (file.parent / f".{file.name}.123-abc.tmp").write_bytes(b"half")  # a killed build's
    assert not pairindex.fresh(file, parquet)
    pairindex.ensure(store, 6, 7, parquet)
    assert pairindex.fresh(file, parquet)
    assert [p.name for p in file.parent.iterdir()] == [file.name]
    same(predecessors(file, 5, 2), from_table(store, 5, 2))


def test_a_link_in_place_of_the_folder_is_refused_and_the_explorer_scans(store, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (store.home / spec.PAIR_INDEX_DIR).symlink_to(victim)
    with pytest.raises(FeatstoreError, match="not a plain folder"):
        pairindex.ensure(store, 6, 7, pair_stats_path(store, 6, 7))
    assert list(victim.iterdir()) == []
    ex = reads.Explorer(store)
    assert ex.pair_index(6, 7) is None
    rows = ex.pair_rows(7, 6, 4, min_both=0)  # from the table itself
    same(rows.select("feature_a", "feature_b", "n_both", "sum_xy"), from_table(store, 4, 0))
    assert list(victim.iterdir()) == []


def test_the_explorer_follows_a_rewritten_table(store):
    ex = reads.Explorer(store)
    before = ex.pair_rows(7, 6, 4, min_both=0)
    assert ex.pair_index(6, 7) is not None
    parquet = pair_stats_path(store, 6, 7)
    pl.read_parquet(parquet).with_columns(sum_xy=pl.col("sum_xy") * 2).write_parquet(parquet)
    after = ex.pair_rows(7, 6, 4, min_both=0)
    np.testing.assert_allclose(after["sum_xy"].to_numpy(), 2 * before["sum_xy"].to_numpy())


def test_warm_builds_the_indexes(store):
    ex = reads.Explorer(store)
    ex.warm()
    assert pairindex.fresh(pairindex.index_path(store.home, 6, 7), pair_stats_path(store, 6, 7))
    assert (store.home / spec.SQL_INDEX_DIR / "layer_7" / "s0.duckdb").is_file()
