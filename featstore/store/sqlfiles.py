"""The SQL tables over derived Parquet files in the store home (`pair_stats`, `causal_edges`,
`logit_effects`, `findings`), read by pyarrow (DuckDB's own file access stays off), with a
fixed schema each; a table whose file was not written is empty."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from featstore.defaults import PAIR_COLUMNS, PAIR_LAYERS
from featstore.store import spec

# The pair table's columns (featstore.defaults; polars type names are pyarrow's, capitalised).
PAIR_STATS_SCHEMA = pa.schema(
    [(k, getattr(pa, t.lower())()) for k, t in (PAIR_LAYERS | PAIR_COLUMNS).items()]
)
CAUSAL_EDGES_SCHEMA = pa.schema(  # featstore.causal writes it
    [
        ("layer_a", pa.int32()),
        ("feature_a", pa.int32()),
        ("layer_b", pa.int32()),
        ("feature_b", pa.int32()),
        ("asked_by", pa.string()),  # graph | bin | random (featstore.analysis.asked)
        ("pearson", pa.float64()),
        ("bin", pa.int32()),
        ("bin_value", pa.float64()),
        ("n_tokens", pa.int64()),
    ]
    + [(c, pa.float64()) for c in ("mean_effect", "relative_effect")]
    + [
        ("n_clean_on", pa.int64()),
        ("n_off", pa.int64()),
        ("share_off", pa.float64()),
        ("n_on", pa.int64()),
        ("share_on", pa.float64()),
    ]
    + [(c, pa.float64()) for c in ("total_effect", "attribution", "relative_attribution")]
)
LOGIT_EFFECTS_SCHEMA = pa.schema(  # featstore.analysis.logits writes it
    [
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("token", pa.int32()),
        ("text", pa.string()),
        ("effect", pa.float64()),
    ]
)

FINDINGS_SCHEMA = pa.schema(  # featstore.analysis.findings writes it
    [
        ("conjecture", pa.string()),
        ("statistic", pa.string()),
        ("observed", pa.float64()),
        ("control", pa.string()),
        ("control_value", pa.float64()),
        ("effect", pa.float64()),
        ("effect_lo", pa.float64()),
        ("effect_hi", pa.float64()),
        ("verdict", pa.string()),
        ("unit", pa.string()),
        ("n", pa.int64()),
        ("plot", pa.string()),
        ("source", pa.string()),
        ("layers", pa.string()),
    ]
)


def pair_stats_files(home: Path) -> list[Path]:
    return sorted((home / spec.PAIR_STATS_DIR).glob("*.parquet"))


def _relation(
    con: duckdb.DuckDBPyConnection, files: list[Path], schema: pa.Schema
) -> duckdb.DuckDBPyRelation:
    if not files:
        return con.from_arrow(schema.empty_table())
    return con.from_arrow(pads.dataset([str(f) for f in files], schema=schema))


def _single(folder: str, name: str) -> Callable[[Path], list[Path]]:
    def files(home: Path) -> list[Path]:
        path = home / folder / name
        return [path] if path.exists() else []

    return files


# Each table: where its files are under the home, and its schema.
TABLES: dict[str, tuple[Callable[[Path], list[Path]], pa.Schema]] = {
    "pair_stats": (pair_stats_files, PAIR_STATS_SCHEMA),
    "causal_edges": (_single(spec.CAUSAL_DIR, spec.CAUSAL_EDGES_FILE), CAUSAL_EDGES_SCHEMA),
    "logit_effects": (_single(spec.LOGITS_DIR, spec.LOGIT_EFFECTS_FILE), LOGIT_EFFECTS_SCHEMA),
    "findings": (_single(spec.FINDINGS_DIR, spec.FINDINGS_FILE), FINDINGS_SCHEMA),
}


def add_views(con: duckdb.DuckDBPyConnection, home: Path, names: set[str]) -> None:
    """Create the views of `TABLES` named in `names` (empty where no file was written)."""
    for name, (files, schema) in TABLES.items():
        if name in names:
            _relation(con, files(home), schema).to_view(name)
