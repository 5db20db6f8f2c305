"""`featstore sql` against DuckDB over a Parquet copy of the same rows, side by side.

    python bench/sql.py                       # 200,000 and 1,000,000 tokens
    python bench/sql.py --tokens 20000 --repeat 3

Data: a `featstore synth` store per size (24,576 features, L0 ~ 50, layer 6 alone), cached
under `bench/out/sql-{tokens}-{shards}/`, in `--shards` shards (default one per 250,000
tokens). The baseline is a Parquet copy of layer 6's rows (layer, shard, row, feature, value)
in the store's order (by token row), one file per shard written by pyarrow with its defaults,
read by a plain DuckDB connection with `read_parquet` (the issue's "DuckDB on the Parquet
copy").

Measured, in one process, one after the other, each the best of `--repeat` runs:
- `index`: building the SQL index of the store (first query after a change; once);
- `connect`: `featstore.store.sql.connect` with the index fresh (every query pays it);
- each query on an open connection: featstore's `activations` view vs the Parquet view
  (start-up excluded), and their ratio;
- `whole command`: `featstore sql ...` as a subprocess (Python start-up, imports, connect,
  query, printing), for `select 1` and for the top contexts of one feature
  (`sql/feature_contexts.sql`, 20 hits with their text).
Method and numbers: bench/RESULTS.md ("SQL").
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.sources.synth import SynthConfig, generate_all
from featstore.store import spec, sql
from featstore.store.home import open_store

OUT = Path(__file__).resolve().parent / "out"
FEATURE = 100
QUERIES = {
    "count(*) of layer 6": "SELECT count(*) FROM {t} WHERE layer = 6",
    "top 5 values of one feature": "SELECT row, value FROM {t} WHERE layer = 6 AND feature = "
    f"{FEATURE} ORDER BY value DESC LIMIT 5",
    "5 most frequent features": "SELECT feature, count(*) AS n FROM {t} WHERE layer = 6 "
    "GROUP BY feature ORDER BY n DESC, feature LIMIT 5",
    "scan: sum(value), max(row)": "SELECT sum(value), max(row) FROM {t} WHERE layer = 6",
    "filter: count where value > 1": "SELECT count(*) FROM {t} WHERE layer = 6 AND value > 1",
    "rows of 3 features": "SELECT count(*), sum(value) FROM {t} WHERE layer = 6 AND feature "
    "IN (7, 700, 7000)",
}


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal results; floats to 12 digits (sums in another order differ in the last bits)."""
    flat = [(x, y) for r, q in zip(a, b, strict=True) for x, y in zip(r, q, strict=True)]
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-12) if isinstance(x, float) else x == y for x, y in flat
    )


def best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_store(tokens: int, shards: int) -> Path:
    home = OUT / f"sql-{tokens}-{shards}"
    if not (home / "store.zarr" / "zarr.json").exists():
        store = open_store(home, create=True)
        cfg = SynthConfig(layers=(6,), n_tokens=tokens // shards)
        generate_all(store, cfg, shards, log=print)
    return home


def parquet_copy(home: Path) -> Path:
    folder = home / "parquet-copy"
    if folder.is_dir():
        return folder
    tmp = home / "parquet-copy.tmp"
    tmp.mkdir(exist_ok=True)
    store = open_store(home)
    for shard in store.shards(6):
        coo = store.read(6, shard).tocoo()
        table = pa.table({
            "layer": pa.array([6] * coo.nnz, pa.int32()), "shard": [shard] * coo.nnz,
            "row": coo.row.astype("int32"), "feature": coo.col.astype("int32"),
            "value": coo.data.astype("float32"),
        })  # fmt: skip
        pq.write_table(table, tmp / f"{shard}.parquet")
    tmp.rename(folder)
    return folder


def command(home: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "featstore.cli", "--home", str(home), "sql", *args],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    return time.perf_counter() - t0


def python(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def bench(tokens: int, shards: int, repeat: int) -> None:
    home = make_store(tokens, shards)
    copy = parquet_copy(home)
    shutil.rmtree(home / spec.SQL_INDEX_DIR, ignore_errors=True)  # built from scratch, timed
    index_time = best(lambda: sql.connect(home, views=["activations", "tokens"]).close(), 1)
    views = ["activations", "tokens"]  # as `featstore sql` over those views does
    connect_time = best(lambda: sql.connect(home, views=views).close(), repeat)
    con = sql.connect(home)
    base = duckdb.connect()
    base.execute(f"CREATE VIEW copy AS SELECT * FROM read_parquet('{copy}/*.parquet')")
    rows = con.sql("SELECT count(*) FROM activations WHERE layer = 6").fetchall()[0][0]
    print(f"\n{tokens:,} tokens x 24,576 features, {shards} shard(s), layer 6: {rows:,} rows")
    print(f"index build (first query after a change): {index_time:.2f} s; "
          f"connect with the index fresh: {connect_time * 1000:.0f} ms")  # fmt: skip
    print("| query | featstore sql (s) | DuckDB on Parquet (s) | ratio |\n|---|---:|---:|---:|")
    for name, text in QUERIES.items():
        ours = con.sql(text.format(t="activations")).fetchall()
        theirs = base.sql(text.format(t="copy")).fetchall()
        assert same(ours, theirs), (name, ours, theirs)
        t_ours = best(lambda t=text: con.sql(t.format(t="activations")).fetchall(), repeat)
        t_base = best(lambda t=text: base.sql(t.format(t="copy")).fetchall(), repeat)
        print(f"| {name} | {t_ours:.4f} | {t_base:.4f} | {t_ours / t_base:.2f} |")
    contexts = sql.named_query("feature_contexts")
    params = {"layer": 6, "feature": FEATURE, "top": 20}
    t_ctx = best(lambda: con.sql(contexts, params=params).fetchall(), repeat)
    print(f"| top 20 contexts of feature {FEATURE} with text (feature_contexts.sql) | "
          f"{t_ctx:.4f} | – | – |")  # fmt: skip
    con.close()
    one = min(command(home, "select 1") for _ in range(repeat))
    ctx = min(
        command(home, "--file", "feature_contexts", "-p", "layer=6", "-p", f"feature={FEATURE}",
                "-p", "top=20")
        for _ in range(repeat)
    )  # fmt: skip
    bare = min(python("pass") for _ in range(repeat))
    floor = min(python("import duckdb") for _ in range(repeat))
    print(f'whole command: `featstore sql "select 1"` {one:.2f} s, top 20 contexts {ctx:.2f} s; '
          f"bare python {bare:.2f} s, `python -c 'import duckdb'` {floor:.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--shards", type=int, nargs="+", default=None, help="per size")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shards = args.shards or [max(1, n // 250_000) for n in args.tokens]
    for tokens, k in zip(args.tokens, shards, strict=True):
        bench(tokens, k, args.repeat)


if __name__ == "__main__":
    main()
