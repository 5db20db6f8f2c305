"""The SQL index (featstore.store.sqlindex) kept in step with the store, attacked."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from helpers import build_store, cli, sparse_acts

from featstore.errors import FeatstoreError
from featstore.store import spec, sql, sqlindex
from featstore.store.check import check_store
from featstore.store.local import Store
from featstore.store.sqlcatalog import catalog

QUERY = "SELECT shard, row, feature, value FROM activations WHERE layer = 6 ORDER BY ALL"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    acts = {
        6: {"s0": sparse_acts(80, 32, 0.2, seed=1)},
        7: {"s0": sparse_acts(80, 32, 0.2, seed=2)},
    }
    return build_store(tmp_path / "home", acts, vocab=[f"t{i}" for i in range(40)])


def want(store: Store, layer: int = 6) -> pl.DataFrame:
    """The activations of a layer as rows, from store.read (an independent reference)."""
    frames = []
    for shard in store.shards(layer):
        coo = store.read(layer, shard).tocoo()
        frames.append(
            pl.DataFrame(
                {
                    "shard": [shard] * coo.nnz,
                    "row": coo.row.astype(np.int32),
                    "feature": coo.col.astype(np.int32),
                    "value": coo.data,
                }
            )
        )
    return pl.concat(frames).sort(pl.all())  # fmt: skip


def index_files(store: Store) -> dict[str, float]:
    base = store.home / spec.SQL_INDEX_DIR
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}


def test_index_is_built_once_and_kept_while_the_store_is_unchanged(store):
    assert sql.query(store, QUERY).equals(want(store))
    built = index_files(store)
    assert set(built) == {"layer_6/s0.duckdb", "layer_7/s0.duckdb"}  # only the views named
    assert sql.query(store, QUERY).equals(want(store))
    assert index_files(store) == built


def test_a_replaced_shard_with_the_same_shape_and_nnz_is_reindexed(store):
    sql.query(store, QUERY)
    old = store.read(6, "s0")
    new = old.copy()
    new.data = (new.data[::-1] + 1).astype(np.float32)  # same shape, nnz and attributes
    store.write_activations(6, "s0", new, {"source": "test"})
    got = sql.query(store, QUERY)
    assert got.equals(want(store)) and not got["value"].equals(pl.Series(old.tocoo().data))


def test_replacing_a_token_table_reindexes_the_activations_joined_to_it(store):
    sql.query(store, "SELECT count(*) FROM activations")
    table = store.tokens("s0").with_columns(token=pl.col("token") + 1)
    with store.transaction():  # the shard re-extracted: its token table and both layers
        store.write_tokens("s0", table)
        for layer in (6, 7):
            store.write_activations(layer, "s0", store.read(layer, "s0"), {"source": "test"})
    got = sql.query(store, "SELECT row, token FROM activations WHERE layer = 7 ORDER BY ALL")
    coo = store.read(7, "s0").tocoo()
    tokens = table["token"].to_numpy()[coo.row].astype(np.int32)
    expect = pl.DataFrame({"row": coo.row.astype(np.int32), "token": tokens})
    assert got.equals(expect.sort(pl.all()))


def test_a_copied_store_is_reindexed_not_trusted(store, tmp_path):
    sql.query(store, QUERY)
    copy = tmp_path / "copy"
    shutil.copytree(store.home, copy)  # same bytes, new files: new stamps
    got = sql.query(copy, QUERY)
    assert got.equals(want(store))
    assert {p.stat().st_ino for p in (copy / spec.SQL_INDEX_DIR).rglob("*.duckdb")}.isdisjoint(
        p.stat().st_ino for p in (store.home / spec.SQL_INDEX_DIR).rglob("*.duckdb")
    )


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda f: f.write_bytes(b"not a duckdb file"), id="garbage"),
        pytest.param(lambda f: f.write_bytes(f.read_bytes()[: 4096 * 3]), id="truncated"),
        pytest.param(lambda f: f.write_bytes(b""), id="empty"),
        pytest.param(lambda f: (f.unlink(), f.mkdir()), id="a folder"),
        pytest.param(lambda f: (f.unlink(), f.symlink_to("/etc/passwd")), id="symlink"),
    ],
)
def test_a_corrupted_index_file_is_rebuilt_never_read(store, damage):
    sql.query(store, QUERY)
    damage(store.home / spec.SQL_INDEX_DIR / "layer_6" / "s0.duckdb")
    assert sql.query(store, QUERY).equals(want(store))


def craft(store: Store, layer: int, shard: str, sql_text: str) -> Path:
    """Rewrite an index file's rows with `sql_text`, keeping its meta (a crafted file)."""
    file = store.home / spec.SQL_INDEX_DIR / f"layer_{layer}" / f"{shard}.duckdb"
    con = duckdb.connect(str(file))
    con.execute(sql_text)
    con.close()
    return file


