"""Whole chunks of a 1-D Zarr v3 array written straight to its store, compressed on the spot.

zarr's own write of a chunk goes through its asyncio machinery (a thread hop for the codec,
another for the store, buffer copies): for the store's chunks it cost ~4x the compression
itself, most of the host time of storing extraction's codes. `ChunkWriter` encodes a whole chunk
as zarr would (little-endian bytes; blosc with the array's own settings, whose bytes any blosc
reader decodes, or no compressor; a CRC-32C appended where the array has that codec) and puts it
under the array's chunk key. On a local folder it calls zarr's own file write (`_put`: a
temporary file renamed into place) in the calling thread, no event loop in between; on other
stores all chunks of one call go in one round trip to the store. It covers only arrays of that
codec chain (`ChunkWriter.of` gives None for others, which zarr writes as before).
"""

from __future__ import annotations

import asyncio
import sys

import google_crc32c
import numpy as np
import zarr
import zarr.core.sync
import zarr.storage
import zarr.storage._local as zarr_local
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


class ChunkWriter:
    """Writes whole chunks of one array (`of`); the array's shape is the caller's to set."""

    def __init__(self, array: zarr.Array, crc: bool, blosc: Blosc | None) -> None:
        self.array, self.crc, self.blosc = array, crc, blosc
        self.chunk = int(array.chunks[0])
        store = array.store_path.store
        self.folder = store.root if isinstance(store, zarr.storage.LocalStore) else None

    @staticmethod
    def of(array: zarr.Array) -> ChunkWriter | None:
        """A writer for a 1-D array whose codecs are bytes, then blosc or none, then crc32c or
        none; else None."""
        codecs = list(getattr(array.metadata, "codecs", ()))
        if array.ndim != 1 or not codecs or not isinstance(codecs[0], BytesCodec):
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
        return ChunkWriter(array, bool(codecs), blosc)

    def write(self, first_chunk: int, values: np.ndarray) -> None:
        """Chunks `first_chunk`, ... holding `values` (of the array's dtype); a last part
        chunk is padded with the array's fill value, as zarr stores the end of an array."""
        if values.dtype != self.array.dtype:
            raise ValueError("ChunkWriter.write takes values of the array's dtype")
        meta, path = self.array.metadata, self.array.store_path
        parts = [values[lo : lo + self.chunk] for lo in range(0, values.size, self.chunk)]
        if parts and parts[-1].size < self.chunk:
            padded = np.full(self.chunk, self.array.fill_value, values.dtype)
            padded[: parts[-1].size] = parts[-1]
            parts[-1] = padded
        keys = [
            f"{path.path}/{meta.encode_chunk_key((first_chunk + k,))}".lstrip("/")
            for k in range(len(parts))
        ]
        buffer = default_buffer_prototype().buffer
        if self.folder is not None:  # a local folder: zarr's file write, in this thread
            for key, part in zip(keys, parts, strict=True):
                zarr_local._put(self.folder / key, buffer.from_array_like(self._encode(part)))
            return
        data = [buffer.from_array_like(self._encode(part)) for part in parts]

        async def put() -> None:
            await asyncio.gather(*(path.store.set(k, d) for k, d in zip(keys, data, strict=True)))

        zarr.core.sync.sync(put())

    def _encode(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's stored bytes: blosc (or the bytes as they are), then (with crc32c) the
        CRC-32C of those bytes appended as zarr's codec does; one copy of the values."""
        packed = self.blosc.encode(chunk) if self.blosc is not None else chunk.view(np.uint8)
        n = len(packed)
        out = np.empty(n + 4 * self.crc, np.uint8)
        out[:n] = np.frombuffer(packed, np.uint8)
        if self.crc:
            body = out[:n]
            body.flags.writeable = False  # google_crc32c takes read-only buffers only
            out[n:] = np.frombuffer(np.uint32(google_crc32c.value(body)).tobytes(), np.uint8)
        return out
