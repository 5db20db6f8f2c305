"""The SQL index: a columnar copy of each (layer, shard) group and each token table, derived
from the store and kept exactly in step with it.

One DuckDB database file per group, under `{home}/sql_index/`:

- `layer_{L}/{shard}.duckdb`: table `activations(row, feature, value, seq, pos, token)`, one row
  per nonzero, sorted by (feature, row), so DuckDB's per-row-group min/max lets a filter on
  `feature` read only the row groups that hold it;
- `tokens/{shard}.duckdb`: table `tokens(row, seq, pos, token, text)`;
- both with a table `meta(key, value)`: `index-version`, `stamp` (the store group's stamp,
  `featstore.store.sqlcatalog`), `rows`.

A file is built from the store's reading API (`Store.read`, `Store.tokens`, `Store.vocab`)
under the group's lock, written aside (`.{name}.{pid}-{hex}.tmp`) and renamed into place, so no
half-written index is ever visible; a killed build leaves only a temporary file, removed by the
next build of that group. Before a query, every file's meta and schema are checked against the
store's current stamps (one query); a missing, stale, corrupt or crafted-looking one is rebuilt.
`featstore check` compares every index file's rows with the store (`check_index`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.snapshot import SnapshotChanged
from featstore.store.sqlcatalog import Group, restamp, store_catalog

if TYPE_CHECKING:
    import pyarrow as pa

    from featstore.store.local import Store

INDEX_VERSION = "1"
COLUMNS = {
    "activations": {"row": "INTEGER", "feature": "INTEGER", "value": "FLOAT", "seq": "INTEGER",
                    "pos": "INTEGER", "token": "INTEGER"},
    "tokens": {"row": "INTEGER", "seq": "INTEGER", "pos": "INTEGER", "token": "INTEGER",
               "text": "VARCHAR"},
}  # fmt: skip
META = {"key": "VARCHAR", "value": "VARCHAR"}
LOCK_TIMEOUT = 600.0  # s: how long a query waits for another process building the same file


def index_dir(home: Path) -> Path:
    return home / spec.SQL_INDEX_DIR


def index_file(home: Path, group: Group) -> Path:
    folder = "tokens" if group.kind == "tokens" else f"layer_{group.layer}"
    return index_dir(home) / folder / f"{group.shard}.duckdb"


def _own(home: Path, file: Path) -> bool:
    """Whether the folder of `file` is the index's own, inside the home (a link planted there
    would make featstore read or write elsewhere)."""
    try:
        return file.parent.resolve() == home.resolve() / spec.SQL_INDEX_DIR / file.parent.name
    except OSError:
        return False


def _make_room(home: Path, file: Path) -> None:
    """The index folder made, and whatever is in the file's place removed (a folder, a link)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if not _own(home, file):
        raise FeatstoreError(
            f"{file.parent} is not a plain folder inside {home}: featstore keeps its SQL index "
            "only there (remove the link)"
        )
    if file.is_dir() and not file.is_symlink():
        shutil.rmtree(file)
    elif file.is_symlink():
        file.unlink()


def alias(group: Group) -> str:
    """The attached database's name, quoted (shard names hold no quotes: spec.SHARD_NAME)."""
    where = "tokens" if group.kind == "tokens" else f"layer_{group.layer}"
    return f'"{where}/{group.shard}"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def attach(con: duckdb.DuckDBPyConnection, home: Path, groups: list[Group]) -> list[Group]:
    """Attach every group's index file read-only; the groups whose file is missing or bad."""
    bad, attached = [], []
    for group in groups:
        file = index_file(home, group)
        if not _own(home, file) or file.is_symlink() or not file.is_file():
            bad.append(group)
            continue
        try:
            con.execute(f"ATTACH {literal(str(file))} AS {alias(group)} (READ_ONLY)")
            attached.append(group)
        except duckdb.Error:  # not a DuckDB file, damaged, or written by another version
            bad.append(group)
    ok = _valid(con, attached)
    for group in attached:
        if group not in ok:
            con.execute(f"DETACH {alias(group)}")
            bad.append(group)
    return bad


