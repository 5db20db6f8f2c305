"""The activation store: sparse SAE activations per (layer, shard) in Zarr v3.

`Store` reads and writes the groups of docs/STORE_FORMAT.md on a local folder; how groups are
committed together and recovered lives in `featstore.store.transaction` (`Committing`), how
their arrays are written in `featstore.store.writers`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
import scipy.sparse as sp
import zarr
import zarr.storage
from zarr.storage import StorePath

from featstore.errors import FeatstoreError, StoreBusyError
from featstore.store import encodings, spec
from featstore.store.chunks import put_group
from featstore.store.snapshot import NONE, Commit, Snapshot, SnapshotChanged, retrying
from featstore.store.transaction import DELETE, Committing, Transaction, finish_pending_writes
from featstore.store.writers import (
    CODECS,
    WRITE,
    ActivationWriter,
    FeatureStats,
    GroupWriter,
    rows_digest,
    token_columns,
    validate_activations,
)

__all__ = [  # what other modules take from here (the writers' names re-exported)
    "CODECS", "DELETE", "WRITE", "ActivationWriter", "FeatureStats", "GroupWriter", "Store",
    "Transaction", "check_shard_name", "finish_pending_writes", "rows_digest", "token_columns",
    "validate_activations",
]  # fmt: skip


def check_shard_name(shard: str) -> str:
    if not spec.name_ok(shard):
        raise FeatstoreError(
            f"bad shard name {shard!r}: use letters, digits, '_', '.', '-' (at most 128, "
            f"first a letter or digit, not {', '.join(sorted(spec.RESERVED_NAMES))})"
        )
    return shard


T = TypeVar("T")


def _unit(method: Callable[..., T]) -> Callable[..., T]:
    """A read method that is one consistent state by itself (`Store.consistently`)."""

    @functools.wraps(method)
    def read(self: Store, *args: Any, **kwargs: Any) -> T:
        return self.consistently(method, self, *args, **kwargs)

    return read


class Store(Committing):
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

    # -- one consistent state (featstore.store.snapshot) ---------------------------------------

    def _stamp(self, path: str) -> bytes | None:
        """The bytes of a group's zarr.json (every commit rewrites them); None if not there."""
        try:
            return (self.root_path / path / "zarr.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # there but unreadable: opening it names the problem
            return f"unreadable: {exc.errno}".encode()

    def _pending(self) -> bool:
        """Whether a commit record is there: a commit of several groups under way."""
        base = self.root_path / spec.COMMITS
        return base.is_dir() and not base.is_symlink() and any(base.glob("*.json"))

    def _swapping(self, path: str) -> bool:
        """Whether the group at `path` is between the two renames of a replace (parked in
        `_trash` under its own name, `Committing._swap_in`)."""
        base = self.root_path / spec.TRASH
        quoted = urllib.parse.quote(path, safe="")
        return base.is_dir() and any(e.name.endswith("." + quoted) for e in base.iterdir())

    def _snapshot(self) -> Snapshot:
        """The open unit's snapshot, else this thread's loose one."""
        snap = getattr(self._local, "snap", None)
        if snap is None:
            snap = getattr(self._local, "loose", None)
            if snap is None:
                snap = self._local.loose = Snapshot(strict=False)
        return snap

    @contextlib.contextmanager
    def snapshot(self, snap: Snapshot | None = None) -> Iterator[Snapshot]:
        """A unit of reads (in this thread) that sees one consistent state, or raises
        SnapshotChanged; nested in an open unit it is part of it. `snap`: continue that one."""
        outer = getattr(self._local, "snap", None)
        if outer is not None:
            yield outer
            return
        self._local.snap = snap if snap is not None else Snapshot()
        try:
            yield self._local.snap
        finally:
            self._local.snap = None

    def _current_commit(self, path: str) -> Commit:
        """The commit of the group's current version, for a writer (nothing pinned)."""
        if self._stamp(path) is None:
            return NONE
        try:
            group = zarr.open_group(self._zstore(True), path=path, mode="r")
            generation = group.attrs.get(spec.GENERATION)
            if generation is not None:
                group = zarr.open_group(self._zstore(True), path=f"{path}/{generation}", mode="r")
            return Commit.of(group.attrs)
        except Exception:  # damaged: it requires nothing of the new version
            return NONE

    def _committed_here(self, paths: list[str]) -> None:
        """This thread committed `paths`: its snapshots forget them (`Snapshot.forget`)."""
        for name in ("snap", "loose"):
            snap = getattr(self._local, name, None)
            if snap is not None:
                snap.forget(paths)

    def consistently(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` as one unit of reads, run again while a commit lands in between
        (`snapshot.retrying`); inside an open unit, simply called (the outer one retries)."""
        if getattr(self._local, "snap", None) is not None:
            return fn(*args, **kwargs)

        def once() -> T:
            with self.snapshot():
                return fn(*args, **kwargs)

        return retrying(once, self.where)

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
                put_group(StorePath(zarr.storage.LocalStore(self.root_path / sub)), {})

    def group(self, path: str, what: str) -> zarr.Group:
        """The group at `path` to read; a committed generation where the group names one.
        Pinned in the reader's snapshot (`featstore.store.snapshot`): a group of another commit
        than the groups read with it is a SnapshotChanged, which the unit's retry answers."""
        snap = self._snapshot()
        stamp = self._stamp(path)
        if stamp is None:
            snap.missing(path, self._pending, self._swapping(path))
            raise FeatstoreError(f"{what} not in store {self.where} (missing {path}/zarr.json)")
        try:
            group = zarr.open_group(self._zstore(True), path=path, mode="r")
            generation = group.attrs.get(spec.GENERATION)
            if generation is not None:  # a store at a URL: see featstore/store/url.py
                group = zarr.open_group(self._zstore(True), path=f"{path}/{generation}", mode="r")
            commit = Commit.of(group.attrs)
        except Exception as exc:
            if self._stamp(path) != stamp:  # replaced while being opened
                raise SnapshotChanged(f"{path} was replaced while being read") from None
            raise FeatstoreError(f"{what}: corrupt {path}/zarr.json: {exc}") from None
        snap.pin(path, group.path, stamp, commit)
        return group

    def read_array(
        self, group: zarr.Group, name: str, what: str, sel: slice = slice(None)
    ) -> np.ndarray:
        """`group[name][sel]`, refused (one line naming it) where damaged: unreadable, a
        checksum that fails, a deleted chunk (`encodings.check_read`). The group's stamp is
        compared again after the read: arrays of two versions are never combined."""
        where = f"{group.path}/{name}"
        snap = self._snapshot()
        try:
            array = group[name]
            values = np.asarray(array[sel])
            problem = encodings.check_read(array, values, sel)
        except Exception as exc:
            snap.verify(group.path, self._stamp)  # a replaced group is no damage
            raise FeatstoreError(f"{what}: cannot read {where} in {self.where}: {exc}") from None
        snap.verify(group.path, self._stamp)
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

    @_unit
    def info(self, layer: int, shard: str) -> dict[str, Any]:
        """The attributes of one (layer, shard) group."""
        return dict(self._activation_group(layer, shard).attrs)

    @_unit
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
        self,
        layer: int,
        shard: str,
        block_tokens: int = spec.TOKEN_CHUNK,
        snapshot: Snapshot | None = None,
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first token, CSR block) over a shard, memory bounded by one block. Every block is
        of the version the first was (a change is SnapshotChanged): `snapshot`, shared by the
        streams of several layers of a shard, keeps them of one commit too; an open unit of
        reads does both."""
        snap = snapshot if snapshot is not None else Snapshot()
        with self.snapshot(snap):
            n_rows = self.info(layer, shard)[spec.SHAPE][0]
        for start in range(0, max(n_rows, 1), block_tokens):
            with self.snapshot(snap):
                block = self.read(layer, shard, start, start + block_tokens)
            yield start, block

    @_unit
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

    @_unit
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

    @_unit
    def tokens(self, shard: str) -> pl.DataFrame:
        what = f"token table of shard {shard}"
        group = self.encoded(spec.tokens_path(shard), what, spec.TOKEN_TABLE)
        columns = {c: self.read_array(group, c, what) for c in ("seq", "pos", "token")}
        n_tokens = group.attrs.get("n_tokens", columns["seq"].size)
        problem = encodings.token_problem(columns)
        if problem or columns["seq"].size != n_tokens:
            raise self.corrupt(what, group.path, problem or f"not {n_tokens} rows")
        return pl.DataFrame(columns)

    @_unit
    def sequences(self, shard: str) -> np.ndarray:
        """A shard's token ids as (sequences, seq_len), from its token table."""
        table = self.tokens(shard)
        group = self.group(spec.tokens_path(shard), f"token table of shard {shard}")
        recorded = group.attrs.get("seq_len", 0)
        if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 0:
            raise FeatstoreError(f"token table of shard {shard}: bad seq_len {recorded!r}")
        seq_len = recorded or (int(table["pos"].max()) + 1 if table.height else 1)
        if table.height % seq_len:
            raise FeatstoreError(
                f"shard {shard}: {table.height} tokens are not whole sequences of {seq_len} "
                "(the model-side analyses patch whole sequences)"
            )
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

    @_unit
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
        """Remove a shard's tokens, activations and pair statistics, in one commit; returns what
        went."""
        paths = [spec.activation_path(layer, shard) for layer in self.layers()]
        paths += [f"{spec.PAIRS}/{p}/{shard}" for p in self.children(spec.PAIRS)]
        paths.append(spec.tokens_path(shard))
        removed = [path for path in paths if self._exists(path)]
        with self.transaction() as txn:  # one commit: never a shard half deleted
            for path in removed:
                txn.delete(path)
        return removed
