"""The rules every SQL query over a store obeys: one plain read-only statement, limits on time
and memory, stopped by Ctrl-C, and query files that are never echoed.

Imports only duckdb and the standard library, so `featstore sql "select 1"` starts fast.
"""

from __future__ import annotations

import re
import threading
import time
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

    The work runs in a thread of its own while this one waits: Python delivers SIGINT only to
    the main thread, between bytecodes, never while it is blocked inside DuckDB's C code (this
    DuckDB does not stop a running query on SIGINT by itself: measured, a cross join ran on for
    minutes). The waiting thread turns Ctrl-C, and the time limit, into `con.interrupt()`,
    repeated every `POLL` seconds until the query has stopped (it stops within a vector of rows).
    """
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    deadline = None if limits.timeout is None else time.monotonic() + limits.timeout
    late = False
    threading.Thread(target=run, name="featstore-sql-query", daemon=True).start()
    try:
        while not done.wait(POLL):
            if deadline is not None and time.monotonic() >= deadline:
                late = True
                con.interrupt()
    except KeyboardInterrupt:
        while not done.wait(POLL):
            con.interrupt()
        raise KeyboardInterrupt from None
    error = box.get("error")
    if error is None:
        return box["value"]  # type: ignore[return-value]
    if isinstance(error, duckdb.InterruptException):
        if late:
            raise FeatstoreError(
                f"query stopped at its time limit of {limits.timeout:g} s "
                "(set another with --timeout SECONDS)"
            ) from None
        raise KeyboardInterrupt from None
    if isinstance(error, RuntimeError) and "interrupted" in str(error).lower():
        raise KeyboardInterrupt from None
    raise error


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
