"""Rendering a result for a terminal: an aligned table, CSV or JSON (ground floor).

Text from a store (token text, shard names) is hostile: control characters (terminal escape
sequences, carriage returns, bidirectional overrides) are shown escaped, never sent raw.
Imports only the standard library (polars only when given a polars frame), so `featstore sql`
starts fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    if ch in NAMED:
        return NAMED[ch]
    # Cc: C0/C1 controls and DEL; Cf: format characters (bidirectional overrides, ...).
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def escape(text: str) -> str:
    """Text safe for a terminal: backslash, control and format characters as `\\x..` escapes."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(ch) for ch in text)


def float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (as numpy prints it)."""
    if not math.isfinite(value):
        return str(value)
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            return text
    return repr(value)


def cell(value: Any, float32: bool = False) -> str:
    """One value as terminal-safe text."""
    if value is None:
        return "null"
    if isinstance(value, float) and float32:
        return float32_text(value)
    return escape(str(value))


def _plain(value: Any, float32: bool) -> Any:
    """A JSON value: numbers and booleans as they are, the rest as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return float(float32_text(value)) if float32 and math.isfinite(value) else value
    return str(value)


def render_rows(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    fmt: str = "table",
    float32: Sequence[bool] | None = None,
) -> str:
    """Rows as an aligned table (all of them), CSV with a header, or a JSON array of objects.

    `float32` marks columns whose floats are single precision (printed shortest).
    """
    f32 = list(float32 or [False] * len(columns))
    if fmt == "json":
        objs = [{c: _plain(v, f) for c, v, f in zip(columns, r, f32, strict=True)} for r in rows]
        return json.dumps(objs, ensure_ascii=True, allow_nan=True)  # \uXXXX for every control
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([escape(c) for c in columns])
        for r in rows:
            writer.writerow(["" if v is None else cell(v, f) for v, f in zip(r, f32, strict=True)])
        return out.getvalue().rstrip("\n")
    return _aligned([escape(c) for c in columns], [[cell(v, f) for v, f in zip(r, f32, strict=True)]
                                                   for r in rows])  # fmt: skip


def _aligned(header: list[str], body: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def row(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    count = f"({len(body)} row{'s' if len(body) != 1 else ''})"
    return "\n".join([line, row(header), line, *(row(r) for r in body), line, count])


def render(frame: pl.DataFrame, fmt: str = "table") -> str:
    """A polars frame rendered by `render_rows`."""
    import polars as pl

    f32 = [dtype == pl.Float32 for dtype in frame.dtypes]
    return render_rows(frame.columns, frame.rows(), fmt, f32)