@pytest.mark.parametrize(
    "sql_text",
    [
        pytest.param("UPDATE meta SET value = 'x' WHERE key = 'stamp'", id="wrong stamp"),
        pytest.param("UPDATE meta SET value = '9' WHERE key = 'index-version'", id="newer"),
        pytest.param("ALTER TABLE activations DROP COLUMN token", id="fewer columns"),
        pytest.param("ALTER TABLE activations ALTER value TYPE DOUBLE", id="other type"),
        pytest.param("CREATE TABLE extra AS SELECT 1 AS x", id="extra table"),
        pytest.param("CREATE VIEW v AS SELECT * FROM activations", id="extra view"),
        pytest.param("DROP TABLE meta", id="no meta"),
    ],
)
def test_a_crafted_index_file_that_does_not_match_is_rebuilt(store, sql_text):
    sql.query(store, QUERY)
    craft(store, 6, "s0", sql_text)
    assert sql.query(store, QUERY).equals(want(store))


def test_a_crafted_index_with_the_right_stamp_is_caught_by_check(store, capsys):
    sql.query(store, QUERY)
    assert check_store(store) == []
    craft(store, 6, "s0", "UPDATE activations SET value = value + 1 WHERE row = 3")
    problems = check_store(store)
    assert len(problems) == 1 and "sql_index/layer_6/s0.duckdb" in problems[0], problems
    status, out, _ = cli(capsys, store.home, "check")
    assert status == 1 and "rows differ" in out


def test_a_deleted_shard_leaves_no_index_behind(store):
    sql.query(store, QUERY)
    store.delete_shard("s0")
    assert sql.query(store, "SELECT count(*) AS n FROM activations")["n"][0] == 0
    assert index_files(store) == {}
    assert check_store(store) == []


KILLED_BUILD = """
import os, signal, sys
from featstore.store import sqlindex
from featstore.store.home import open_store

def die(*args, **kwargs):  # the index file is half written: kill the process now
    os.kill(os.getpid(), signal.SIGKILL)

real = sqlindex._fsync
sqlindex._fsync = die
from featstore.store import sql
sql.query(open_store(sys.argv[1]), "SELECT count(*) FROM activations WHERE layer = 6")
"""


def test_a_killed_index_build_leaves_nothing_visible(store):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(store.home)], env=env,
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    folder = store.home / spec.SQL_INDEX_DIR / "layer_6"
    assert not (folder / "s0.duckdb").exists()
    assert [p.name for p in folder.iterdir()]  # the half-written temporary file is left
    assert sql.query(store, QUERY).equals(want(store))
    assert [p.name for p in folder.iterdir()] == ["s0.duckdb"]  # and removed by the next build


def test_a_damaged_group_fails_only_the_queries_that_read_it(store, capsys):
    chunk = next((store.root_path / spec.activation_path(7, "s0") / "data").rglob("c/*"))
    chunk.write_bytes(b"garbled")
    assert sql.query(store, QUERY).equals(want(store))
    status, _, err = cli(capsys, store.home, "sql", "SELECT max(value) FROM activations")
    assert status == 2 and err.count("\n") == 1 and "layer 7 shard s0" in err
    assert not (store.home / spec.SQL_INDEX_DIR / "layer_7" / "s0.duckdb").exists()
    for where in ("feature = 2", "layer = 7 AND feature = 2", "row = 3 AND value > 0"):
        status, _, err = cli(capsys, store.home, "sql",
                             f"SELECT count(*) FROM activations WHERE {where}")  # fmt: skip
        assert status == 2 and "layer 7 shard s0" in err, where  # never read as no rows


