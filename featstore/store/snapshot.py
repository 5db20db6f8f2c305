"""Reading one consistent state of a store while writers commit (docs/STORE_FORMAT.md,
"Reading: all at once").

A commit swaps its groups in one after another (renames, or generation pointers at a URL), so a
reader that reads a shard's token table and then a layer could see one new and one old. Readers
take no lock; they check instead (optimistically, which works at a URL too):

- every group a commit writes carries `featstore-commit` (`Commit`): the commit's id, larger than
  the id of every version it replaces (`next_id`), `after`, the ids that the other groups of the
  shard it touched or depends on (the token table) must have at least, and `gone`, the groups it
  deletes;
- a `Snapshot` pins each group a reader opens to its stamp (the bytes of its `zarr.json`, which a
  commit always rewrites) and its `Commit`. A group seen twice with another stamp, or two groups
  of which one is older than the other's commit requires (`behind`), or a group missing that a
  pinned one requires, mean a commit landed in between: `SnapshotChanged`;
- after reading a group's arrays the reader compares its stamp again, so arrays of two versions of
  one group are never combined.

`Store.consistently(fn)` runs `fn` in a fresh snapshot and runs it again when one changed; each
public read method of `Store` does so on its own when no snapshot is open, so a single call is
always one state, and a unit of several calls (a shard's token table and its layers) is one state
inside `Store.snapshot()` / `Store.consistently`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from featstore.errors import FeatstoreError

COMMIT = "featstore-commit"  # group attribute: {"id": int, "after": {path: id}, "gone": [path]}
TRIES = 60  # attempts of `retrying` before giving up
PAUSE = 0.005  # s, the first pause between attempts; doubled up to MAX_PAUSE
MAX_PAUSE = 0.25  # s: a commit's swaps take milliseconds, so ~10 s of tries in all

T = TypeVar("T")


class SnapshotChanged(FeatstoreError):
    """A commit landed while a unit of reads was under way: run it again (`retrying`)."""


@dataclass(frozen=True)
class Commit:
    """What a group version says about the commit that wrote it (id 0: written before spec
    version 4, or by no commit: it requires nothing)."""

    id: int = 0
    after: Mapping[str, int] = field(default_factory=dict)
    gone: frozenset[str] = frozenset()

    @staticmethod
    def of(attrs: Mapping[str, Any]) -> Commit:
        raw = attrs.get(COMMIT)
        if raw is None:
            return NONE
        try:
            after = {str(p): int(i) for p, i in dict(raw.get("after", {})).items()}
            commit = Commit(int(raw["id"]), after, frozenset(str(p) for p in raw.get("gone", [])))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise FeatstoreError(f"bad {COMMIT} attribute {raw!r}") from None
        if commit.id < 0 or any(i < 0 for i in after.values()):
            raise FeatstoreError(f"bad {COMMIT} attribute {raw!r}")
        return commit

    def attribute(self) -> dict[str, Any]:
        return {"id": self.id, "after": dict(sorted(self.after.items())), "gone": sorted(self.gone)}


NONE = Commit()


def shard_of(path: str) -> str:
    """The shard a group path belongs to (its last name: tokens/s, activations/layer_6/s,
    pairs/6-7/s); groups of no shard (vocab) are their own."""
    return path.rsplit("/", 1)[-1] if "/" in path else f"/{path}"


def next_id(previous: Iterable[int]) -> int:
    """A commit id: the time in ns, and above every id it replaces (clocks may disagree)."""
    return max([time.time_ns(), *(i + 1 for i in previous)])


def stamp(written: Iterable[str], gone: Iterable[str], depends: Mapping[str, int], id_: int):
    """Each written group's `Commit`: `after` names the other groups of its shard written in the
    same commit (at `id_`) and the groups it depends on (at their current ids), `gone` the groups
    of its shard the commit deletes."""
    written, gone = list(written), list(gone)
    out = {}
    for path in written:
        shard = shard_of(path)
        after = {p: id_ for p in written if p != path and shard_of(p) == shard}
        after |= {p: i for p, i in depends.items() if shard_of(p) == shard and p not in after}
        out[path] = Commit(id_, after, frozenset(p for p in gone if shard_of(p) == shard))
    return out


def behind(path: str, commit: Commit, other: str, other_commit: Commit) -> bool:
    """Whether `other` (at `other_commit`) is older than `commit` of `path` requires: a version
    before the commit that rewrote it, or still there though the commit deleted it."""
    need = commit.after.get(other)
    if need is not None and other_commit.id < need:
        return True
    return other in commit.gone and other_commit.id < commit.id


class Snapshot:
    """The groups a unit of reads has seen, each pinned to its stamp and commit. A loose
    snapshot (reads outside any unit) only compares a group's stamp after its arrays are read."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.pins: dict[str, dict[str, tuple[bytes, Commit]]] = {}  # shard -> path -> pin
        self.paths: dict[str, str] = {}  # zarr group path (a generation at a URL) -> group path

    def pin(self, path: str, zarr_path: str, stamp: bytes, commit: Commit) -> None:
        group = self.pins.setdefault(shard_of(path), {})
        if self.strict:
            seen = group.get(path)
            if seen is not None and seen[0] != stamp:
                raise SnapshotChanged(f"{path} was replaced while being read")
            for other, (_, other_commit) in group.items():
                if other != path and (
                    behind(path, commit, other, other_commit)
                    or behind(other, other_commit, path, commit)
                ):
                    raise SnapshotChanged(f"{path} and {other} are of different commits")
        group[path] = (stamp, commit)
        self.paths[zarr_path] = path

    def missing(self, path: str, pending: Callable[[], bool], swapping: bool = False) -> None:
        """`path` is not there: between the two renames of its replace (`swapping`), or not yet
        put in by a pinned group's commit, if a commit is under way (`pending`: a commit record
        is there); else a later commit deleted it, which is a state like any other."""
        if not self.strict:
            return
        if swapping:
            raise SnapshotChanged(f"{path} is being replaced")
        for other, (_, commit) in self.pins.get(shard_of(path), {}).items():
            if path in commit.after and pending():
                raise SnapshotChanged(f"{path} missing, which {other} was committed with")

    def verify(self, zarr_path: str, current: Callable[[str], bytes | None]) -> None:
        """After reading arrays of a group: its stamp is still the pinned one."""
        path = self.paths.get(zarr_path)
        if path is None:
            return
        pinned = self.pins[shard_of(path)][path][0]
        if current(path) != pinned:
            raise SnapshotChanged(f"{path} was replaced while being read")

    def forget(self, paths: Iterable[str]) -> None:
        """Unpin groups this thread has just committed itself: reading them again is not a
        change under the reader's feet."""
        gone = set(paths)
        for path in gone:
            self.pins.get(shard_of(path), {}).pop(path, None)
        self.paths = {z: p for z, p in self.paths.items() if p not in gone}


def check_listing(commits: Mapping[str, Commit], pending: bool) -> None:
    """Groups listed together (each group path -> its commit) are one state, else
    SnapshotChanged: what `featstore sql` lists from the files alone. A group missing that one
    of them was committed with counts only while a commit is `pending` (`Snapshot.missing`)."""
    snap = Snapshot()
    for path, commit in commits.items():
        snap.pin(path, path, b"", commit)
    for path, commit in commits.items():
        for other in commit.after if pending else ():
            if other not in commits and other.split("/", 1)[0] in LISTED:
                raise SnapshotChanged(f"{other} missing, which {path} was committed with")


LISTED = ("tokens", "activations")  # the trees a listing for `featstore sql` covers


def retrying(run: Callable[[], T], what: str = "the store") -> T:
    """`run()`, again while it raises SnapshotChanged (a commit landed in between), with
    growing pauses; a one-line error after `TRIES` attempts."""
    pause = PAUSE
    for _ in range(TRIES - 1):
        try:
            return run()
        except SnapshotChanged:
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)
    try:
        return run()
    except SnapshotChanged as exc:
        raise SnapshotChanged(
            f"{what} kept changing while being read ({TRIES} tries; last: {exc}): run again"
        ) from None
