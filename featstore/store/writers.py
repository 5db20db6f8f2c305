"""How a group's arrays are written, and the values that may enter them.

`GroupWriter` appends 1-D arrays to a staged group in whole chunks (`CODECS`: blosc then a
CRC-32C of every chunk); `ActivationWriter` appends CSR row blocks of one (layer, shard) and
keeps its `FeatureStats`; `validate_activations` and `token_columns` refuse what the store
cannot hold, with one line; `rows_digest` is the rows hash of a token table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import StorePath

from featstore.errors import FeatstoreError
from featstore.files import writing
from featstore.store import blockpass, chunks, encodings, spec
from featstore.store.chunks import ChunkWriter


@dataclass(frozen=True)
class FeatureStats:
    """Additive per-feature sufficient statistics of one (layer, shard)."""

    n_tokens: int
    count: np.ndarray  # (d_sae,) int64: tokens where the feature is > 0
    total: np.ndarray  # (d_sae,) float64: sum of activations
    sumsq: np.ndarray  # (d_sae,) float64: sum of squared activations

    @staticmethod
    def of(matrix: sp.csr_matrix) -> FeatureStats:
        d = matrix.shape[1]
        idx, val = matrix.indices, matrix.data.astype(np.float64)
        pos = val > 0
        return FeatureStats(
            n_tokens=matrix.shape[0],
            count=np.bincount(idx[pos], minlength=d).astype(np.int64),
            total=np.bincount(idx, weights=val, minlength=d),
            sumsq=np.bincount(idx, weights=val * val, minlength=d),
        )

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            self.n_tokens + other.n_tokens,
            self.count + other.count,
            self.total + other.total,
            self.sumsq + other.sumsq,
        )


def rows_digest(columns: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b of a token table's rows, (seq, pos) as int32: what a layer's rows are aligned
    with. Token ids are left out: correcting them (e.g. for placeholders) keeps the rows."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("seq", "pos"):
        digest.update(np.ascontiguousarray(columns[name], dtype="<i4").tobytes())
    return digest.hexdigest()


# Every array featstore writes but activation values: blosc-lz4 with bit shuffle, 3x faster to
# write and read than zarr's default zstd and smaller (bit shuffle: ~1.7x faster than byte shuffle
# here, 3.5% smaller); then a CRC-32C of each chunk, so a damaged chunk is an error, not other
# numbers.
CODECS = (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec())
# Activation values (`data` of a CSR group): float32 mantissas do not compress (91% with blosc),
# so they are stored as they are, with the CRC-32C (bench/RESULTS.md, issue 15).
VALUE_CODECS = (Crc32cCodec(),)
# Chunks are written whole, never tested for being all zeros first (a third of zarr's write time).
WRITE = {"write_empty_chunks": True}


class GroupWriter:
    """Appends 1-D arrays to a staged group at `where`; each array's `zarr.json` is written by
    `flush` (at its final shape), the group's by `write_attributes` when it is committed.

    Appends are buffered and written in whole chunks, cut from the appended pieces as they come
    (`chunks.ChunkWriter`): a zarr append of a part chunk rewrites that chunk and the array's
    metadata each time, which made storing codes slower than the GPU that makes them. Array
    metadata is zarr's own (`_metadata`), written once, not created, resized and annotated in
    round trips to zarr's event loop.
    """

    def __init__(self, where: StorePath, path: str = "") -> None:
        self.where, self.path = where, path
        self.attrs: dict[str, Any] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.metadata: dict[str, Any] = {}
        self.chunk_writers: dict[str, ChunkWriter | None] = {}
        self.written: dict[str, int] = {}  # elements written

    def create(
        self,
        name: str,
        dtype: np.dtype,
        chunk: int = spec.NNZ_CHUNK,
        codecs: tuple | None = None,
    ) -> None:
        """An empty 1-D array (`codecs` by default `CODECS`), there even when nothing is
        appended to it."""
        with writing(f"{self.path}/{name}"):
            meta = _metadata(np.dtype(dtype), chunk, CODECS if codecs is None else codecs)
        self.pending[name] = []
        self.metadata[name] = meta
        self.chunk_writers[name] = ChunkWriter.at(meta, self.where / name)
        self.written[name] = 0

    def put(self, name: str, values: np.ndarray, chunk: int = spec.NNZ_CHUNK) -> None:
        """A new array holding `values`, in chunks of at most `chunk` (one chunk of its size
        when smaller: nothing padded)."""
        values = np.ascontiguousarray(values)
        self.create(name, values.dtype, max(1, min(chunk, values.size)))
        self.pending[name].append(values)
        self._write(name, whole_chunks=False)

    def append(self, name: str, values: np.ndarray, chunk: int = spec.NNZ_CHUNK) -> None:
        if name not in self.pending:
            self.create(name, np.asarray(values).dtype, chunk)
        values = np.ascontiguousarray(values, self.metadata[name].dtype.to_native_dtype())
        if values.size:
            self.pending[name].append(values)
            self._write(name, whole_chunks=True)

    def flush(self) -> None:
        """Write what is still buffered, then every array's `zarr.json` at its size."""
        for name in self.pending:
            self._write(name, whole_chunks=False)
        docs = [
            (f"{name}/zarr.json", [chunks.document(meta.update_shape((self.written[name],)))])
            for name, meta in self.metadata.items()
        ]
        with writing(self.path):
            chunks.put(self.where, docs)

    def write_attributes(self, attributes: Mapping[str, Any]) -> None:
        """The group's `zarr.json` with these attributes, as zarr writes a group's."""
        with writing(self.path):
            chunks.put_group(self.where, dict(attributes))

    def _write(self, name: str, whole_chunks: bool) -> None:
        """Write the buffered values (with `whole_chunks`, only whole chunks): by the array's
        `ChunkWriter` where it has one and the array ends at a chunk's start, else by zarr."""
        parts, done = self.pending[name], self.written[name]
        size, chunk = sum(p.size for p in parts), int(self.metadata[name].chunks[0])
        cut = size - size % chunk if whole_chunks else size
        if not cut:
            return
        head, tail = _split(parts, cut)
        fast = self.chunk_writers[name] if done % chunk == 0 else None
        with writing(f"{self.path}/{name}"):
            if fast is not None:
                fast.write_pieces(done // chunk, head)
            else:  # zarr's own write into the region (reading back a part chunk)
                meta = self.metadata[name].update_shape((done + cut,))
                chunks.put(self.where, [(f"{name}/zarr.json", [chunks.document(meta)])])
                array = zarr.open_array(self.where / name, mode="r+", config=WRITE)
                array[done : done + cut] = np.concatenate(head)
        self.written[name] = done + cut
        self.pending[name] = tail


def _split(parts: list[np.ndarray], n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The pieces' first `n` elements and the rest, as lists of views."""
    head: list[np.ndarray] = []
    for k, part in enumerate(parts):
        if part.size >= n:
            head.append(part[:n])
            rest = [part[n:]] if part.size > n else []
            return head, rest + parts[k + 1 :]
        head.append(part)
        n -= part.size
    return head, []


_TEMPLATES: dict[tuple[str, int, str], Any] = {}


def _metadata(dtype: np.dtype, chunk: int, codecs: tuple) -> Any:
    """The metadata zarr's `create_array` gives a 1-D array of `dtype` in chunks of `chunk`
    with `codecs` and the store's fill value (`encodings.fill_value`), at shape (0,): made once
    a process in memory (`update_shape` sets the size)."""
    key = (dtype.str, chunk, json.dumps([c.to_dict() for c in codecs], sort_keys=True))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = zarr.create_array(
            zarr.storage.MemoryStore(),
            shape=(0,),
            dtype=dtype,
            chunks=(chunk,),
            compressors=codecs,
            fill_value=encodings.fill_value(dtype),  # what a deleted chunk reads as
            config=WRITE,
        ).metadata
    return _TEMPLATES[key]


class ActivationWriter:
    """Appends CSR row blocks of one (layer, shard) and keeps its feature statistics."""

    def __init__(self, group: GroupWriter, layer: int, shard: str, d_sae: int) -> None:
        self.group, self.layer, self.shard, self.d_sae = group, layer, shard, d_sae
        self.n_tokens, self.nnz = 0, 0
        # Each feature's count, sum and sum of squares, added block by block (float64, as
        # `FeatureStats.__add__` adds them); `scratch` takes one block's sums.
        self.sums, self.scratch = np.zeros((d_sae, 3)), np.empty((d_sae, 3))
        group.create("data", np.dtype(np.float32), codecs=VALUE_CODECS)
        group.append("indptr", np.zeros(1, np.int64), spec.TOKEN_CHUNK)

    @property
    def stats(self) -> FeatureStats:
        sums = self.sums
        return FeatureStats(
            self.n_tokens,
            sums[:, 0].astype(np.int64),
            np.ascontiguousarray(sums[:, 1]),
            np.ascontiguousarray(sums[:, 2]),
        )

    def append(self, block: sp.spmatrix) -> None:
        """Append token rows; `block` is validated (finite, non-negative, d_sae wide): by one
        compiled pass (`blockpass`) where it comes canonical, else by `validate_activations`."""
        checked = blockpass.fast_block(block, self.d_sae, self.scratch)
        if checked is None:
            what = f"layer {self.layer} shard {self.shard}"
            csr = validate_activations(block, what)
            if csr.shape[1] != self.d_sae:
                raise FeatstoreError(
                    f"{what}: {csr.shape[1]} features, expected d_sae {self.d_sae}"
                )
            checked = blockpass.fast_block(csr, self.d_sae, self.scratch)
            assert checked is not None, "a validated block is canonical"
        self.group.append("data", checked.data)
        self.group.append("indices", checked.indices)
        self.group.append("indptr", checked.indptr[1:] + self.nnz, spec.TOKEN_CHUNK)
        self.nnz += checked.indices.size
        self.n_tokens += checked.n_rows
        self.sums += checked.sums

    def finish(self, attrs: Mapping[str, Any]) -> None:
        for name, dtype in (("data", np.float32), ("indices", np.int32)):
            self.group.append(name, np.zeros(0, dtype))
        stats = self.stats
        self.group.put("feature_count", stats.count)
        self.group.put("feature_sum", stats.total)
        self.group.put("feature_sumsq", stats.sumsq)
        self.group.attrs.update(
            {
                **dict(attrs),
                **encodings.stamp(spec.CSR),
                spec.SHAPE: [self.n_tokens, self.d_sae],
                "layer": int(self.layer),
                "shard": self.shard,
                "d_sae": int(self.d_sae),
                "nnz": int(self.nnz),
            }
        )


def token_columns(table: pl.DataFrame, what: str) -> dict[str, np.ndarray]:
    """seq, pos, token as int32 arrays, or a one-line error: integers only (no NaN, no
    fractions), within int32, seq and pos >= 0, token >= -1 (unknown)."""
    missing = {"seq", "pos", "token"} - set(table.columns)
    if missing:
        raise FeatstoreError(f"{what} lacks columns {sorted(missing)}")
    columns = {}
    for name in ("seq", "pos", "token"):
        values = table[name].to_numpy()
        if values.dtype.kind not in "iu":
            raise FeatstoreError(f"{what}: column {name} must hold integers, not {values.dtype}")
        low = -1 if name == "token" else 0
        if values.size and (values.min() < low or values.max() > 2**31 - 1):
            raise FeatstoreError(f"{what}: column {name} outside {low} .. 2^31-1")
        columns[name] = values.astype(np.int32)
    return columns


def validate_activations(matrix: Any, what: str) -> sp.csr_matrix:
    """A finite, non-negative 2-D sparse matrix as canonical CSR, or a one-line error."""
    if not sp.issparse(matrix):
        raise FeatstoreError(f"{what}: expected a scipy sparse matrix, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise FeatstoreError(f"{what}: expected 2-D tokens x features, got {matrix.ndim}-D")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise FeatstoreError(f"{what}: activations must be numbers, got dtype {matrix.dtype}")
    if matrix.shape[1] >= 2**31:
        raise FeatstoreError(f"{what}: {matrix.shape[1]} features is more than int32 ids allow")
    if matrix.shape[0] > spec.MAX_SHARD_TOKENS:  # before CSR allocates an indptr that long
        raise FeatstoreError(
            f"{what}: {matrix.shape[0]} token rows, more than a shard holds "
            f"({spec.MAX_SHARD_TOKENS}); split it into shards"
        )
    if sp.issparse(matrix) and matrix.format in ("csr", "csc"):
        try:
            matrix.check_format(full_check=True)  # indices in range, indptr monotone
        except ValueError as exc:
            raise FeatstoreError(f"{what}: malformed {matrix.format.upper()} ({exc})") from None
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    if not np.all(np.isfinite(csr.data)):
        raise FeatstoreError(f"{what}: activations contain NaN or infinite values")
    if csr.nnz and csr.data.min() < 0:
        raise FeatstoreError(f"{what}: activations must be non-negative (min {csr.data.min()})")
    csr.sort_indices()
    return csr
