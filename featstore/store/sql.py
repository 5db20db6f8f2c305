"""Read-only DuckDB over a store: `featstore sql` and `featstore.connect(home)`.

Views:
- `activations(layer, shard, seq, pos, token, feature, value, row)`: one row per nonzero;
- `tokens(shard, seq, pos, token, text, row)`: one row per token, `text` from the vocabulary;
- `pair_stats(layer_a, layer_b, feature_a, ...)`: the merged pair statistics in
  `{home}/pair_stats/`; `causal_edges(layer_a, feature_a, layer_b, feature_b, ...)`:
  `{home}/causal/causal_edges.parquet`; `logit_effects(layer, feature, kind, ...)`:
  `{home}/logits/logit_effects.parquet`; `findings(conjecture, statistic, ...)`:
  `{home}/findings/findings.parquet` (`featstore.store.sqlfiles`; each empty when absent).

`activations` and `tokens` read the SQL index (`featstore.store.sqlindex`: a DuckDB file per
group, sorted by feature), brought in step with the store before every query. Each group is a
UNION ALL branch with constant `layer` and `shard` columns, so `WHERE layer = ...` drops the
other groups before anything is read. A group that cannot be indexed (a damaged store) becomes
a branch that fails with the store's one-line error when, and only when, a query reads it.

Safety (`featstore.store.sqlguard`): only one SELECT or plain EXPLAIN runs; the index files are
attached read-only and DuckDB's file access is then switched off (no COPY, ATTACH, read_csv,
INSTALL, ...) and its configuration locked; a memory limit; temporary files in the home; a time
limit and Ctrl-C stop a query.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from featstore.errors import FeatstoreError
from featstore.store import spec, sqlcatalog, sqlindex
from featstore.store.sqlcatalog import Group
from featstore.store.sqlguard import Limits, check_read_only, one_line, run_interruptible

if TYPE_CHECKING:
    import polars as pl

    from featstore.store.local import Store

# The named queries: the repo's top-level sql/, carried in the package as featstore/_data/sql.
SQL_DIR = Path(str(resources.files("featstore") / "_data" / "sql"))
INDEXED = ("activations", "tokens")  # from the SQL index
FILES = ("pair_stats", "causal_edges", "logit_effects", "findings")  # sqlfiles.TABLES
VIEWS = INDEXED + FILES
Params = Mapping[str, Any] | Sequence[Any] | None


def __getattr__(name: str) -> Any:  # the Parquet tables' schemas, without importing pyarrow early
    if name.endswith("_SCHEMA") or name == "pair_stats_files":
        from featstore.store import sqlfiles

        return getattr(sqlfiles, name)
    raise AttributeError(name)


class Connection:
    """A read-only DuckDB connection over a store's views.

    `sql(query)` checks the query and returns a lazy DuckDB relation (`.arrow()`, `.pl()`,
    `.df()`, `.fetchall()`); `query(query)` runs it under the time limit and Ctrl-C and returns
    a polars frame. `duckdb` is the underlying connection: its files are read-only and its file
    access is off, but the one-statement rule applies only through `sql` and `query`.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, limits: Limits) -> None:
        self.duckdb, self.limits = con, limits

    def sql(self, query: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        check_read_only(query, self.duckdb)
        return self.duckdb.sql(query, params=params)

    def query(self, query: str, params: Params = None) -> pl.DataFrame:
        return self.run(query, params, lambda rel: rel.pl())

    def run(self, query: str, params: Params, fetch: Any) -> Any:
        """`fetch(relation)` of a checked query, interruptible; errors in one line."""
        check_read_only(query, self.duckdb)

        def work() -> Any:
            rel = self.duckdb.sql(query, params=params)
            return None if rel is None else fetch(rel)

        try:
            return run_interruptible(self.duckdb, work, self.limits)
        except duckdb.Error as exc:
            raise FeatstoreError(one_line(exc).removeprefix("Invalid Input Error: ")) from None

    def cursor(self) -> Connection:
        """Another connection to the same views, for another thread."""
        return Connection(self.duckdb.cursor(), self.limits)

    def close(self) -> None:
        self.duckdb.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    home: Path | str | Store | None = None,
    *,
    limits: Limits | None = None,
    url: str | None = None,
    views: Sequence[str] = VIEWS,
    check: str | None = None,
) -> Connection:
    """A read-only connection over the store at `home` (a path, an open `Store`, or None for
    `$FEATSTORE_HOME`); `url`: the Zarr hierarchy at an fsspec URL. Only the `views` named are
    created (all by default). `check`: a query to refuse, if it must be, before the store is
    read."""
    limits = limits or Limits()
    source = _Source.of(home, url)
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "memory_limit": limits.memory_limit,
            "temp_directory": str(sqlindex.temp_dir(source.home)),
        }
    )
    try:
        if check is not None:
            check_read_only(check, con)
        sqlindex.temp_dir(source.home, make=True)  # a query may spill (nothing made if refused)
        if not source.plain():
            source.store()  # a store that needs recovery, or one featstore cannot read
        if {"activations", "tokens"} & set(views):
            _index_views(con, source, limits, set(views))
        if set(FILES) & set(views):
            from featstore.store import sqlfiles

            sqlfiles.add_views(con, source.home, set(views))
        con.execute("SET enable_external_access = false")  # after the index files are attached
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return Connection(con, limits)


