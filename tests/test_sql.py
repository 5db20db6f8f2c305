"""`featstore sql`: read-only DuckDB views streaming from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.store import spec, sql
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


def test_where_layer_and_shard_read_only_that_group(store):
    damage_data(store, 7, "s0")  # reading layer 7 shard s0 fails
    got = sql.query(
        store, "SELECT count(*) AS n FROM activations WHERE layer = 6 AND shard = 's.1'"
    )
    assert got["n"][0] == store.read(6, "s.1").nnz
    with pytest.raises(FeatstoreError, match="layer 7 shard s0"):
        sql.query(store, "SELECT count(*) AS n FROM activations WHERE layer = 7")


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
    con = sql.connect(store).duckdb  # the raw connection, without the statement check
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
    from featstore.stats.query import PairQuery, pair_stats

    assert sql.query(store, "SELECT count(*) AS n FROM pair_stats")["n"][0] == 0
    frame = pair_stats(store, PairQuery(6, 7))
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


def damage_data(store: Store, layer: int, shard: str) -> None:
    """Truncate a chunk of a group's `data` behind featstore's back."""
    chunk = next((store.root_path / spec.activation_path(layer, shard) / "data").rglob("c/*"))
    chunk.write_bytes(chunk.read_bytes()[:5])


# -- the rules every query obeys (featstore.store.sqlguard) ---------------------------------------

FOREVER = (
    "SELECT count(*) FROM range(1000000000000) a, range(1000000000000) b WHERE a.range < b.range"
)


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("EXPLAIN ANALYZE SELECT count(*) FROM activations", id="explain analyze"),
        pytest.param("EXPLAIN ANALYSE SELECT 1", id="analyse"),
        pytest.param("EXPLAIN /* hidden */ ANALYZE SELECT 1", id="comment"),
        pytest.param("explain\n analyze select 1", id="lower case"),
        pytest.param("EXPLAIN (ANALYZE) SELECT 1", id="option"),
        pytest.param("EXPLAIN ANALYZE COPY (SELECT 1) TO '.tmp/x.csv'", id="copy inside"),
        pytest.param("EXPLAIN CREATE TABLE t AS SELECT 1", id="explain create"),
        pytest.param("EXPLAIN EXPLAIN ANALYZE SELECT 1", id="nested"),
        pytest.param("SET VARIABLE x = 1", id="variable"),
        pytest.param("CALL pragma_version()", id="call"),
        pytest.param("PREPARE p AS SELECT 1", id="prepare"),
        pytest.param('DETACH "layer_6/s0"', id="detach"),
    ],
)
def test_statements_that_execute_something_are_refused(store, tmp_path, statement, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = file_tree(store.home)
    with pytest.raises(FeatstoreError):
        sql.query(store, statement)
    assert file_tree(store.home) == before
    assert not (tmp_path / ".tmp").exists()


def test_plain_explain_runs(store):
    got = sql.query(store, "EXPLAIN SELECT count(*) FROM activations WHERE layer = 6")
    assert got.height >= 1


def test_a_query_past_its_time_limit_is_stopped_in_one_line(store, capsys):
    argv = ["--home", str(store.home), "sql", FOREVER, "--timeout", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "time limit of 0.5 s" in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--timeout", "-1"), ("--timeout", "nan"), ("--memory-limit", "lots"),
     ("--memory-limit", "1GB; SET x=1")],
)  # fmt: skip
def test_bad_limits_are_one_line(store, capsys, flag, value):
    assert main(["--home", str(store.home), "sql", "SELECT 1", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore: error: ") and err.count("\n") == 1


def test_memory_limit_is_applied_and_spills_stay_in_the_home(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with sql.connect(store.home, limits=sql.Limits(memory_limit="64MB")) as con:
        names = "('memory_limit', 'temp_directory')"
        query = f"SELECT name, value FROM duckdb_settings() WHERE name IN {names}"
        settings = dict(con.sql(query).fetchall())
        # A sort of 5M rows (~80 MB) under a 64 MB limit spills to the temporary folder.
        order = "ORDER BY range * 7 % 1000003"
        big = (
            f"SELECT sum(r) AS s FROM (SELECT row_number() OVER ({order}) AS r FROM range(5000000))"
        )
        assert con.query(big)["s"][0] == 5000000 * 5000001 // 2
    assert settings["memory_limit"] == "61.0 MiB"
    assert Path(settings["temp_directory"]).is_relative_to(store.home)
    assert not (tmp_path / ".tmp").exists()


def test_ctrl_c_stops_a_running_query(store, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "featstore.cli", "--home", str(store.home), "sql", FOREVER,
            "--timeout", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    time.sleep(5)  # started and running (it would run for hours)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "featstore: interrupted", err


HOSTILE_TEXT = ["\x1b[2J\x1b[31mred", "cr\rover", "bell\x07", "csi\x9b31m", "rtl\u202eevil",
                "nl\nline", "back\\slash", "tab\there", "ok"]  # fmt: skip


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_control_characters_in_token_text_are_escaped(tmp_path, capsys, fmt):
    import unicodedata

    store = build_store(tmp_path / "h", {6: {"s0": sparse_acts(9, 4)}}, vocab=HOSTILE_TEXT * 5)
    query = "SELECT token, text FROM tokens ORDER BY row"
    assert main(["--home", str(store.home), "sql", query, "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == {"table": 9 + 5, "csv": 9 + 1, "json": 1}[fmt]
    if fmt == "json":
        tokens = store.tokens("s0")["token"].to_list()
        assert json.loads(out) == [{"token": t, "text": HOSTILE_TEXT[t % 9]} for t in tokens]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        pytest.param("passwd", b"root:x:0:0:secret-hash:/root:/bin/bash\n", ["not a .sql file"],
                     id="not sql"),
        pytest.param("bin.sql", bytes(range(256)), ["not UTF-8"], id="binary"),
        pytest.param("nul.sql", b"SELECT 1\x00", ["binary"], id="nul"),
        pytest.param("big.sql", b"-- " + b"x" * (1 << 21), ["larger than"], id="huge"),
    ],
)  # fmt: skip
def test_query_files_are_never_echoed(store, tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["--home", str(store.home), "sql", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore: error: ") and err.count("\n") == 1
    assert "secret" not in err and "root:x" not in err and all(w in err for w in words)


def test_etc_passwd_is_not_echoed(store, capsys):
    assert main(["--home", str(store.home), "sql", "--file", "/etc/passwd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "root" not in err


def test_notebook_connection_gives_arrow_polars_pandas_and_the_same_rules(store):
    import featstore

    with featstore.connect(store.home) as con:
        rel = con.sql("SELECT layer, count(*) AS n FROM activations GROUP BY layer ORDER BY layer")
        want = [sum(store.info(layer, s)["nnz"] for s in store.shards(layer)) for layer in (6, 7)]
        assert rel.arrow().read_all().column("n").to_pylist() == want
        assert rel.pl()["n"].to_list() == want
        assert rel.df()["n"].tolist() == want
        assert con.query("SELECT count(*) AS n FROM tokens")["n"][0] == 85
        with pytest.raises(FeatstoreError, match="read-only"):
            con.sql("CREATE TABLE t AS SELECT 1")
        with pytest.raises(duckdb.Error):
            con.duckdb.execute("COPY (SELECT 1) TO 'x.csv'")
        with pytest.raises(duckdb.Error):
            con.duckdb.execute("SET memory_limit = '100GB'")


def test_select_1_imports_nothing_heavy(store):
    code = (
        "import sys; from featstore.cli import main; "
        f"main(['--home', {str(store.home)!r}, 'sql', 'select 1']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'zarr', 'polars', 'pyarrow', "
        "'torch', 'dagster', 'numba', 'scipy', 'pandas', 'transformer_lens', 'sae_lens'}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
