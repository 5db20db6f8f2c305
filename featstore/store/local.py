"""The activation store: sparse SAE activations per (layer, shard) in Zarr v3."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import zarr
import zarr.core.sync
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from featstore.errors import FeatstoreError, StoreBusyError
from featstore.files import atomic_file, writing
from featstore.store import blockpass, encodings, spec
from featstore.store.chunks import ChunkWriter


def check_shard_name(shard: str) -> str:
    if not spec.name_ok(shard):
        raise FeatstoreError(
            f"bad shard name {shard!r}: use letters, digits, '_', '.', '-' (at most 128, "
            f"first a letter or digit, not {', '.join(sorted(spec.RESERVED_NAMES))})"
        )
    return shard


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


class Store:
    """A featstore home: `store.zarr` plus lock files; safe against crashes mid-write."""

    local = True  # the Zarr hierarchy is a folder (UrlStore: at an fsspec URL)

    def __init__(self, home: Path, *, create: bool = False, root: Path | None = None) -> None:
        self.home = home
        self.root_path = root or home / spec.ROOT
        self.where = str(self.root_path)
        self._open_root(create)

    def _open_root(self, create: bool) -> None:
        if not self._exists(""):
            if not create:
                raise FeatstoreError(
                    f"no featstore store at {self.where} (missing zarr.json); "
                    "run extraction or `featstore ingest` first"
                )
            self._create_root()
        version = self._root_attrs().get(spec.FEATSTORE_VERSION)
        if not isinstance(version, int) or not 1 <= version <= spec.SPEC_VERSION:
            raise FeatstoreError(
                f"store {self.where} has featstore spec version {version}, this featstore "
                f"reads up to {spec.SPEC_VERSION}: upgrade featstore"
            )
        self._local = threading.local()
        self._recover()

    # -- low level -----------------------------------------------------------------------------

    def _create_root(self) -> None:
        self.root_path.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(self._zstore(), mode="a", zarr_format=3)
        root.attrs.update({spec.FEATSTORE_VERSION: spec.SPEC_VERSION})

    def _zstore(self, read_only: bool = False) -> zarr.abc.store.Store:
        return zarr.storage.LocalStore(self.root_path, read_only=read_only)

    def location(self, path: str) -> str:
        """Where a group lives, for messages and links."""
        return str(self.root_path / path)

    def _root_attrs(self) -> dict[str, Any]:
        try:
            return dict(zarr.open_group(self._zstore(True), mode="r").attrs)
        except Exception as exc:  # a corrupt root zarr.json
            raise FeatstoreError(f"corrupt store root {self.where}/zarr.json: {exc}") from None

    def _recover(self) -> None:
        """Undo what killed writers left: put back a group parked in the trash between the two
        renames of a replace, and drop half-written staging folders. An entry whose group lock
        is held belongs to a live writer and is left alone. Every path read from the store's
        own bookkeeping is validated (`inside_path`): nothing outside the store is touched."""
        self._roll_forward()
        for folder in (spec.TRASH, spec.STAGING):
            base = self.root_path / folder
            if base.is_symlink() or not base.is_dir():
                continue  # a symlinked _trash could lead anywhere: never walked
            for entry in sorted(base.iterdir()):
                if entry.is_symlink() or not entry.is_dir():
                    continue  # not written by featstore; `featstore check` reports it
                path = self.inside_path(_entry_path(entry))
                if path is None:  # no owner to ask: a trash entry is dropped, staging kept
                    if folder == spec.TRASH:
                        shutil.rmtree(entry, ignore_errors=True)
                    continue
                with contextlib.suppress(StoreBusyError), self.lock(path):
                    target = self.root_path / path
                    parked = folder == spec.TRASH and (entry / "zarr.json").exists()
                    if parked and not target.exists() and not target.is_symlink():
                        (entry / ".target").unlink(missing_ok=True)
                        os.rename(entry, target)
                    else:
                        shutil.rmtree(entry, ignore_errors=True)

    def inside_path(self, path: str | None) -> str | None:
        """`path` if it names a group inside the store (`spec.group_path_ok`, no symlinked
        folder on the way out of the root), else None."""
        if path is None or not spec.group_path_ok(path):
            return None
        root = self.root_path.resolve()
        parent = (self.root_path / path).parent.resolve()
        return path if parent == root or parent.is_relative_to(root) else None

    def _exists(self, path: str) -> bool:
        """Whether the group at `path` ("" for the root) is there, i.e. has its zarr.json."""
        return (self.root_path / path / "zarr.json").exists()

    @contextlib.contextmanager
    def lock(self, path: str, timeout: float = 0.0) -> Iterator[None]:
        """Hold the write lock of one group; waits up to `timeout` s, then raises StoreBusyError."""
        lock_file = self.home / "locks" / (path.replace("/", "__") + ".lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a+") as fh:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreBusyError(
                            f"{path} is being written by another process (lock {lock_file})"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def transaction(self, lock_timeout: float = 0.0) -> Iterator[Transaction]:
        """Groups written in this block become visible together when it ends, or not at all.

        Every write of the store (`staged` and the methods built on it) inside the block, in
        this thread, is staged and committed with the others (`Transaction.commit`); an error
        or a kill before the commit record is written leaves every group as it was.
        """
        if getattr(self._local, "txn", None) is not None:  # nested: part of the outer one
            yield self._local.txn
            return
        with contextlib.ExitStack() as locks:
            txn = Transaction(self, locks, lock_timeout)
            self._local.txn = txn
            try:
                yield txn
                txn.commit()
            except BaseException:
                txn.discard()
                raise
            finally:
                self._local.txn = None

    @contextlib.contextmanager
    def staged(self, path: str, lock_timeout: float = 0.0) -> Iterator[GroupWriter]:
        """A group written aside (`_open_staging`) and put in place at `path` (`_commit`) only
        when complete, with the rest of the current transaction; a failed write leaves nothing
        (`_discard`)."""
        with self.transaction(lock_timeout) as txn, txn.staged(path) as writer:
            yield writer

    def _new_staging(self, path: str) -> Any:
        """Where a new version of the group at `path` is written: a `_staging` folder."""
        return self._bookkeeping(spec.STAGING) / _entry_name(path)

    def _bookkeeping(self, folder: str) -> Path:
        """The `_staging` or `_trash` folder, refused if it is a link (it could lead outside)."""
        base = self.root_path / folder
        if base.is_symlink() or (base.exists() and not base.is_dir()):
            raise FeatstoreError(f"{base} is not a folder of this store: remove it")
        return base

    def _open_staging(self, path: str, staging: Path) -> zarr.Group:
        return zarr.open_group(zarr.storage.LocalStore(staging), mode="w", zarr_format=3)

    def _commit(self, path: str, staging: Path) -> None:
        self._swap_in(staging, path)

    def _commit_all(self, entries: list[tuple[str, Any]]) -> None:
        """Put several staged groups in place (and delete those with staging None) as one: a
        commit record listing them is written whole (the commit point), then each is swapped
        in, then the record is removed; a kill in between is rolled forward from the record by
        the next open (`_roll_forward`)."""
        if not entries:
            return
        single = len(entries) == 1 and entries[0][1] is not None
        try:
            record = None if single else self._write_record(
                [[path, DELETE if st is None else Path(st).name] for path, st in entries]
            )
            if single:
                self._commit(*entries[0])
        except BaseException:  # not committed: nothing of it becomes visible
            for path, staging in entries:
                if staging is not None:
                    self._discard(path, staging)
            raise
        if record is not None:
            # Committed: what a failure from here leaves, the next open rolls forward.
            self._apply(entries)
            self._remove_record(record)

    def _write_record(self, entries: list[list[str]]) -> Any:
        """Write a commit record whole (the commit point); returns what `_remove_record` takes."""
        record = self._bookkeeping(spec.COMMITS) / f"{uuid.uuid4().hex}.json"
        with atomic_file(record) as tmp:
            tmp.write_text(json.dumps({"entries": entries}))
            with open(tmp) as fh:
                os.fsync(fh.fileno())
        return record

    def _remove_record(self, record: Any) -> None:
        record.unlink()

    def _apply(self, entries: list[tuple[str, Any]]) -> None:
        """Swap in each staged group, delete each group whose staging is None (locks held)."""
        for path, staging in entries:
            if staging is not None:
                self._commit(path, staging)
            elif self._exists(path):
                gone = self._bookkeeping(spec.STAGING) / _entry_name(path)
                os.rename(self.root_path / path, gone)
                shutil.rmtree(gone, ignore_errors=True)

    def _roll_forward(self) -> None:
        """Finish the commits a killed writer recorded (`_commit_all`); a record whose groups
        are locked belongs to a live writer and is left alone."""
        base = self.root_path / spec.COMMITS
        if base.is_symlink() or not base.is_dir():
            return
        for record in sorted(base.glob("*.json")):
            entries = self._record_entries(record)
            if entries is None:
                record.unlink(missing_ok=True)
                continue
            with contextlib.suppress(StoreBusyError), contextlib.ExitStack() as locks:
                for path, _ in entries:
                    locks.enter_context(self.lock(path))
                todo = [(p, None if n == DELETE else self.root_path / spec.STAGING / n)
                        for p, n in entries]  # fmt: skip
                self._apply([(p, st) for p, st in todo if st is None or st.is_dir()])
                record.unlink()

    def _record_entries(self, record: Path) -> list[tuple[str, str]] | None:
        """The (group path, staging name) pairs of a commit record, each validated, else None."""
        try:
            raw = json.loads(record.read_text(encoding="utf-8"))["entries"]
            entries = [(str(path), str(name)) for path, name in raw]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ok = all(
            self.inside_path(path) == path
            and (name == DELETE or spec.STAGING_ENTRY.fullmatch(name) and _named_path(name) == path)
            for path, name in entries
        )  # fmt: skip
        return entries if ok else None

    def _discard(self, path: str, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def write_group(
        self,
        path: str,
        arrays: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any],
        chunks: Mapping[str, int] | None = None,
        lock_timeout: float = 0.0,
    ) -> None:
        """Write a group of 1-D arrays atomically, replacing any old one whole."""
        chunks = chunks or {}
        with self.staged(path, lock_timeout) as writer:
            for name, values in arrays.items():
                writer.append(name, values, chunks.get(name, spec.NNZ_CHUNK))
            writer.attrs.update(attrs)

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self._exists(sub):  # a store of its own: zarr leaves the ancestors alone
                local = zarr.storage.LocalStore(self.root_path / sub)
                zarr.open_group(local, mode="a", zarr_format=3)

    def _swap_in(self, staging: Path, path: str) -> None:
        target = self.root_path / path
        if not target.exists():
            os.rename(staging, target)
            return
        # The trash entry's name records its target, so no moment leaves the old group
        # without its way back (`_recover`).
        parked = self._bookkeeping(spec.TRASH) / _entry_name(path)
        parked.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, parked)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(parked, target)
            raise
        shutil.rmtree(parked, ignore_errors=True)

    def delete_group(self, path: str, lock_timeout: float = 0.0) -> bool:
        """Remove a group whole (renamed away first, so it is never seen half-deleted)."""
        target = self.root_path / path
        if not target.exists():
            return False
        with self.lock(path, lock_timeout):
            gone = self._bookkeeping(spec.STAGING) / _entry_name(path)
            gone.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, gone)
            shutil.rmtree(gone, ignore_errors=True)
        return True

    def group(self, path: str, what: str) -> zarr.Group:
        """The group at `path` to read; a committed generation where the group names one."""
        if not self._exists(path):
            raise FeatstoreError(f"{what} not in store {self.where} (missing {path}/zarr.json)")
        try:
            group = zarr.open_group(self._zstore(True), path=path, mode="r")
            generation = group.attrs.get(spec.GENERATION)
            if generation is not None:  # a store at a URL: see featstore/store/url.py
                group = zarr.open_group(self._zstore(True), path=f"{path}/{generation}", mode="r")
            return group
        except Exception as exc:
            raise FeatstoreError(f"{what}: corrupt {path}/zarr.json: {exc}") from None

    def read_array(
        self, group: zarr.Group, name: str, what: str, sel: slice = slice(None)
    ) -> np.ndarray:
        """`group[name][sel]`, refused (one line naming it) where damaged: unreadable, a
        checksum that fails, a deleted chunk (`encodings.check_read`)."""
        where = f"{group.path}/{name}"
        try:
            array = group[name]
            values = np.asarray(array[sel])
            problem = encodings.check_read(array, values, sel)
        except Exception as exc:
            raise FeatstoreError(f"{what}: cannot read {where} in {self.where}: {exc}") from None
        if problem:
            raise FeatstoreError(f"{what}: corrupt {where} in {self.where}: {problem}")
        return values

    def corrupt(self, what: str, path: str, problem: str) -> FeatstoreError:
        return FeatstoreError(
            f"{what}: corrupt {path} in {self.where}: {problem} (run `featstore check`)"
        )

    def children(self, path: str) -> list[str]:
        base = self.root_path / path
        if not base.is_dir():
            return []
        return sorted(
            p.name for p in base.iterdir() if spec.name_ok(p.name) and (p / "zarr.json").exists()
        )

    # -- activations ---------------------------------------------------------------------------

    def layers(self) -> list[int]:
        found = (spec.LAYER_FOLDER.fullmatch(n) for n in self.children(spec.ACTIVATIONS))
        return sorted(int(m[1]) for m in found if m and int(m[1]) <= spec.MAX_LAYER)

    def shards(self, layer: int) -> list[str]:
        return self.children(spec.layer_group(layer))

    def token_shards(self) -> list[str]:
        return self.children(spec.TOKENS)

    def _activation_group(self, layer: int, shard: str) -> zarr.Group:
        # A stat of the layer's zarr.json, not a listing: this runs for every block read.
        if not self._exists(spec.layer_group(layer)):
            raise FeatstoreError(
                f"layer {layer} not in store {self.where} (layers: {self.layers()})"
            )
        path, what = spec.activation_path(layer, shard), f"layer {layer} shard {shard}"
        return self.encoded(path, what, spec.CSR)

    def encoded(self, path: str, what: str, encoding_type: str) -> zarr.Group:
        """The group at `path`, refused unless written in an encoding of `encoding_type` this
        featstore reads, with sound attributes (`encodings.require`)."""
        group = self.group(path, what)
        encodings.require(group.attrs, encoding_type, what, path)
        return group

    def info(self, layer: int, shard: str) -> dict[str, Any]:
        """The attributes of one (layer, shard) group."""
        return dict(self._activation_group(layer, shard).attrs)

    def read(
        self, layer: int, shard: str, start: int = 0, stop: int | None = None
    ) -> sp.csr_matrix:
        """Activations of tokens [start, stop) as CSR (tokens x d_sae)."""
        group = self._activation_group(layer, shard)
        what = f"layer {layer} shard {shard}"
        n_rows, d_sae = group.attrs[spec.SHAPE]
        stop = n_rows if stop is None else min(stop, n_rows)
        start = min(start, stop)
        nnz = int(group.attrs["nnz"])
        indptr = self.read_array(group, "indptr", what, slice(start, stop + 1))
        if indptr.size != stop - start + 1:
            problem = f"{indptr.size} entries, shape says more"
            raise self.corrupt(what, f"{group.path}/indptr", problem)
        lo, hi = int(indptr[0]), int(indptr[-1])
        lo, hi = max(lo, 0), max(min(hi, nnz), lo)  # checked below; only bounds the read
        data = self.read_array(group, "data", what, slice(lo, hi))
        indices = self.read_array(group, "indices", what, slice(lo, hi))
        problem = encodings.csr_problem(data, indices, indptr, nnz, d_sae)
        if problem:  # before scipy or the numba kernel index with them
            raise self.corrupt(what, group.path, f"tokens {start}..{stop}: {problem}")
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, d_sae))

    def iter_blocks(
        self, layer: int, shard: str, block_tokens: int = spec.TOKEN_CHUNK
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first token, CSR block) over a shard, memory bounded by one block."""
        n_rows = self.info(layer, shard)[spec.SHAPE][0]
        for start in range(0, max(n_rows, 1), block_tokens):
            yield start, self.read(layer, shard, start, start + block_tokens)

    def feature_stats(self, layer: int, shard: str) -> FeatureStats:
        group = self._activation_group(layer, shard)
        what = f"layer {layer} shard {shard}"
        return FeatureStats(
            n_tokens=int(group.attrs[spec.SHAPE][0]),
            count=np.asarray(self.read_array(group, "feature_count", what)),
            total=np.asarray(self.read_array(group, "feature_sum", what)),
            sumsq=np.asarray(self.read_array(group, "feature_sumsq", what)),
        )

    @contextlib.contextmanager
    def activation_writer(
        self,
        layer: int,
        shard: str,
        d_sae: int,
        attrs: Mapping[str, Any] | None = None,
        lock_timeout: float = 0.0,
    ) -> Iterator[ActivationWriter]:
        """Write one (layer, shard) block by block; it becomes visible whole, at the end."""
        check_shard_name(shard)
        with self.staged(spec.activation_path(layer, shard), lock_timeout) as group:
            writer = ActivationWriter(group, layer, shard, d_sae)
            yield writer
            writer.finish(attrs or {})

    def write_activations(
        self,
        layer: int,
        shard: str,
        matrix: sp.spmatrix,
        attrs: Mapping[str, Any] | None = None,
        lock_timeout: float = 0.0,
    ) -> None:
        """Store one (layer, shard) as CSR, replacing any earlier version whole."""
        csr = validate_activations(matrix, f"layer {layer} shard {shard}")
        with self.activation_writer(layer, shard, csr.shape[1], attrs, lock_timeout) as w:
            w.append(csr)

    # -- tokens and vocabulary -----------------------------------------------------------------

    def write_tokens(
        self,
        shard: str,
        table: pl.DataFrame,
        attrs: Mapping[str, Any] | None = None,
        lock_timeout: float = 0.0,
    ) -> None:
        """Store a shard's token table (columns seq, pos, token), one row per activation row."""
        check_shard_name(shard)
        columns = token_columns(table, f"token table of shard {shard}")
        self.write_group(
            spec.tokens_path(shard),
            columns,
            {
                **dict(attrs or {}),
                **encodings.stamp(spec.TOKEN_TABLE),
                spec.ROWS_HASH: rows_digest(columns),
                "n_tokens": table.height,
                "shard": shard,
            },
            chunks={c: spec.TOKEN_CHUNK for c in ("seq", "pos", "token")},
            lock_timeout=lock_timeout,
        )

    def rows_hash(self, shard: str) -> str | None:
        """The rows hash of a shard's stored token table (`rows_digest`); None if it has none."""
        if shard not in self.token_shards():
            return None
        group = self.group(spec.tokens_path(shard), f"token table of shard {shard}")
        if spec.ENCODING_TYPE not in group.attrs:  # at a URL: a parent zarr made for a
            return None  # generation being written, nothing committed yet
        digest = group.attrs.get(spec.ROWS_HASH)
        if isinstance(digest, str):
            return digest
        table = self.tokens(shard)  # a table from before spec version 3
        return rows_digest({c: table[c].to_numpy() for c in ("seq", "pos")})

    def tokens(self, shard: str) -> pl.DataFrame:
        what = f"token table of shard {shard}"
        group = self.encoded(spec.tokens_path(shard), what, spec.TOKEN_TABLE)
        columns = {c: self.read_array(group, c, what) for c in ("seq", "pos", "token")}
        n_tokens = group.attrs.get("n_tokens", columns["seq"].size)
        problem = encodings.token_problem(columns)
        if problem or columns["seq"].size != n_tokens:
            raise self.corrupt(what, group.path, problem or f"not {n_tokens} rows")
        return pl.DataFrame(columns)

    def sequences(self, shard: str) -> np.ndarray:
        """A shard's token ids as (sequences, seq_len), from its token table."""
        table = self.tokens(shard)
        group = self.group(spec.tokens_path(shard), f"token table of shard {shard}")
        seq_len = int(group.attrs.get("seq_len", 0)) or int(table["pos"].max()) + 1
        return table["token"].to_numpy().reshape(-1, seq_len)

    def write_vocab(self, strings: list[str], attrs: Mapping[str, Any] | None = None) -> None:
        """Store the decoded text of every token id as UTF-8 bytes plus offsets."""
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        self.write_group(
            spec.VOCAB,
            {"bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8), "offsets": offsets},
            {**dict(attrs or {}), **encodings.stamp(spec.VOCAB)},
        )

    def vocab(self) -> list[str] | None:
        if not self._exists(spec.VOCAB):
            return None
        group = self.encoded(spec.VOCAB, "vocabulary", spec.VOCAB)
        raw = bytes(self.read_array(group, "bytes", "vocabulary"))
        off = self.read_array(group, "offsets", "vocabulary")
        if off.size and (off[0] != 0 or off[-1] != len(raw) or np.any(np.diff(off) < 0)):
            raise self.corrupt("vocabulary", group.path, "offsets not monotone over the bytes")
        return [raw[a:b].decode("utf-8", "replace") for a, b in zip(off[:-1], off[1:], strict=True)]

    def delete_shard(self, shard: str) -> list[str]:
        """Remove a shard's tokens, activations and pair statistics; returns what went."""
        removed = []
        paths = [spec.activation_path(layer, shard) for layer in self.layers()]
        paths += [f"{spec.PAIRS}/{p}/{shard}" for p in self.children(spec.PAIRS)]
        paths.append(spec.tokens_path(shard))
        for path in paths:
            if self.delete_group(path):
                removed.append(path)
        return removed


DELETE = "-"  # a commit record's staging name for a group the commit deletes


def rows_digest(columns: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b of a token table's rows, (seq, pos) as int32: what a layer's rows are aligned
    with. Token ids are left out: correcting them (e.g. for placeholders) keeps the rows."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("seq", "pos"):
        digest.update(np.ascontiguousarray(columns[name], dtype="<i4").tobytes())
    return digest.hexdigest()


def _entry_name(path: str) -> str:
    """A unique `_staging`/`_trash` folder name that records the group it belongs to."""
    return f"{uuid.uuid4().hex}.{urllib.parse.quote(path, safe='')}"


def _entry_path(entry: Path) -> str | None:
    """The group a `_staging`/`_trash` folder belongs to (None if it does not say)."""
    marker = entry / ".target"  # how trash entries of earlier writers named their group
    if marker.is_file() and not marker.is_symlink():
        try:
            return marker.read_text(encoding="utf-8")[:4096]
        except (OSError, UnicodeDecodeError):
            return None
    return _named_path(entry.name)


def _named_path(name: str) -> str | None:
    """The group path a `{hex}.{path, URL-quoted}` entry name records (None if none)."""
    _, sep, quoted = name.partition(".")
    return urllib.parse.unquote(quoted) if sep else None


def finish_pending_writes() -> None:
    """Wait for zarr's writes still running: when one write of a batch fails, zarr raises at
    once and leaves its siblings (e.g. the metadata of parent groups) running."""

    async def others() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.gather(*tasks, return_exceptions=True)

    zarr.core.sync.sync(others())


# Every array featstore writes: 3x faster to write and read than zarr's default zstd, and smaller;
# then a CRC-32C of each chunk, so a damaged chunk is an error, not other numbers.
CODECS = (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec())
# Chunks are written whole, never tested for being all zeros first (a third of zarr's write time).
WRITE = {"write_empty_chunks": True}


class Transaction:
    """The groups staged in one `Store.transaction`: each under its group lock until the end."""

    def __init__(self, store: Store, locks: contextlib.ExitStack, lock_timeout: float) -> None:
        self.store, self.locks, self.lock_timeout = store, locks, lock_timeout
        self.staged_groups: dict[str, tuple[Any, GroupWriter]] = {}
        self.entries: list[tuple[str, Any]] = []  # everything staged, for `discard`

    @contextlib.contextmanager
    def staged(self, path: str) -> Iterator[GroupWriter]:
        """Stage the group at `path`: written whole here, put in place by `commit`."""
        store = self.store
        if path in self.staged_groups:
            raise FeatstoreError(f"{path} is written twice in one operation")
        self.locks.enter_context(store.lock(path, self.lock_timeout))
        staging = store._new_staging(path)
        self.entries.append((path, staging))
        with writing(path):
            group = store._open_staging(path, staging)
        writer = GroupWriter(group, path)
        with writing(path):  # also what the caller writes to `writer.group` itself
            yield writer
        with writing(path):
            writer.flush()
        self.staged_groups[path] = (staging, writer)

    def commit(self) -> None:
        store = self.store
        with writing(", ".join(self.staged_groups) or "nothing"):
            for _, writer in self.staged_groups.values():
                # Attributes last: their presence is part of what makes a group complete.
                writer.group.attrs.update(writer.attrs)
            removed = align_shards(store, self.staged_groups)
            for path in removed:
                self.locks.enter_context(store.lock(path, self.lock_timeout))
            for path in self.staged_groups:
                # Parents only now: a write that fails leaves no empty group behind.
                store._ensure_parents(path)
            entries = [(path, st) for path, (st, _) in self.staged_groups.items()]
            self.entries = []  # from here on `_commit_all` owns them: it discards or commits
            store._commit_all(entries + [(path, None) for path in removed])

    def discard(self) -> None:
        finish_pending_writes()  # else they could write into the staging place again
        for path, staging in self.entries:
            self.store._discard(path, staging)


def align_shards(store: Store, staged: Mapping[str, tuple[Any, GroupWriter]]) -> list[str]:
    """Stamp each staged activation group with the rows hash of its shard's token table (staged
    with it, or the stored one); returns the stored groups a token table of other rows leaves
    out of line (layers not written with it, and their pair sums), to delete in the same commit:
    rows of every layer and of the token table are the same tokens."""
    tables = {p.split("/")[1]: w for p, (_, w) in staged.items() if p.startswith(spec.TOKENS + "/")}
    for path, (_, writer) in staged.items():
        parts = path.split("/")
        if parts[0] != spec.ACTIVATIONS:
            continue
        shard = parts[2]
        table = tables.get(shard)
        digest = table.attrs[spec.ROWS_HASH] if table else store.rows_hash(shard)
        if digest is not None:
            writer.group.attrs.update({spec.ROWS_HASH: digest})
    removed: list[str] = []
    for shard, table in tables.items():
        before = store.rows_hash(shard)
        if before is None or before == table.attrs[spec.ROWS_HASH]:
            continue
        left = {
            layer for layer in store.layers()
            if shard in store.shards(layer) and spec.activation_path(layer, shard) not in staged
        }  # fmt: skip
        removed += [spec.activation_path(layer, shard) for layer in sorted(left)]
        for folder in store.children(spec.PAIRS):
            pair = spec.PAIR_FOLDER.match(folder)
            if (
                pair
                and {int(pair[1]), int(pair[2])} & left
                and shard in store.children(f"{spec.PAIRS}/{folder}")
            ):
                removed.append(f"{spec.PAIRS}/{folder}/{shard}")
    return removed


class GroupWriter:
    """Appends 1-D arrays to a staged group; attributes are written when it is swapped in.

    Appends are buffered and written in whole chunks: a zarr append of a part chunk rewrites
    that chunk and the array's metadata each time, which made storing codes slower than the
    GPU that makes them.
    """

    def __init__(self, group: zarr.Group, path: str = "") -> None:
        self.group, self.path = group, path
        self.attrs: dict[str, Any] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.arrays: dict[str, zarr.Array] = {}
        self.chunk_writers: dict[str, ChunkWriter | None] = {}
        self.written: dict[str, int] = {}  # elements written, the array's shape may lag behind

    def create(self, name: str, dtype: np.dtype, chunk: int = spec.NNZ_CHUNK) -> None:
        """An empty 1-D array, there even when nothing is appended to it."""
        with writing(f"{self.path}/{name}"):
            array = self.group.create_array(
                name,
                shape=(0,),
                dtype=dtype,
                chunks=(chunk,),
                compressors=CODECS,
                fill_value=encodings.fill_value(dtype),  # what a deleted chunk reads as
                config=WRITE,
            )
        self.pending[name] = []
        self.arrays[name], self.chunk_writers[name] = array, ChunkWriter.of(array)
        self.written[name] = 0

    def append(self, name: str, values: np.ndarray, chunk: int = spec.NNZ_CHUNK) -> None:
        values = np.ascontiguousarray(values)
        if name not in self.pending:
            self.create(name, values.dtype, chunk)
        if values.size:
            self.pending[name].append(values)
            self._write(name, whole_chunks=True)

    def flush(self) -> None:
        """Write what is still buffered, and every array's shape."""
        for name in self.pending:
            self._write(name, whole_chunks=False)
            if self.arrays[name].shape[0] != self.written[name]:
                with writing(f"{self.path}/{name}"):
                    self.arrays[name].resize((self.written[name],))

    def _write(self, name: str, whole_chunks: bool) -> None:
        """Write the buffered values: whole chunks by the array's `ChunkWriter` where it has
        one (the shape is set once the rest comes), a part chunk (at the end) by zarr."""
        array, parts, done = self.arrays[name], self.pending[name], self.written[name]
        size, chunk = sum(len(p) for p in parts), array.chunks[0]
        cut = size - size % chunk if whole_chunks else size
        if not cut:
            return
        values = np.concatenate(parts) if len(parts) > 1 else parts[0]
        fast = self.chunk_writers[name]
        whole = cut - cut % chunk if fast is not None and done % chunk == 0 else 0
        with writing(f"{self.path}/{name}"):
            if whole:
                fast.write(done // chunk, values[:whole].astype(array.dtype, copy=False))
            if whole < cut:
                if array.shape[0] != done + whole:
                    array.resize((done + whole,))
                array.append(values[whole:cut])
        self.written[name] = done + cut
        self.pending[name] = [values[cut:]] if cut < size else []


class ActivationWriter:
    """Appends CSR row blocks of one (layer, shard) and keeps its feature statistics."""

    def __init__(self, group: GroupWriter, layer: int, shard: str, d_sae: int) -> None:
        self.group, self.layer, self.shard, self.d_sae = group, layer, shard, d_sae
        self.stats = FeatureStats(
            0, *(np.zeros(d_sae, dt) for dt in (np.int64, np.float64, np.float64))
        )
        self.nnz = 0
        group.append("indptr", np.zeros(1, np.int64), spec.TOKEN_CHUNK)

    def append(self, block: sp.spmatrix) -> None:
        """Append token rows; `block` is validated (finite, non-negative, d_sae wide): by one
        compiled pass (`blockpass`) where it comes canonical, else by `validate_activations`."""
        checked = blockpass.fast_block(block, self.d_sae)
        if checked is None:
            what = f"layer {self.layer} shard {self.shard}"
            csr = validate_activations(block, what)
            if csr.shape[1] != self.d_sae:
                raise FeatstoreError(
                    f"{what}: {csr.shape[1]} features, expected d_sae {self.d_sae}"
                )
            checked = blockpass.fast_block(csr, self.d_sae)
            assert checked is not None, "a validated block is canonical"
        self.group.append("data", checked.data)
        self.group.append("indices", checked.indices)
        self.group.append("indptr", checked.indptr[1:] + self.nnz, spec.TOKEN_CHUNK)
        self.nnz += checked.indices.size
        sums = FeatureStats(checked.n_rows, checked.count, checked.total, checked.sumsq)
        self.stats = self.stats + sums

    def finish(self, attrs: Mapping[str, Any]) -> None:
        for name, dtype in (("data", np.float32), ("indices", np.int32)):
            self.group.append(name, np.zeros(0, dtype))
        self.group.append("feature_count", self.stats.count)
        self.group.append("feature_sum", self.stats.total)
        self.group.append("feature_sumsq", self.stats.sumsq)
        self.group.attrs.update(
            {
                **dict(attrs),
                **encodings.stamp(spec.CSR),
                spec.SHAPE: [self.stats.n_tokens, self.d_sae],
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