class _Source:
    """Where the store is, opened (zarr imported) only when a group must be indexed."""

    def __init__(self, home: Path, url: str | None, store: Store | None) -> None:
        self.home, self.url, self._store = home, url, store

    @staticmethod
    def of(home: Path | str | Store | None, url: str | None) -> _Source:
        if home is None:
            from featstore.store.home import default_home

            home = default_home()
        if isinstance(home, str | Path):
            url = url or os.environ.get(spec.STORE_URL_ENV) or None
            return _Source(Path(home).absolute(), url, None)
        return _Source(Path(home.home).absolute(), None, home)

    def store(self) -> Store:
        if self._store is None:
            from featstore.store.home import open_store

            self._store = open_store(self.home, url=self.url)
        return self._store

    def plain(self) -> bool:
        """Whether the store is a local folder that needs no recovery: then it is listed from
        its files alone (else it is opened, which recovers it or reports what is wrong)."""
        root = self.home / spec.ROOT
        return self._store is None and self.url is None and sqlcatalog.plain(root)

    def groups(self) -> list[Group]:
        """The groups to index, with their stamps."""
        if self.plain():
            return sqlcatalog.catalog(self.home / spec.ROOT)
        return sqlcatalog.store_catalog(self.store())


def _index_views(
    con: duckdb.DuckDBPyConnection, source: _Source, limits: Limits, views: set[str]
) -> None:
    from featstore.store.snapshot import SnapshotChanged, retrying

    def detach(groups: list[Group]) -> None:
        for g in groups:
            con.execute(f"DETACH DATABASE IF EXISTS {sqlindex.alias(g)}")

    def attached() -> tuple[list[Group], dict[Group, str | None]]:
        """Index files of one state of the store attached: a commit landing while they are
        built means listing again (else two layers of a shard could be of two commits)."""
        groups = source.groups()
        sqlindex.prune(source.home, groups)
        wanted = [g for g in groups if g.kind in views]
        failed = {g: g.problem for g in wanted if g.problem is not None}
        readable = [g for g in wanted if g.problem is None]
        for group in sqlindex.attach(con, source.home, readable):  # missing, stale or bad
            try:
                built = sqlindex.build(source.store(), group, limits.memory_limit)
            except SnapshotChanged:  # list again (below)
                detach(readable)
                raise
            except FeatstoreError as exc:  # a damaged group: fails the queries that read it
                failed[group] = str(exc)
                continue
            except OSError as exc:  # a read-only home, a full disk: no query can be answered
                where = sqlindex.index_dir(source.home)
                raise FeatstoreError(f"cannot write the SQL index in {where}: {exc}") from None
            if built.stamp != group.stamp:  # committed since it was listed
                detach(readable)
                raise SnapshotChanged(f"{group.path} changed while the SQL index was built")
            if sqlindex.attach(con, source.home, [built]):
                failed[group] = f"{group.path}: its SQL index in {source.home} cannot be read"
        return wanted, failed

    wanted, failed = retrying(attached, str(source.home))
    for kind in ("activations", "tokens"):
        if kind in views:
            branches = [_branch(g, failed.get(g)) for g in wanted if g.kind == kind]
            con.execute(f"CREATE VIEW {kind} AS {_union(branches) or _empty(kind)}")


