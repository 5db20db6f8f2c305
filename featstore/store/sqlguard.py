"""The rules every SQL query over a store obeys: one plain read-only statement, limits on time
and memory, stopped by Ctrl-C, and query files that are never echoed.

Imports only duckdb and the standard library, so `featstore sql "select 1"` starts fast.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from featstore.errors import FeatstoreError

T = TypeVar("T")

DEFAULT_TIMEOUT = 300.0  # s: a query running longer is stopped (`--timeout`, `Limits`)
DEFAULT_MEMORY_LIMIT = "4GB"  # DuckDB's memory_limit: beyond it a query spills or fails
MAX_QUERY_FILE = 1 << 20  # bytes: a query file larger than this is refused unread
POLL = 0.05  # s between looks at a running query's clock and at Ctrl-C
MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """How long a query may run (seconds; None: no limit) and DuckDB's memory limit."""

    timeout: float | None = DEFAULT_TIMEOUT
    memory_limit: str = DEFAULT_MEMORY_LIMIT

    def __post_init__(self) -> None:
        t = self.timeout
        if t is not None and not (isinstance(t, int | float) and 0 < t < float("inf")):
            raise FeatstoreError(f"bad query timeout {t!r}: expected seconds > 0")
        if not isinstance(self.memory_limit, str) or not MEMORY.match(self.memory_limit):
            raise FeatstoreError(
                f"bad memory limit {self.memory_limit!r}: expected a size such as 4GB or 512MB"
            )


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def without_context(message: str) -> str:
    """A DuckDB error without the `LINE n: <query text>` excerpt it appends."""
    return one_line(message.split("\nLINE ")[0])


def check_read_only(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Refuse anything but one SELECT, or a plain EXPLAIN of one (EXPLAIN ANALYZE runs it).
    `con` parses it (duckdb's module-level parser would open a connection of its own)."""
    try:
        statements = (con or duckdb).extract_statements(sql)
    except duckdb.Error as exc:
        raise FeatstoreError(without_context(str(exc))) from None
    if len(statements) != 1:
        raise FeatstoreError(f"expected one SQL statement, got {len(statements)}")
    _check_statement(statements[0], con)


def _check_statement(statement: duckdb.Statement, con: duckdb.DuckDBPyConnection | None) -> None:
    kind = statement.type
    if kind == duckdb.StatementType.SELECT:
        return
    if kind != duckdb.StatementType.EXPLAIN:
        raise FeatstoreError(f"the store is read-only: {kind.name} statements are refused")
    inner = _after_first_word(statement.query)
    if re.match(r"\s*(ANALY[SZ]E|\()", inner, re.IGNORECASE):
        raise FeatstoreError(
            "EXPLAIN ANALYZE and EXPLAIN options run or change the statement: refused "
            "(plain EXPLAIN SELECT ... is allowed)"
        )
    try:
        check_read_only(inner, con)
    except FeatstoreError as exc:
        raise FeatstoreError(f"EXPLAIN: {exc}") from None


def _after_first_word(sql: str) -> str:
    """The text after the first keyword (comments skipped), e.g. the statement of an EXPLAIN."""
    words = [start for start, kind in duckdb.tokenize(sql) if kind != duckdb.token_type.comment]
    return sql[words[1] :] if len(words) > 1 else ""


def run_interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], T], limits: Limits) -> T:
    """`work()` (a query and its fetch) under the time limit; Ctrl-C becomes KeyboardInterrupt.

    DuckDB stops a query on SIGINT itself when it runs in the main thread (within a vector of
    rows); at the time limit a watcher thread calls `con.interrupt()`, again every `POLL`
    seconds in case the query had not yet started.
    """
    stop, late = threading.Event(), threading.Event()

    def watch() -> None:
        if limits.timeout is None or stop.wait(limits.timeout):
            return
        late.set()
        con.interrupt()
        while not stop.wait(POLL):
            con.interrupt()

    watcher = threading.Thread(target=watch, name="featstore-sql-clock", daemon=True)
    watcher.start()
    try:
        return work()
    except duckdb.InterruptException:
        if late.is_set():
            raise FeatstoreError(
                f"query stopped at its time limit of {limits.timeout:g} s "
                "(set another with --timeout SECONDS)"
            ) from None
        raise
    except RuntimeError as exc:  # how DuckDB reports the SIGINT it caught
        if "interrupted" in str(exc).lower():
            raise KeyboardInterrupt from None
        raise
    finally:
        stop.set()
        watcher.join()


def read_query_file(path: Path) -> str:
    """A query file's text: a regular `.sql` file of UTF-8 text, never echoed in an error."""
    if path.suffix != ".sql":
        raise FeatstoreError(f"query file {path}: not a .sql file")
    try:
        if not path.is_file():
            raise FeatstoreError(f"query file {path}: not a regular file")
        if path.stat().st_size > MAX_QUERY_FILE:
            raise FeatstoreError(f"query file {path}: larger than {MAX_QUERY_FILE} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise FeatstoreError(f"query file {path}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FeatstoreError(f"query file {path}: not UTF-8 text") from None
    if "\x00" in text:
        raise FeatstoreError(f"query file {path}: binary (holds NUL bytes)")
    return text
