"""Import activations computed elsewhere (a scipy sparse .npz, tokens x features)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.home import open_store
from featstore.store.local import Store, check_shard_name, token_columns, validate_activations


def load_npz(path: str | Path) -> sp.csr_matrix:
    """A scipy sparse .npz as CSR, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FeatstoreError(f"{path}: no such file")
    try:
        matrix = sp.load_npz(path)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise FeatstoreError(f"{path}: not a scipy sparse .npz ({exc})") from None
    matrix = validate_activations(matrix, str(path))
    if 0 in matrix.shape:
        n, d = matrix.shape
        raise FeatstoreError(f"{path}: empty matrix ({n} tokens x {d} features), nothing to ingest")
    return matrix


def load_token_table(path: str | Path, n_rows: int) -> pl.DataFrame:
    """A token table (seq, pos, token) from .parquet or .npz with those arrays."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pl.read_parquet(path)
        else:
            with np.load(path) as z:
                table = pl.DataFrame({k: z[k] for k in ("seq", "pos", "token")})
    except Exception as exc:
        raise FeatstoreError(
            f"{path}: cannot read a token table (seq, pos, token): {exc}"
        ) from None
    if table.height != n_rows:
        raise FeatstoreError(f"{path}: {table.height} token rows, the activations have {n_rows}")
    token_columns(table, str(path))  # integers in range, or a one-line error
    return table


def placeholder_tokens(n_rows: int) -> pl.DataFrame:
    """Each row its own sequence, token id -1 (unknown): enough for every statistic."""
    return pl.DataFrame(
        {
            "seq": np.arange(n_rows, dtype=np.int32),
            "pos": np.zeros(n_rows, dtype=np.int32),
            "token": np.full(n_rows, -1, dtype=np.int32),
        }
    )


def check_fits(store: Store, layer: int, shard: str, matrix: sp.csr_matrix) -> None:
    """The matrix must be as wide as the layer's shards and as long as the shard's tokens."""
    existing = store.shards(layer)
    if existing:
        d_sae = store.info(layer, existing[0])["d_sae"]
        if matrix.shape[1] != d_sae:
            raise FeatstoreError(
                f"npz has {matrix.shape[1]} features but layer {layer} has d_sae {d_sae}"
            )
    if shard in store.token_shards():
        n_tokens = store.tokens(shard).height
        if matrix.shape[0] != n_tokens:
            raise FeatstoreError(
                f"npz has {matrix.shape[0]} token rows but shard {shard} has {n_tokens} tokens"
            )


def ingest_npz(
    home: str | Path,
    path: str | Path,
    *,
    layer: int,
    shard: str,
    tokens_file: str | Path | None = None,
    url: str | None = None,
) -> str:
    """Validate everything first, then write; a bad file leaves the store as it was."""
    check_shard_name(shard)
    if not (isinstance(layer, int) and 0 <= layer <= spec.MAX_LAYER):
        raise FeatstoreError(f"layer must be an integer in 0 .. 2^31-1, got {layer}")
    matrix = load_npz(path)
    tokens = load_token_table(tokens_file, matrix.shape[0]) if tokens_file else None
    store = open_store(home, create=True, url=url)
    # A token table no layer uses (an orphan, e.g. of a killed ingest before spec version 3)
    # is replaced; one in use is kept, and the matrix must fit it.
    orphan = shard in store.token_shards() and not any(
        shard in store.shards(other) for other in store.layers()
    )
    if tokens is not None and shard in store.token_shards() and not orphan:
        raise FeatstoreError(f"shard {shard} already has a token table; ingest without --tokens")
    if not orphan:
        check_fits(store, layer, shard, matrix)
    with store.transaction():  # the token table and the layer together, or neither
        if orphan or shard not in store.token_shards():
            table = tokens if tokens is not None else placeholder_tokens(matrix.shape[0])
            store.write_tokens(shard, table, {"source": "ingest"})
        store.write_activations(layer, shard, matrix, {"source": "ingest", "file": str(path)})
    n_tokens, d_sae = matrix.shape
    return (
        f"layer {layer} shard {shard}: {n_tokens} tokens x {d_sae} features, {matrix.nnz} nonzeros"
    )
