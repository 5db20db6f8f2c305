"""Rendering a result frame for a terminal: an aligned table, CSV or JSON (ground floor)."""

from __future__ import annotations

import polars as pl


def render(frame: pl.DataFrame, fmt: str = "table") -> str:
    """A result as an aligned table (all rows), CSV with a header, or a JSON array of rows."""
    if fmt == "csv":
        return frame.write_csv().rstrip("\n")
    if fmt == "json":
        return frame.write_json()
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200, tbl_width_chars=10_000):
        return str(frame)
