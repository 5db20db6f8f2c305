"""A store whose Zarr hierarchy lives at an fsspec URL (S3, GCS, ...), shared by many machines.

Object stores have no rename, so a group is not swapped in by renaming a staged folder (as in
`Store`). Each write goes to a fresh generation `{path}/_gen-{hex}/` and is committed by one
PUT of the group's own `{path}/zarr.json`, whose only attribute names that generation. A reader
sees the old generation or the new one, never a mix; two writers of the same group never write
the same object (each has its own generation; the last commit wins). A generation's name starts
with the time it was begun; a committing writer deletes the generations other than its own and
the previous one that were begun more than `stale_after` seconds ago (superseded ones, and ones
whose writer died), never one a live writer may still be writing or a reader still reading.
Locks are the local ones of `Store`: they keep writers on one machine apart; across machines
the pipeline's partitions do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import zarr
import zarr.core.sync
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, StorePath

from featstore.errors import FeatstoreError
from featstore.files import writing
from featstore.store import spec
from featstore.store.local import DELETE, Store


def storage_options_from_env() -> dict[str, Any]:
    """fsspec options from `$FEATSTORE_STORAGE_OPTIONS` (JSON), e.g. an S3 endpoint_url."""
    raw = os.environ.get(spec.STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FeatstoreError(f"${spec.STORAGE_OPTIONS_ENV} is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise FeatstoreError(f"${spec.STORAGE_OPTIONS_ENV} must be a JSON object")
    return options


def _sync(coroutine: Any) -> Any:
    return zarr.core.sync.sync(coroutine)


class UrlStore(Store):
    """`Store` with its Zarr hierarchy at `url`; `home` (local) keeps locks and derived files."""

    local = False
    stale_after = spec.GENERATION_STALE_AFTER  # far longer than writing one group takes

    def __init__(
        self,
        home: Path,
        url: str,
        *,
        create: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.home = home
        self.url = url.rstrip("/")
        self.where = self.url
        self.storage_options = (
            storage_options if storage_options is not None else storage_options_from_env()
        )
        self._zstores: dict[bool, FsspecStore] = {}
        try:
            self._open_root(create)
        except FeatstoreError:
            raise
        except Exception as exc:  # no bucket, no credentials, no server, no fsspec backend
            raise FeatstoreError(
                f"cannot open store {self.url}: {type(exc).__name__}: {exc}"
            ) from None

    # -- where things are ----------------------------------------------------------------------

    def _zstore(self, read_only: bool = False) -> FsspecStore:
        if read_only not in self._zstores:
            self._zstores[read_only] = FsspecStore.from_url(
                self.url, storage_options=dict(self.storage_options), read_only=read_only
            )
        return self._zstores[read_only]

    def location(self, path: str) -> str:
        return f"{self.url}/{path}"

    def _exists(self, path: str) -> bool:
        return bool(_sync(self._zstore(True).exists(_key(path, "zarr.json"))))

    def _swapping(self, path: str) -> bool:
        return False  # a generation is put in by one PUT: never between two states

    def _pending(self) -> bool:
        return bool(_sync(_listing(self._zstore(True), spec.COMMITS)))

    def _stamp(self, path: str) -> bytes | None:
        """The bytes of a group's zarr.json: its pointer, which names the generation."""
        try:
            raw = _sync(self._zstore(True).get(_key(path, "zarr.json"), default_buffer_prototype()))
        except FileNotFoundError:
            return None
        return None if raw is None else raw.to_bytes()

    def _create_root(self) -> None:
        self._put_group("", {spec.FEATSTORE_VERSION: spec.SPEC_VERSION})

    def _recover(self) -> None:
        """An uncommitted generation is invisible and goes at the next write; a commit record
        (`_commit_all`) a killed writer left is rolled forward."""
        for name in _sync(_listing(self._zstore(True), spec.COMMITS)):
            key = _key(spec.COMMITS, name)
            entries = self._record(key)
            if entries is not None:
                self._apply(entries)
            with contextlib.suppress(FileNotFoundError):
                _sync(self._zstore().delete(key))

    def _record(self, key: str) -> list[tuple[str, str | None]] | None:
        """The validated (group path, generation or None to delete) pairs of a commit record."""
        try:
            raw = _sync(self._zstore(True).get(key, default_buffer_prototype()))
            entries = [(str(p), None if g == DELETE else str(g))
                       for p, g in json.loads(raw.to_bytes())["entries"]]  # fmt: skip
        except Exception:  # unreadable: nothing to roll forward
            return None
        ok = all(
            spec.group_path_ok(p) and (g is None or spec.GENERATION_NAME.fullmatch(g))
            for p, g in entries
        )
        return entries if ok else None

    def _write_record(self, entries: list[list[str]]) -> str:
        """A commit record (`Store._commit_all`) in one PUT, the commit point: each group's new
        generation, or "-" for a group deleted; the next open rolls a left one forward."""
        key = _key(spec.COMMITS, f"{uuid.uuid4().hex}.json")
        body = json.dumps({"entries": entries}).encode()
        _sync(self._zstore().set(key, default_buffer_prototype().buffer.from_bytes(body)))
        return key

    def _remove_record(self, record: str) -> None:
        _sync(self._zstore().delete(record))

    def _apply(self, entries: list[tuple[str, Any]]) -> None:
        """Point each group at its generation; delete the groups whose generation is None."""
        for path, generation in entries:
            if generation is None:
                if self._exists(path):
                    _sync(self._zstore().delete(_key(path, "zarr.json")))
                    self._delete_prefix(path)
            elif self._committed(path) != generation:
                self._commit(path, generation)

    def children(self, path: str) -> list[str]:
        names = _sync(_listing(self._zstore(True), path))
        names = [n for n in names if spec.name_ok(n)]  # never _gen-*, _staging, odd names
        found = _sync(_all_exist(self._zstore(True), [_key(path, n, "zarr.json") for n in names]))
        return sorted(n for n, ok in zip(names, found, strict=True) if ok)

    # -- writing -------------------------------------------------------------------------------

    def _new_staging(self, path: str) -> str:
        """A fresh generation's name: the time it was begun (hex seconds), then random hex."""
        return f"{spec.GENERATION_PREFIX}{int(time.time()):010x}-{uuid.uuid4().hex}"

    def _open_staging(self, path: str, generation: str) -> StorePath:
        """The generation's place, its group written at once (it is there from its start)."""
        zarr.open_group(self._zstore(), path=f"{path}/{generation}", mode="w", zarr_format=3)
        return StorePath(self._zstore(), f"{path}/{generation}")

    def _commit(self, path: str, generation: str) -> None:
        previous = self._committed(path)
        self._put_group(path, {spec.GENERATION: generation})
        # Best effort: what a failed clean-up leaves, the next write of the group removes.
        with contextlib.suppress(Exception):
            self._drop_generations(path, keep={generation, previous})

    def _discard(self, path: str, generation: str) -> None:
        self._delete_prefix(f"{path}/{generation}")

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self._exists(sub):
                self._put_group(sub, {})

    def delete_group(self, path: str, lock_timeout: float = 0.0) -> bool:
        """Remove a group: its zarr.json first, so it is never seen half-deleted."""
        if not self._exists(path):
            return False
        with self.lock(path, lock_timeout), writing(self.location(path)):
            _sync(self._zstore().delete(_key(path, "zarr.json")))
            self._delete_prefix(path)
        return True

    def _committed(self, path: str) -> str | None:
        if not self._exists(path):
            return None
        return zarr.open_group(self._zstore(True), path=path, mode="r").attrs.get(spec.GENERATION)

    def _put_group(self, path: str, attributes: dict[str, Any]) -> None:
        """Write a group's zarr.json in one PUT: the commit point of a generation."""
        meta = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
        buffer = default_buffer_prototype().buffer.from_bytes(json.dumps(meta).encode())
        _sync(self._zstore().set(_key(path, "zarr.json"), buffer))

    def _drop_generations(self, path: str, keep: set[str | None]) -> None:
        for name in _sync(_listing(self._zstore(True), path)):
            if name.startswith(spec.GENERATION_PREFIX) and name not in keep:
                if _begun(name) < time.time() - self.stale_after:
                    self._delete_prefix(f"{path}/{name}")

    def _delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            _sync(self._zstore().delete_dir(prefix))


def _begun(generation: str) -> float:
    """When a generation was begun (its name's first field, hex seconds); 0 if unreadable."""
    try:
        return float(int(generation[len(spec.GENERATION_PREFIX) :].split("-")[0], 16))
    except ValueError:
        return 0.0


def _key(*parts: str) -> str:
    return "/".join(p for p in parts if p)


async def _listing(store: FsspecStore, path: str) -> list[str]:
    try:
        return [name async for name in store.list_dir(path)]
    except FileNotFoundError:
        return []


async def _all_exist(store: FsspecStore, keys: list[str]) -> list[bool]:
    return list(await asyncio.gather(*(store.exists(k) for k in keys)))
