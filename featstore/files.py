"""Files written whole or not at all: the ground floor's atomic writes (imports nothing of featstore
but errors)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl

from featstore.errors import FeatstoreError


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an OSError while writing `what` (a full disk, ...) into a one-line error."""
    try:
        yield
    except OSError as exc:
        raise FeatstoreError(f"cannot write {what}: {exc}") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of `path` to write, moved over it (os.replace) only when complete.

    Its name `.{name}.{hex}.tmp` marks it as never read; an OSError (a full disk, a folder in
    the way) becomes a one-line error. A `path` that exists as anything but a regular file (a
    symbolic link, a fifo, a device, a folder) is refused, never replaced.
    """
    path = Path(path)
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise FeatstoreError(f"cannot write {str(path)!r}: not a file name")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # a link, a fifo, a device or a folder: never replaced by a file
        raise FeatstoreError(f"cannot write {path}: it exists and is not a regular file")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with writing(str(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def output_folder(path: str | os.PathLike[str]) -> Path:
    """`path` as a folder to write files into, made where missing; a link or anything but a
    folder there is refused in one line, never written through."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FeatstoreError(f"cannot write into {path}: it exists and is not a folder")
    with writing(str(path)):
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_parquet_atomic(
    frame: pl.DataFrame, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write `path` whole or not at all (with `metadata`: the file's key-value metadata)."""
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp, metadata=metadata)
    return Path(path)


def write_parquet_frames(
    frames: Iterable[pl.DataFrame],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the frames (of one schema, the first's) one after another as one Parquet file,
    whole or not at all, holding one frame at a time (with `metadata`: the file's key-value
    metadata); returns the number of rows."""
    import pyarrow.parquet as pq

    rows, writer = 0, None
    with atomic_file(path) as tmp:
        try:
            for frame in frames:
                table = frame.to_arrow()
                if writer is None:
                    schema = table.schema.with_metadata({**(table.schema.metadata or {}),
                                                         **(metadata or {})})  # fmt: skip
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(writer.schema))
                rows += frame.height
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pl.DataFrame().write_parquet(tmp, metadata=metadata)
    return rows