def _columns(kind: str) -> dict[str, str]:
    """A view's columns and their SQL types, in order."""
    keys = (
        {"layer": "INTEGER", "shard": "VARCHAR"} if kind == "activations" else {"shard": "VARCHAR"}
    )
    return keys | {c: sqlindex.COLUMNS[kind][c] for c in _OUT[kind]}


def _empty(kind: str) -> str:
    return (
        "SELECT "
        + ", ".join(f"NULL::{t} AS {c}" for c, t in _columns(kind).items())
        + " WHERE false"
    )


_OUT = {
    "activations": ["seq", "pos", "token", "feature", "value", "row"],
    "tokens": ["seq", "pos", "token", "text", "row"],
}


def _branch(group: Group, failure: str | None) -> str:
    """One group's rows, or (`failure`) a branch that raises it whenever a query reads it."""
    keys = f"{group.layer}::INTEGER AS layer, " if group.kind == "activations" else ""
    keys += f"{sqlindex.literal(group.shard)} AS shard"
    if failure is None:
        columns = ", ".join(_OUT[group.kind])
        return f"SELECT {keys}, {columns} FROM {sqlindex.alias(group)}.{group.kind}"
    types = sqlindex.COLUMNS[group.kind]
    fail = f"error({sqlindex.literal(failure)})"
    # Every column raises too: a constant NULL column would let a filter on it (`feature = 2`)
    # fold the branch away unread, and the damaged group would read as holding no such rows.
    raising = ", ".join(f"{fail}::{types[c]} AS {c}" for c in _OUT[group.kind])
    return f"SELECT {keys}, {raising} FROM range(1) WHERE {fail} IS NULL"


def _union(branches: list[str]) -> str:
    """UNION ALL as a balanced tree, so many groups do not nest the query deeply."""
    while len(branches) > 1:
        pairs = [
            f"({a}) UNION ALL ({b})" for a, b in zip(branches[::2], branches[1::2], strict=False)
        ]
        branches = pairs + ([branches[-1]] if len(branches) % 2 else [])
    return branches[0] if branches else ""


def mentioned(query: str) -> list[str]:
    """The views a query may read: those whose name appears in its text (a superset)."""
    low = query.lower()
    return [v for v in VIEWS if v in low]


def rows(
    home: Path | str | Store | None,
    sql: str,
    params: Params = None,
    limits: Limits | None = None,
    url: str | None = None,
) -> tuple[list[str], list[tuple], list[bool]]:
    """A query's column names, rows (Python values) and which columns are FLOAT (single
    precision); no polars or pyarrow import, for the command line."""

    def fetch(rel: duckdb.DuckDBPyRelation) -> tuple[list[str], list[tuple], list[bool]]:
        return list(rel.columns), rel.fetchall(), [str(t) == "FLOAT" for t in rel.types]

    with connect(home, limits=limits, url=url, views=mentioned(sql), check=sql) as con:
        return con.run(sql, params, fetch)


def query(
    store: Store | Path | str, sql: str, params: Params = None, limits: Limits | None = None
) -> pl.DataFrame:
    """Run one read-only query over the store; DuckDB errors come back as a one-line error."""
    with connect(store, limits=limits, views=mentioned(sql), check=sql) as con:
        return con.query(sql, params)


def token_slice(store: Store, shard: str, start: int, stop: int) -> dict[str, Any]:
    """Columns seq, pos, token (int32 numpy arrays) of token rows [start, stop) of a shard."""
    import numpy as np

    what = f"token table of shard {shard}"
    group = store.group(spec.tokens_path(shard), what)
    return {
        c: np.asarray(store.read_array(group, c, what, slice(start, stop)), dtype=np.int32)
        for c in ("seq", "pos", "token")
    }


def named_query(name: str) -> str:
    """The text of `sql/{name}.sql`."""
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        known = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
        raise FeatstoreError(f"no query {name!r} in {SQL_DIR} (known: {', '.join(known)})")
    return path.read_text()


def query_text(file: str) -> str:
    """The text of a query file: a `.sql` path, else the name of one in `sql/`."""
    from featstore.store.sqlguard import read_query_file

    path = Path(file)
    if path.exists() or path.is_symlink():
        return read_query_file(path)
    return named_query(path.name.removesuffix(".sql"))