def test_a_group_whose_metadata_is_garbage_is_one_line(store, capsys):
    (store.root_path / spec.activation_path(7, "s0") / "zarr.json").write_text("{nope")
    status, _, err = cli(capsys, store.home, "sql", "SELECT count(*) FROM activations")
    assert status == 2 and err.count("\n") == 1 and "layer_7/s0" in err


def test_stamps_change_on_every_commit_even_with_equal_attributes(store):
    before = {(g.kind, g.layer, g.shard): g.stamp for g in catalog(store.root_path)}
    store.write_activations(6, "s0", store.read(6, "s0"), {"source": "test"})
    after = {(g.kind, g.layer, g.shard): g.stamp for g in catalog(store.root_path)}
    assert {k for k in before if before[k] != after[k]} == {("activations", 6, "s0")}


def test_the_index_sorts_by_feature_so_a_feature_filter_prunes(store):
    sql.query(store, QUERY)
    con = duckdb.connect(str(store.home / spec.SQL_INDEX_DIR / "layer_6" / "s0.duckdb"),
                         read_only=True)  # fmt: skip
    features = con.sql("SELECT feature FROM activations").fetchnumpy()["feature"]
    assert np.all(np.diff(features) >= 0)
    con.close()


def test_a_build_waits_for_another_process_building_the_same_file(store, monkeypatch):
    monkeypatch.setattr(sqlindex, "LOCK_TIMEOUT", 0.2)
    group = next(g for g in catalog(store.root_path) if g.kind == "activations")
    with store.lock(f"{spec.SQL_INDEX_DIR}/layer_{group.layer}/{group.shard}"):
        t0 = time.monotonic()
        with pytest.raises(FeatstoreError, match="being written by another process"):
            sqlindex.build(store, group, "1GB")
        assert time.monotonic() - t0 >= 0.2


def test_an_index_folder_linked_outside_the_home_is_refused(store, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.home / spec.SQL_INDEX_DIR).mkdir()
    (store.home / spec.SQL_INDEX_DIR / "layer_6").symlink_to(outside)
    status, _, err = cli(capsys, store.home, "sql", "SELECT count(*) FROM activations")
    assert status == 2 and err.count("\n") == 1 and "layer_6" in err
    assert list(outside.iterdir()) == []


def test_a_store_at_a_url_is_indexed_in_the_home_and_follows_new_generations(s3, tmp_path):
    from helpers import token_frame

    from featstore.store.home import open_store

    writer = open_store(tmp_path / "writer", create=True, url=s3.url())
    writer.write_tokens("s0", token_frame(60))
    query = "SELECT row, feature, value FROM activations ORDER BY ALL"
    for seed in (1, 2):  # the second write commits a new generation with the same shape
        matrix = sparse_acts(60, 16, 0.2, seed=seed)
        writer.write_activations(6, "s0", matrix)
        with sql.connect(tmp_path / "reader", url=s3.url()) as con:
            got = con.query(query)
        coo = matrix.tocoo()
        expect = pl.DataFrame({"row": coo.row.astype(np.int32), "feature": coo.col.astype(np.int32),
                               "value": coo.data})  # fmt: skip
        assert got.equals(expect.sort(pl.all()))
    assert (tmp_path / "reader" / spec.SQL_INDEX_DIR / "layer_6" / "s0.duckdb").is_file()


def test_a_full_disk_while_indexing_is_one_line_and_leaves_no_file(store, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sqlindex, "_fsync", full)
    status, _, err = cli(capsys, store.home, "sql", "SELECT count(*) FROM activations")
    assert status == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not list((store.home / spec.SQL_INDEX_DIR).rglob("*.duckdb*"))


def test_one_group_restamped_equals_its_stamp_in_the_catalog(store):
    from featstore.store.sqlcatalog import restamp

    groups = catalog(store.root_path)
    assert len(groups) == 3 and [restamp(store, g) for g in groups] == groups
