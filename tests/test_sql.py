"""`featstore sql`: read-only DuckDB views streaming from the store."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.store import sql
from featstore.store.local import Store

VOCAB = [f"tok{i}" for i in range(40)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    acts = {
        6: {"s0": sparse_acts(60, 16, 0.2, seed=1), "s.1": sparse_acts(25, 16, 0.2, seed=2)},
        7: {"s0": sparse_acts(60, 24, 0.2, seed=3), "s.1": sparse_acts(25, 24, 0.2, seed=4)},
    }
    return build_store(tmp_path / "home", acts, vocab=VOCAB)


def expected_rows(store: Store, layer: int) -> pl.DataFrame:
    """activations rows of one layer rebuilt from store.read and store.tokens."""
    frames = []
    for shard in store.shards(layer):
        coo = store.read(layer, shard).tocoo()
        toks = store.tokens(shard)[coo.row]
        frames.append(
            toks.select("seq", "pos", "token").with_columns(
                shard=pl.lit(shard),
                feature=pl.Series(coo.col, dtype=pl.Int32),
                value=pl.Series(coo.data, dtype=pl.Float32),
            )
        )
    cols = ["shard", "seq", "pos", "token", "feature", "value"]
    return pl.concat(frames).select(cols).sort(cols)


def file_tree(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*")}


def test_count_per_layer_equals_stored_nnz(store):
    for layer in store.layers():
        got = sql.query(store, "SELECT count(*) AS n FROM activations WHERE layer = ?", [layer])
        assert got["n"][0] == sum(store.info(layer, s)["nnz"] for s in store.shards(layer))


def test_rows_match_store_read_exactly(store):
    got = sql.query(
        store,
        "SELECT shard, seq, pos, token, feature, value FROM activations WHERE layer = 7 "
        "ORDER BY ALL",
    )
    assert got.equals(expected_rows(store, 7))


def test_tokens_text_is_the_decoded_vocab(store):
    got = sql.query(store, "SELECT shard, token, text FROM tokens ORDER BY shard, seq, pos")
    want = pl.concat([store.tokens(s) for s in sorted(store.token_shards())])
    assert got["token"].to_list() == want["token"].to_list()
    assert got["text"].to_list() == [VOCAB[t] for t in want["token"]]


def test_tokens_text_is_null_without_vocab(tmp_path):
    store = build_store(tmp_path, {6: {"s0": sparse_acts(10, 4)}})
    got = sql.query(store, "SELECT count(*) AS n, count(text) AS with_text FROM tokens")
    assert got.row(0) == (10, 0)


def test_where_layer_reads_only_that_layers_blocks(store, monkeypatch):
    read = []
    original = store.iter_blocks

    def spy(layer, shard, block_tokens):
        read.append((layer, shard))
        return original(layer, shard, block_tokens)

    monkeypatch.setattr(store, "iter_blocks", spy)
    sql.query(store, "SELECT count(*) FROM activations WHERE layer = 6 AND shard = 's.1'")
    assert read == [(6, "s.1")]


def test_self_join_counts_co_active_pairs(store):
    got = sql.query(
        store,
        "SELECT count(*) AS n FROM activations a JOIN activations b "
        "ON a.shard = b.shard AND a.seq = b.seq AND a.pos = b.pos "
        "WHERE a.layer = 6 AND b.layer = 7",
    )
    want = 0
    for shard in store.shards(6):
        a, b = (store.read(layer, shard) for layer in (6, 7))
        want += int((np.diff(a.indptr) * np.diff(b.indptr)).sum())
    assert got["n"][0] == want


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("CREATE TABLE t AS SELECT 1", id="create"),
        pytest.param("COPY (SELECT 1) TO 'out.csv'", id="copy"),
        pytest.param("INSERT INTO activations VALUES (1)", id="insert"),
        pytest.param("ATTACH 'other.db'", id="attach"),
        pytest.param("SELECT 1; DROP VIEW activations", id="two statements"),
    ],
)
def test_writes_are_refused_and_store_unchanged(store, statement):
    before = file_tree(store.home)
    with pytest.raises(FeatstoreError):
        sql.query(store, statement)
    assert file_tree(store.home) == before


def test_connection_can_touch_no_file(store, tmp_path):
    con = sql.connect(store)
    target = tmp_path / "leak.csv"
    for statement in (
        f"COPY (SELECT * FROM activations) TO '{target}'",
        f"SELECT * FROM read_parquet('{store.root_path}/**')",
        "SET enable_external_access = true",
    ):
        with pytest.raises(duckdb.Error):
            con.execute(statement)
    assert not target.exists()


def test_pair_stats_table_reads_saved_results(store):
    from featstore.stats.query import pair_stats

    assert sql.query(store, "SELECT count(*) AS n FROM pair_stats")["n"][0] == 0
    frame = pair_stats(store, 6, 7)
    got = sql.query(store, "SELECT * EXCLUDE (layer_a, layer_b) FROM pair_stats ORDER BY ALL")
    assert got.equals(frame.sort(frame.columns))


def test_cli_formats_parse_back(store, capsys):
    query = "SELECT layer, count(*) AS n FROM activations GROUP BY layer ORDER BY layer"
    want = [
        {"layer": layer, "n": sum(store.info(layer, s)["nnz"] for s in store.shards(layer))}
        for layer in (6, 7)
    ]
    assert main(["--home", str(store.home), "sql", query, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert main(["--home", str(store.home), "sql", query, "--format", "csv"]) == 0
    assert pl.read_csv(capsys.readouterr().out.encode()).to_dicts() == want


def test_cli_named_file_with_params(store, capsys):
    argv = ["--home", str(store.home), "sql", "--file", "sql/top_features.sql", "-p", "top=2"]
    assert main([*argv, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for layer in (6, 7):
        counts = np.bincount(sp.vstack([store.read(layer, s) for s in store.shards(layer)]).indices)
        top = sorted(range(counts.size), key=lambda f: (-counts[f], f))[:2]
        assert [r["feature"] for r in rows if r["layer"] == layer] == top


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["SELEC 1"], id="syntax"),
        pytest.param(["SELECT nope FROM activations"], id="unknown column"),
        pytest.param(["CREATE TABLE t (x INT)"], id="write"),
        pytest.param(["--file", "no_such_query"], id="missing file"),
        pytest.param([], id="no query"),
    ],
)
def test_cli_bad_sql_exits_2_with_one_line(store, capsys, argv):
    assert main(["--home", str(store.home), "sql", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore: error: ") and err.count("\n") == 1


def test_feature_contexts_lists_the_strongest_hits_with_their_text(store):
    query = sql.query_text("feature_contexts")
    got = sql.query(store, query, {"layer": 6, "feature": 3, "top": 4})
    hits = []
    for shard in store.shards(6):
        column = store.read(6, shard)[:, 3].tocoo()
        toks = store.tokens(shard)
        hits += [
            (float(v), shard, toks.row(int(r), named=True))
            for r, v in zip(column.row, column.data, strict=True)
        ]
    hits.sort(key=lambda h: -h[0])
    assert got["value"].to_list() == pytest.approx([h[0] for h in hits[:4]])
    assert got["token_text"].to_list() == [VOCAB[h[2]["token"]] for h in hits[:4]]
    assert got["pos"].to_list() == [h[2]["pos"] for h in hits[:4]]