def _valid(con: duckdb.DuckDBPyConnection, groups: list[Group]) -> set[Group]:
    """The attached groups whose schema is exactly the index's and whose meta matches the store."""
    if not groups:
        return set()
    names = {alias(g).strip('"'): g for g in groups}
    columns: dict[tuple[str, str], dict[str, str]] = {}
    for db, table, column, kind in con.execute(
        "SELECT database_name, table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name IN (SELECT unnest(?::VARCHAR[])) ORDER BY column_index",
        [list(names)],
    ).fetchall():
        columns.setdefault((db, table), {})[column] = kind
    good = {
        n for n, g in names.items()
        if columns.get((n, g.kind)) == COLUMNS[g.kind] and columns.get((n, "meta")) == META
        and {k for k in columns if k[0] == n} == {(n, g.kind), (n, "meta")}
    }  # fmt: skip
    if not good:
        return set()
    metas = " UNION ALL ".join(
        f"SELECT {literal(n)} AS db, key, value FROM {alias(names[n])}.meta" for n in sorted(good)
    )
    found: dict[str, dict[str, str]] = {}
    for db, key, value in con.execute(metas).fetchall():
        found.setdefault(db, {})[key] = value
    return {names[n] for n in good if found.get(n) == _meta(names[n])}


def _meta(group: Group) -> dict[str, str]:
    return {"index-version": INDEX_VERSION, "stamp": group.stamp, "rows": str(group.rows)}


# -- building ------------------------------------------------------------------------------------


def build(store: Store, group: Group, memory_limit: str) -> Group:
    """(Re)build one group's index file under its lock; the group as indexed (stamp re-read)."""
    file = index_file(store.home, group)
    with store.lock(f"{spec.SQL_INDEX_DIR}/{file.parent.name}/{group.shard}", LOCK_TIMEOUT):
        _make_room(store.home, file)
        for leftover in file.parent.glob(f".{file.name}.*"):  # killed builds: no live writer
            leftover.unlink(missing_ok=True)
        for _ in range(3):
            group = _current(store, group)
            if _fresh(file, group):  # another process built it while we waited
                return group
            table = store.consistently(_table, store, group)  # tokens and layer of one commit
            _write(file, group, table, memory_limit, temp_dir(store.home))
            if _current(store, group) == group:  # the store did not change while we read it
                return group
    raise SnapshotChanged(f"{group.path} kept changing while it was indexed for SQL; try again")


def _current(store: Store, group: Group) -> Group:
    now = restamp(store, group)
    if now.problem is not None:
        raise FeatstoreError(now.problem)
    return now


def _fresh(file: Path, group: Group) -> bool:
    if file.is_symlink() or not file.is_file():
        return False
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH {literal(str(file))} AS {alias(group)} (READ_ONLY)")
        return bool(_valid(con, [group]))
    except duckdb.Error:
        return False
    finally:
        con.close()


def _table(store: Store, group: Group) -> pa.Table:
    """The rows of one group, read through the store's API (errors name the damaged file)."""
    import numpy as np
    import pyarrow as pa

    tokens = store.tokens(group.shard)
    cols = {c: tokens[c].to_numpy().astype(np.int32) for c in ("seq", "pos", "token")}
    if group.kind == "tokens":
        words = store.vocab()
        token = cols["token"]
        if words is None:
            text = pa.nulls(token.size, pa.string())
        else:  # ids outside the vocabulary (-1: unknown) get no text
            known = (token >= 0) & (token < len(words))
            text = pa.array(words, pa.string()).take(
                pa.array(np.where(known, token, 0), mask=~known)
            )
        row = np.arange(token.size, dtype=np.int32)
        return pa.table({"row": row, **cols, "text": text})
    matrix = store.read(group.layer, group.shard)
    if matrix.shape[0] != tokens.height:
        raise FeatstoreError(
            f"layer {group.layer} shard {group.shard}: {matrix.shape[0]} token rows, but its "
            f"token table has {tokens.height}"
        )
    row, feature, value = _by_feature(matrix)
    return pa.table({"row": row, "feature": feature, "value": value,
                     **{c: v[row] for c, v in cols.items()}})  # fmt: skip


