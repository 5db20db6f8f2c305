"""Whole chunks of a 1-D Zarr v3 array written straight to its store, compressed on the spot.

zarr's own write of a chunk goes through its asyncio machinery (a thread hop for the codec,
another for the store, buffer copies): for the store's blosc-lz4 chunks it cost ~4x the
compression itself, most of the host time of storing extraction's codes. `ChunkWriter` encodes a
whole chunk as zarr would (little-endian bytes; blosc with the array's own settings, whose bytes
any blosc reader decodes; a CRC-32C appended where the array has that codec) and sets it under
the array's chunk key, all chunks of one call in one round trip to the store. It covers only
arrays of that codec chain (`ChunkWriter.of` gives None for others, which zarr writes as before).
"""

from __future__ import annotations

import asyncio
import sys

import google_crc32c
import numpy as np
import zarr
import zarr.core.sync
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


class ChunkWriter:
    """Writes whole chunks of one array (`of`); the array's shape is the caller's to set."""

    def __init__(self, array: zarr.Array, crc: bool, blosc: Blosc) -> None:
        self.array, self.crc, self.blosc = array, crc, blosc
        self.chunk = int(array.chunks[0])

    @staticmethod
    def of(array: zarr.Array) -> ChunkWriter | None:
        """A writer for a 1-D array whose codecs are bytes, blosc and maybe crc32c, else None."""
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if array.ndim != 1 or len(codecs) not in (2, 3):
            return None
        order, blosc, *rest = codecs
        little = order.endian is None or order.endian.value == sys.byteorder
        if not (isinstance(order, BytesCodec) and little and isinstance(blosc, BloscCodec)):
            return None
        if rest not in ([], [Crc32cCodec()]):
            return None
        return ChunkWriter(
            array,
            bool(rest),
            Blosc(
                cname=blosc.cname.value,
                clevel=blosc.clevel,
                shuffle=_SHUFFLE[blosc.shuffle.value],
                blocksize=blosc.blocksize,
                typesize=blosc.typesize,
            ),
        )

    def write(self, first_chunk: int, values: np.ndarray) -> None:
        """Chunks `first_chunk`, ... holding `values` (whole chunks, of the array's dtype)."""
        if values.size % self.chunk or values.dtype != self.array.dtype:
            raise ValueError("ChunkWriter.write takes whole chunks of the array's dtype")
        meta, path = self.array.metadata, self.array.store_path
        prototype = default_buffer_prototype()
        parts = [
            (
                f"{path.path}/{meta.encode_chunk_key((first_chunk + k,))}".lstrip("/"),
                prototype.buffer.from_bytes(self._encode(values[lo : lo + self.chunk])),
            )
            for k, lo in enumerate(range(0, values.size, self.chunk))
        ]

        async def put() -> None:
            await asyncio.gather(*(path.store.set(key, data) for key, data in parts))

        zarr.core.sync.sync(put())

    def _encode(self, chunk: np.ndarray) -> bytes:
        """blosc, then (with crc32c) the CRC-32C of those bytes appended as zarr's codec does."""
        packed = self.blosc.encode(chunk)
        if self.crc:
            packed += np.uint32(google_crc32c.value(packed)).tobytes()
        return packed
