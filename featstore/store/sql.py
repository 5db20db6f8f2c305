"""Read-only DuckDB over a store, streaming from Zarr: no copy of the activations is made.

Tables (views): `activations(layer, shard, seq, pos, token, feature, value)`, one row per
nonzero; `tokens(shard, seq, pos, token, text)`; `pair_stats(layer_a, layer_b, feature_a, ...)`
over the merged pair statistics files in `{home}/pair_stats/` (empty when there are none);
`causal_edges(layer_a, feature_a, layer_b, feature_b, ...)` over the patching effects in
`{home}/causal/causal_edges.parquet` (`featstore.causal`; empty when absent);
`logit_effects(layer, feature, kind, rank, token, text, effect)` over
`{home}/logits/logit_effects.parquet` (`featstore.analysis.logits`; empty when absent);
`findings(conjecture, statistic, observed, control, ..., verdict, ...)` over
`{home}/findings/findings.parquet` (`featstore.analysis.findings`; empty when absent).

Each (layer, shard) is a lazy Arrow source that builds a fresh reader from `Store.iter_blocks`
whenever DuckDB asks, so a query may scan it several times (a self-join). `activations` is a
UNION ALL of those scans with constant `layer` and `shard` columns, which lets DuckDB drop the
branches a `WHERE layer = ...` excludes before reading anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.local import Store

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
BLOCK_TOKENS = 1 << 14  # tokens per Arrow batch: ~50 nonzeros each at GPT-2 scale

# Statements a query may be; everything else (CREATE, INSERT, COPY, ATTACH, SET, ...) is refused.
READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

ACTIVATION_SCHEMA = pa.schema(
    [
        ("seq", pa.int32()),
        ("pos", pa.int32()),
        ("token", pa.int32()),
        ("feature", pa.int32()),
        ("value", pa.float32()),
    ]
)
TOKEN_SCHEMA = pa.schema(
    [("seq", pa.int32()), ("pos", pa.int32()), ("token", pa.int32()), ("text", pa.string())]
)
PAIR_STATS_SCHEMA = pa.schema(
    [
        ("layer_a", pa.int32()),
        ("layer_b", pa.int32()),
        ("feature_a", pa.int32()),
        ("feature_b", pa.int32()),
        ("n_tokens", pa.int64()),
        ("n_both", pa.int64()),
        ("n_either", pa.int64()),
        ("sum_xy", pa.float64()),
        ("pearson", pa.float64()),
        ("agreement", pa.float64()),
        ("jaccard", pa.float64()),
        ("sufficiency", pa.float64()),  # featstore.measures
        ("necessity", pa.float64()),
        ("mutual_information", pa.float64()),
        ("pmi", pa.float64()),
        ("cosine", pa.float64()),  # uncentred activation cosine
    ]
)
CAUSAL_EDGES_SCHEMA = pa.schema(  # featstore.causal writes it
    [
        ("layer_a", pa.int32()),
        ("feature_a", pa.int32()),
        ("layer_b", pa.int32()),
        ("feature_b", pa.int32()),
        ("n_tokens", pa.int64()),
        ("exact", pa.bool_()),
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


def token_slice(store: Store, shard: str, start: int, stop: int) -> dict[str, np.ndarray]:
    """Columns seq, pos, token of token rows [start, stop) of a shard."""
    what = f"token table of shard {shard}"
    group = store.group(spec.tokens_path(shard), what)
    return {
        c: np.asarray(store.read_array(group, c, what, slice(start, stop)), dtype=np.int32)
        for c in ("seq", "pos", "token")
    }


class ArrowSource:
    """A re-scannable Arrow stream: each `__arrow_c_stream__` call starts a fresh lazy reader.

    An error while reading (a damaged file) is also kept in `failures`, so `query` can report
    featstore's own one-line message instead of DuckDB's wrapping of its traceback.
    """

    def __init__(self, schema: pa.Schema, batches: Any, failures: list[Exception]) -> None:
        self.schema, self.batches = schema, batches  # batches: () -> Iterator[RecordBatch]
        self.failures = failures

    def _read(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.batches()
        except Exception as exc:
            self.failures.append(exc)
            raise

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        reader = pa.RecordBatchReader.from_batches(self.schema, self._read())
        return reader.__arrow_c_stream__(requested_schema)


def activation_batches(store: Store, layer: int, shard: str) -> Iterator[pa.RecordBatch]:
    """One batch of nonzeros per block of tokens, joined to the token table by row."""
    for start, block in store.iter_blocks(layer, shard, BLOCK_TOKENS):
        toks = token_slice(store, shard, start, start + block.shape[0])
        row = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        columns = [toks[c][row] for c in ("seq", "pos", "token")]
        columns += [block.indices.astype(np.int32), block.data.astype(np.float32)]
        yield pa.RecordBatch.from_arrays(columns, schema=ACTIVATION_SCHEMA)


def token_batches(store: Store, shard: str, vocab: pa.Array | None) -> Iterator[pa.RecordBatch]:
    n_tokens = int(
        store.group(spec.tokens_path(shard), f"token table of shard {shard}").attrs["n_tokens"]
    )
    for start in range(0, n_tokens, BLOCK_TOKENS):
        toks = token_slice(store, shard, start, start + BLOCK_TOKENS)
        token = toks["token"]
        if vocab is None:
            text = pa.nulls(token.size, pa.string())
        else:  # ids outside the vocabulary (-1: unknown) get no text
            known = (token >= 0) & (token < len(vocab))
            text = vocab.take(pa.array(np.where(known, token, 0), mask=~known))
        yield pa.RecordBatch.from_arrays(
            [toks["seq"], toks["pos"], token, text], schema=TOKEN_SCHEMA
        )


def _with_constants(
    con: duckdb.DuckDBPyConnection, source: ArrowSource, constants: Mapping[str, Any]
) -> duckdb.DuckDBPyRelation:
    """A scan of `source` with constant leading columns (typed), so filters on them prune it."""
    consts = [
        duckdb.ConstantExpression(value).cast(duckdb.sqltype(sql_type)).alias(name)
        for name, (value, sql_type) in constants.items()
    ]
    cols = [duckdb.ColumnExpression(f.name) for f in source.schema]
    return con.from_arrow(source).select(*consts, *cols)


def _union_all(rels: Sequence[duckdb.DuckDBPyRelation]) -> duckdb.DuckDBPyRelation:
    """UNION ALL as a balanced tree, so many shards do not nest the query deeply."""
    while len(rels) > 1:
        pairs = [rels[i].union(rels[i + 1]) for i in range(0, len(rels) - 1, 2)]
        rels = pairs + ([rels[-1]] if len(rels) % 2 else [])
    return rels[0]


def _empty(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> duckdb.DuckDBPyRelation:
    return con.from_arrow(schema.empty_table())


def _activations(
    con: duckdb.DuckDBPyConnection, store: Store, failures: list[Exception]
) -> duckdb.DuckDBPyRelation:
    rels = [
        _with_constants(
            con,
            ArrowSource(
                ACTIVATION_SCHEMA,
                lambda layer=layer, shard=shard: activation_batches(store, layer, shard),
                failures,
            ),
            {"layer": (layer, "INTEGER"), "shard": (shard, "VARCHAR")},
        )
        for layer in store.layers()
        for shard in store.shards(layer)
    ]
    empty = ACTIVATION_SCHEMA.insert(0, pa.field("shard", pa.string()))
    return _union_all(rels) if rels else _empty(con, empty.insert(0, pa.field("layer", pa.int32())))


def _tokens(
    con: duckdb.DuckDBPyConnection, store: Store, failures: list[Exception]
) -> duckdb.DuckDBPyRelation:
    words = store.vocab()
    vocab = None if words is None else pa.array(words, pa.string())
    rels = [
        _with_constants(
            con,
            ArrowSource(
                TOKEN_SCHEMA, lambda shard=shard: token_batches(store, shard, vocab), failures
            ),
            {"shard": (shard, "VARCHAR")},
        )
        for shard in store.token_shards()
    ]
    return (
        _union_all(rels)
        if rels
        else _empty(con, TOKEN_SCHEMA.insert(0, pa.field("shard", pa.string())))
    )


def pair_stats_files(store: Store) -> list[Path]:
    return sorted((store.home / spec.PAIR_STATS_DIR).glob("*.parquet"))


def _pair_stats(con: duckdb.DuckDBPyConnection, store: Store) -> duckdb.DuckDBPyRelation:
    files = pair_stats_files(store)
    if not files:
        return _empty(con, PAIR_STATS_SCHEMA)
    # pyarrow reads the files (DuckDB's own file access is switched off below).
    return con.from_arrow(pads.dataset([str(f) for f in files], schema=PAIR_STATS_SCHEMA))


def _derived(
    con: duckdb.DuckDBPyConnection, path: Path, schema: pa.Schema
) -> duckdb.DuckDBPyRelation:
    """A derived Parquet table under the store home; empty when it was not written."""
    if not path.exists():
        return _empty(con, schema)
    return con.from_arrow(pads.dataset(str(path), schema=schema))


def connect(store: Store, failures: list[Exception] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the store's views; it can read no file but through them.

    Errors reading the store during a query are appended to `failures` when given.
    """
    failures = [] if failures is None else failures
    con = duckdb.connect(
        config={
            "enable_external_access": False,  # no COPY TO, ATTACH, read_csv, INSTALL, ...
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )
    _activations(con, store, failures).to_view("activations")
    _tokens(con, store, failures).to_view("tokens")
    _pair_stats(con, store).to_view("pair_stats")
    causal = store.home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE
    _derived(con, causal, CAUSAL_EDGES_SCHEMA).to_view("causal_edges")
    logits = store.home / spec.LOGITS_DIR / spec.LOGIT_EFFECTS_FILE
    _derived(con, logits, LOGIT_EFFECTS_SCHEMA).to_view("logit_effects")
    findings = store.home / spec.FINDINGS_DIR / spec.FINDINGS_FILE
    _derived(con, findings, FINDINGS_SCHEMA).to_view("findings")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT (or EXPLAIN), naming the statement type."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise FeatstoreError(one_line(exc)) from None
    if len(statements) != 1:
        raise FeatstoreError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in READ_STATEMENTS:
        raise FeatstoreError(f"the store is read-only: {kind.name} statements are refused")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def query(
    store: Store, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None
) -> pl.DataFrame:
    """Run one read-only query over the store; DuckDB errors come back as a one-line error."""
    check_read_only(sql)
    failures: list[Exception] = []
    con = connect(store, failures)
    try:
        return con.sql(sql, params=params).pl()
    except duckdb.Error as exc:
        failure = failures[0] if failures else None
        if isinstance(failure, FeatstoreError):  # a damaged file: name it, not DuckDB's wrapping
            raise failure from None
        raise FeatstoreError(one_line(exc)) from None
    finally:
        con.close()


def named_query(name: str) -> str:
    """The text of `sql/{name}.sql`."""
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        known = sorted(p.stem for p in SQL_DIR.glob("*.sql"))
        raise FeatstoreError(f"no query {name!r} in {SQL_DIR} (known: {', '.join(known)})")
    return path.read_text()


def query_text(file: str) -> str:
    """The text of a query file: a path, else the name of one in `sql/` (`top_features`)."""
    path = Path(file)
    if path.is_file():
        return path.read_text()
    return named_query(path.name.removesuffix(".sql"))
