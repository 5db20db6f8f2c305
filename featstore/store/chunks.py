"""Whole chunks and metadata documents of 1-D Zarr v3 arrays written straight to their store.

zarr's own write of a chunk goes through its asyncio machinery (a thread hop for the codec,
another for the store, buffer copies): for the store's chunks it cost ~4x the compression
itself, and creating, resizing and annotating a group's arrays cost ~20 ms a group in round
trips to zarr's event loop. `ChunkWriter` encodes a whole chunk as zarr would (little-endian
bytes; blosc with the array's own settings, whose bytes any blosc reader decodes, or no
compressor; a CRC-32C appended where the array has that codec) from the pieces that fill it, as
they come (no concatenated copy of the values: only a chunk blosc compresses and that straddles
pieces is assembled, in a buffer kept for it), and puts it under the array's chunk key.
`document` is a node's `zarr.json` as zarr's metadata classes write it (`put_group` a
group's). `put` writes them: on a
local folder by zarr's own atomic file write (a temporary file renamed into place), in the
calling thread, a buffer at a time (no copy to join them); on other stores all in one round
trip. `ChunkWriter` covers only arrays of that codec chain (`ChunkWriter.at` gives None for
others, which zarr writes).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr.core.sync
import zarr.storage
import zarr.storage._local as zarr_local
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.storage import StorePath

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}

Bytes = Any  # bytes or a contiguous array: anything with the buffer protocol


def document(metadata: Any) -> bytes:
    """A node's `zarr.json` (array or group metadata) as zarr writes it."""
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def put_group(where: StorePath, attributes: dict[str, Any]) -> None:
    """A group's `zarr.json` with these attributes at `where`, as zarr writes a group's."""
    put(where, [("zarr.json", [document(GroupMetadata(attributes=attributes))])])


def put(where: StorePath, items: Iterable[tuple[str, list[Bytes]]]) -> None:
    """Write each (key under `where`, its bytes as buffers written one after another). A local
    folder: zarr's file write, in this thread, as `items` come; else one round trip."""
    store = where.store
    keys = ((f"{where.path}/{key}".lstrip("/"), parts) for key, parts in items)
    if isinstance(store, zarr.storage.LocalStore):
        for key, parts in keys:
            path = store.root / key
            try:
                _write_file(path, parts)
            except FileNotFoundError:  # its folder, made when first needed (as zarr's `_put`)
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_file(path, parts)
        return
    buffer = default_buffer_prototype().buffer
    data = [(key, buffer.from_bytes(b"".join(_raw(p) for p in parts))) for key, parts in keys]

    async def put_all() -> None:
        await asyncio.gather(*(store.set(key, value) for key, value in data))

    zarr.core.sync.sync(put_all())


def _write_file(path: Path, parts: list[Bytes]) -> None:
    with zarr_local._atomic_write(path, "wb") as fh:
        for part in parts:
            fh.write(part)


def _raw(part: Bytes) -> Bytes:
    return part.view(np.uint8) if isinstance(part, np.ndarray) else part


def cut(pieces: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """The pieces' elements, one after another, as lists of views of `size` elements (the last
    list may hold fewer)."""
    current: list[np.ndarray] = []
    room = size
    for piece in pieces:
        lo = 0
        while lo < piece.size:
            take = min(room, piece.size - lo)
            current.append(piece[lo : lo + take])
            lo, room = lo + take, room - take
            if room == 0:
                yield current
                current, room = [], size
    if current:
        yield current


class ChunkWriter:
    """Writes whole chunks of one array (`at`); the array's metadata is the caller's to write."""

    def __init__(self, metadata: Any, where: StorePath, crc: bool, blosc: Blosc | None) -> None:
        self.metadata, self.where, self.crc, self.blosc = metadata, where, crc, blosc
        self.chunk = int(metadata.chunks[0])
        self.dtype = metadata.dtype.to_native_dtype()
        self.fill = np.asarray(metadata.fill_value, self.dtype)
        self.scratch: np.ndarray | None = None  # a chunk assembled from pieces for blosc

    @staticmethod
    def at(metadata: Any, where: StorePath) -> ChunkWriter | None:
        """A writer for the 1-D array of `metadata` at `where` whose codecs are bytes, then
        blosc or none, then crc32c or none; else None."""
        codecs = list(getattr(metadata, "codecs", ()))
        if len(metadata.shape) != 1 or not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        order = codecs.pop(0)
        if not (order.endian is None or order.endian.value == sys.byteorder):
            return None
        blosc = codecs.pop(0) if codecs and isinstance(codecs[0], BloscCodec) else None
        if codecs not in ([], [Crc32cCodec()]):
            return None
        if blosc is not None:
            blosc = Blosc(
                cname=blosc.cname.value,
                clevel=blosc.clevel,
                shuffle=_SHUFFLE[blosc.shuffle.value],
                blocksize=blosc.blocksize,
                typesize=blosc.typesize,
            )
        return ChunkWriter(metadata, where, bool(codecs), blosc)

    def write(self, first_chunk: int, values: np.ndarray) -> None:
        """Chunks `first_chunk`, ... holding `values` (`write_pieces` of one piece)."""
        self.write_pieces(first_chunk, [values])

    def write_pieces(self, first_chunk: int, pieces: list[np.ndarray]) -> None:
        """Chunks `first_chunk`, ... holding the pieces' values one after another (each of
        the array's dtype); a last part chunk is padded with the array's fill value, as zarr
        stores the end of an array."""
        if any(p.dtype != self.dtype for p in pieces):
            raise ValueError("ChunkWriter takes values of the array's dtype")
        meta = self.metadata
        put(
            self.where,
            (
                (meta.encode_chunk_key((first_chunk + k,)), self._encode(chunk))
                for k, chunk in enumerate(cut(pieces, self.chunk))
            ),
        )

    def _encode(self, pieces: list[np.ndarray]) -> list[Bytes]:
        """A chunk's stored bytes as buffers: blosc's (or the values' own bytes), then (with
        crc32c) the CRC-32C of them all, as zarr's codec appends it."""
        short = self.chunk - sum(p.size for p in pieces)
        if short:
            pieces = [*pieces, np.full(short, self.fill, self.dtype)]
        if self.blosc is None:
            body: list[Bytes] = [np.ascontiguousarray(p).view(np.uint8) for p in pieces]
        else:
            whole = pieces[0] if len(pieces) == 1 else self._assembled(pieces)
            body = [self.blosc.encode(whole)]
        if self.crc:
            crc = 0
            for part in body:
                crc = google_crc32c.extend(crc, part)
            body.append(np.uint32(crc).tobytes())
        return body

    def _assembled(self, pieces: list[np.ndarray]) -> np.ndarray:
        if self.scratch is None:
            self.scratch = np.empty(self.chunk, self.dtype)
        return np.concatenate(pieces, out=self.scratch)