def _by_feature(matrix: Any) -> tuple[Any, Any, Any]:
    """Token row, feature and value of every nonzero, sorted by (feature, row) (`Store.read`
    has checked the arrays)."""
    import numpy as np

    counts = np.diff(matrix.indptr)
    row = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    order = np.argsort(matrix.indices, kind="stable")  # rows stay ascending within a feature
    return row[order], matrix.indices[order].astype(np.int32), matrix.data[order].astype(np.float32)


def _write(file: Path, group: Group, table: pa.Table, memory_limit: str, spill: Path) -> None:
    """Write the index file aside, then rename it into place."""
    if table.num_rows != group.rows:
        raise FeatstoreError(
            f"{group.path}: {table.num_rows} rows read, attributes say {group.rows}"
        )
    tmp = file.parent / f".{file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    config = {"memory_limit": memory_limit, "temp_directory": str(spill)}
    try:
        con = duckdb.connect(str(tmp), config=config)
        try:
            con.from_arrow(table).create(group.kind)
            con.execute("CREATE TABLE meta (key VARCHAR, value VARCHAR)")
            con.executemany("INSERT INTO meta VALUES (?, ?)", list(_meta(group).items()))
            con.execute("CHECKPOINT")
        finally:
            con.close()
        _fsync(tmp)
        os.replace(tmp, file)
        _fsync(file.parent)
    finally:
        for left in (tmp, tmp.with_name(tmp.name + ".wal")):
            left.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(home: Path, make: bool = False) -> Path:
    """Where DuckDB spills: inside the store home, never the current directory. DuckDB makes only
    the last folder, so with `make` the index folder is made (a store whose index was never
    built, or a query that reads no activations); a link or file in its place is refused
    (spilling through it would write outside the home). A read-only home is left as it is: only
    a query that spills then fails, with DuckDB's own error."""
    folder = index_dir(home)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FeatstoreError(
            f"{folder} is not a plain folder inside {home}: featstore keeps its SQL index and "
            "spill files only there (remove it)"
        )
    if make and home.is_dir():
        with contextlib.suppress(OSError):
            folder.mkdir(exist_ok=True)
    return folder / ".tmp"


# -- checking ------------------------------------------------------------------------------------


def prune(home: Path, groups: list[Group]) -> None:
    """Delete the index files of groups that are gone (a deleted shard)."""
    keep = {index_file(home, g) for g in groups}
    base = index_dir(home)
    for file in base.glob("*/*.duckdb") if base.is_dir() else []:
        if file not in keep and _own(home, file) and not file.is_dir():
            file.unlink(missing_ok=True)


def check_index(store: Store) -> Iterator[str]:
    """Problems of the SQL index: fresh files whose rows differ from the store's (a stale or
    orphaned file is no problem: the next query rebuilds or deletes it)."""
    for group in store_catalog(store):
        file = index_file(store.home, group)
        if group.problem is None and _own(store.home, file) and _fresh(file, group):
            where = f"SQL index {file.relative_to(store.home)}"
            yield from _compare(store, group, file, where)


def _compare(store: Store, group: Group, file: Path, where: str) -> Iterator[str]:
    want = store.consistently(_table, store, group)
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH {literal(str(file))} AS i (READ_ONLY)")
        order = "feature, row" if group.kind == "activations" else "row"
        got = con.sql(f"SELECT * FROM i.{group.kind} ORDER BY {order}").arrow()
    except duckdb.Error as exc:
        yield f"{where}: unreadable ({' '.join(str(exc).split())})"
        return
    finally:
        con.close()
    if not _same(got, want):
        yield f"{where}: rows differ from {group.path} in the store (delete the file to rebuild)"


def _same(got: Any, want: pa.Table) -> bool:
    got = got.read_all() if hasattr(got, "read_all") else got
    return got.num_rows == want.num_rows and got.cast(want.schema).equals(want)
