"""Groups made visible together, and what a killed writer left put right.

`Committing` is the part of `Store` that commits: `Store.transaction()` stages every group an
operation writes (`Transaction`), then commits them as one: a record naming them all is written
whole (the commit point), each staged group is swapped in, the record is removed
(`_commit_all`). Opening a store rolls a left record forward and clears the `_staging` and
`_trash` entries of dead writers (`_recover`), validating every path the store's own
bookkeeping names so that nothing outside the store is touched. `align_shards` keeps a shard's
layers on the rows of its token table. `featstore.store.url` overrides the backend steps
(generations instead of renames); docs/STORE_FORMAT.md, "Writing: never half-visible".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zarr
import zarr.core.sync
import zarr.storage
from zarr.storage import StorePath

from featstore.errors import FeatstoreError, StoreBusyError
from featstore.files import atomic_file, writing
from featstore.store import spec
from featstore.store.snapshot import COMMIT, Commit, next_id, shard_of, stamp
from featstore.store.writers import GroupWriter

if TYPE_CHECKING:
    from featstore.store.local import Store

DELETE = "-"  # a commit record's staging name for a group the commit deletes


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


class Committing:
    """The commit and recovery steps of `Store` on a local folder (a mixin: `self` is a Store)."""

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

    def _open_staging(self, path: str, staging: Path) -> StorePath:
        """Where the staged group's nodes go (written by its `GroupWriter`)."""
        return StorePath(zarr.storage.LocalStore(staging))

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


class Transaction:
    """The groups staged in one `Store.transaction`: each under its group lock until the end."""

    def __init__(self, store: Store, locks: contextlib.ExitStack, lock_timeout: float) -> None:
        self.store, self.locks, self.lock_timeout = store, locks, lock_timeout
        self.staged_groups: dict[str, tuple[Any, GroupWriter]] = {}
        self.entries: list[tuple[str, Any]] = []  # everything staged, for `discard`
        self.deleted: list[str] = []  # groups this commit deletes (`delete`)

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
            writer = GroupWriter(store._open_staging(path, staging), path)
        with writing(path):
            yield writer
        with writing(path):
            writer.flush()
        self.staged_groups[path] = (staging, writer)

    def delete(self, path: str) -> None:
        """Delete the group at `path` in this commit (under its lock; nothing if not there)."""
        if path in self.staged_groups or path in self.deleted:
            raise FeatstoreError(f"{path} is written twice in one operation")
        self.locks.enter_context(self.store.lock(path, self.lock_timeout))
        self.deleted.append(path)

    def commit(self) -> None:
        store = self.store
        with writing(", ".join(self.staged_groups) or "nothing"):
            removed = align_shards(store, self.staged_groups)
            for path in removed:
                if path not in self.deleted:  # those are locked already
                    self.locks.enter_context(store.lock(path, self.lock_timeout))
            removed += [path for path in self.deleted if path not in removed]
            commits = self.commits(removed)
            for path, (_, writer) in self.staged_groups.items():
                # The group's zarr.json last, once, with every attribute: their presence is part
                # of what makes a group complete.
                writer.write_attributes({**writer.attrs, COMMIT: commits[path].attribute()})
            for path in self.staged_groups:
                # Parents only now: a write that fails leaves no empty group behind.
                store._ensure_parents(path)
            entries = [(path, st) for path, (st, _) in self.staged_groups.items()]
            self.entries = []  # from here on `_commit_all` owns them: it discards or commits
            store._commit_all(entries + [(path, None) for path in removed])
        store._committed_here([*self.staged_groups, *removed])

    def commits(self, removed: list[str]) -> dict[str, Commit]:
        """Each written group's `featstore-commit` (`snapshot.stamp`): an id above every version
        it replaces, the shard's other groups of this commit, the token table it was written
        against, the groups it deletes (docs/STORE_FORMAT.md, "Reading: all at once")."""
        store, written = self.store, list(self.staged_groups)
        touched = set(written) | set(removed)
        depends = {}
        for shard in {shard_of(p) for p in written if "/" in p}:
            table = spec.tokens_path(shard)
            if table not in touched:
                depends[table] = store._current_commit(table).id
        previous = [store._current_commit(p).id for p in touched] + list(depends.values())
        live = {p: i for p, i in depends.items() if i > 0}  # 0: a table that requires nothing
        return stamp(written, removed, live, next_id(previous))

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
            writer.attrs = {spec.ROWS_HASH: digest, **writer.attrs}  # first, as it was written
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
