"""What the SQL index must hold: every committed group of a local store and its freshness stamp,
read from the groups' `zarr.json` files alone (no zarr import, so `featstore sql` starts fast).

A group's stamp hashes the bytes of its `zarr.json` (its attributes: shape, nnz and whatever
the store records at commit) and of the generation's `zarr.json` where it names one, together
with each file's identity (inode, size, modification time). A commit writes a new `zarr.json`
(a new file renamed into place, or a new generation), so any change of a group changes its
stamp, even one that keeps every attribute; a copied store gets new stamps and is re-indexed.
Names taken from the store's folders are validated before they become paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.snapshot import NONE, Commit, check_listing, retrying

if TYPE_CHECKING:
    from featstore.store.local import Store

MAX_METADATA = 1 << 20  # bytes: a group's zarr.json larger than this is not one featstore wrote


@dataclass(frozen=True)
class Group:
    """One committed group the index mirrors: `kind` "activations" (with its layer) or "tokens"."""

    kind: str
    layer: int | None
    shard: str
    path: str  # in the Zarr hierarchy
    stamp: str  # hex digest: changes whenever the group (or what it is joined to) changes
    rows: int  # rows the index holds: nonzeros, or token rows
    problem: str | None = None  # why its metadata cannot be read (then it is not indexed)
    commit: Commit = field(default=NONE, compare=False, hash=False)  # `featstore-commit`


def _metadata(root: Path, path: str) -> tuple[dict, list[bytes]]:
    """A group's attributes (its generation's where it names one) and what its stamp hashes."""
    parts: list[bytes] = []
    attrs: dict = {}
    where = path
    for _ in range(2):
        file = root / where / "zarr.json"
        try:
            info = os.stat(file)
            if info.st_size > MAX_METADATA:
                raise FeatstoreError(f"{where}/zarr.json in {root}: larger than {MAX_METADATA} B")
            raw = file.read_bytes()
            attrs = json.loads(raw).get("attributes", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise FeatstoreError(f"{where}/zarr.json in {root}: unreadable ({exc})") from None
        if not isinstance(attrs, dict):
            raise FeatstoreError(f"{where}/zarr.json in {root}: attributes are not an object")
        parts += [where.encode(), raw, f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode()]
        generation = attrs.get(spec.GENERATION)
        if generation is None:
            return attrs, parts
        if not isinstance(generation, str) or not spec.GENERATION_NAME.fullmatch(generation):
            raise FeatstoreError(f"{where}/zarr.json in {root}: bad generation {generation!r}")
        where = f"{path}/{generation}"
    raise FeatstoreError(f"{path}/zarr.json in {root}: a generation names another generation")


def _count(attrs: dict, key: str, where: str) -> int:
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise FeatstoreError(f"{where}: attribute {key} is {value!r}, not a count")
    return value


def _folders(base: Path, ok: Callable[[str], bool]) -> list[str]:
    """Names of the committed groups (folders with a zarr.json) in `base` that are `ok`."""
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if ok(p.name) and (p / "zarr.json").is_file())


def _layer_folder(name: str) -> bool:
    found = spec.LAYER_FOLDER.fullmatch(name)
    return found is not None and int(found[1]) <= spec.MAX_LAYER


def catalog(root: Path) -> list[Group]:
    """Every activation and token group of the local store at `root`, with stamps: of one
    state, listed again while a commit is half swapped in (`snapshot.check_listing`)."""
    return retrying(lambda: _consistent(root, _catalog(root)), str(root))


def _consistent(root: Path, groups: list[Group]) -> list[Group]:
    pending = (root / spec.COMMITS).is_dir() and any((root / spec.COMMITS).glob("*.json"))
    check_listing({g.path: g.commit for g in groups if g.problem is None}, pending)
    return groups


def _catalog(root: Path) -> list[Group]:
    groups: list[Group] = []
    token_parts: dict[str, list[bytes]] = {}
    vocab = _metadata(root, spec.VOCAB)[1] if (root / spec.VOCAB / "zarr.json").is_file() else []
    for shard in _folders(root / spec.TOKENS, spec.name_ok):
        group, token_parts[shard] = _group(root, "tokens", None, shard, vocab)
        groups.append(group)
    for folder in _folders(root / spec.ACTIVATIONS, _layer_folder):
        layer = int(folder.removeprefix("layer_"))
        for shard in _folders(root / spec.layer_group(layer), spec.name_ok):
            joined = token_parts.get(shard, [b"no token table"])
            groups.append(_group(root, "activations", layer, shard, joined)[0])
    return groups


def _group(
    root: Path, kind: str, layer: int | None, shard: str, joined: list[bytes]
) -> tuple[Group, list[bytes]]:
    """A group and its own stamp parts; `joined`: those of what its index rows are joined to."""
    if kind == "tokens":
        path, rows_key = spec.tokens_path(shard), "n_tokens"
    else:
        path, rows_key = spec.activation_path(layer, shard), "nnz"
    try:
        attrs, parts = _metadata(root, path)
        rows = _count(attrs, rows_key, path)
        commit = Commit.of(attrs)
    except FeatstoreError as exc:
        return Group(kind, layer, shard, path, "", 0, str(exc)), []
    return Group(kind, layer, shard, path, _digest(parts + joined), rows, None, commit), parts


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def restamp(store: Store, group: Group) -> Group:
    """`group` with its stamp as the store has it now (one group's files, not the catalog)."""
    if not store.local:
        found = [g for g in store_catalog(store) if _key(g) == _key(group)]
        return found[0] if found else _gone(group)
    root = store.root_path
    vocab = _metadata(root, spec.VOCAB)[1] if (root / spec.VOCAB / "zarr.json").is_file() else []
    if group.kind == "tokens":
        return _group(root, "tokens", None, group.shard, vocab)[0]
    tokens = root / spec.tokens_path(group.shard) / "zarr.json"
    joined = _group(root, "tokens", None, group.shard, vocab)[1] if tokens.is_file() else []
    return _group(root, "activations", group.layer, group.shard, joined or [b"no token table"])[0]


def _key(group: Group) -> tuple:
    return group.kind, group.layer, group.shard


def _gone(group: Group) -> Group:
    return Group(
        group.kind, group.layer, group.shard, group.path, "", 0, f"{group.path} left the store"
    )


def plain(root: Path) -> bool:
    """Whether the local store at `root` can be listed from its files alone: a root this
    featstore reads and no `_staging`/`_trash`/`_commits` entries awaiting recovery (else open
    the Store, which recovers them or rolls a commit forward, and reports what is wrong)."""
    try:
        version = json.loads((root / "zarr.json").read_bytes())["attributes"][
            spec.FEATSTORE_VERSION
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(version, int) or version > spec.SPEC_VERSION:
        return False
    return not any(
        (root / folder).is_dir() and any((root / folder).iterdir())
        for folder in (spec.STAGING, spec.TRASH, spec.COMMITS)
    )


def store_catalog(store: Store) -> list[Group]:
    """`catalog` of an open store; at a URL, stamps from each group's committed generation and
    attributes (a generation is written once, so its name changes with every commit)."""
    if store.local:
        return catalog(store.root_path)
    return store.consistently(_store_catalog, store)


def _store_catalog(store: Store) -> list[Group]:
    def parts(path: str, what: str) -> list[bytes]:
        group = store.group(path, what)
        return [group.path.encode(), json.dumps(dict(group.attrs), sort_keys=True).encode()]

    vocab = parts(spec.VOCAB, "vocabulary") if store.vocab() is not None else []
    groups, token_parts = [], {}
    for shard in store.token_shards():
        path = spec.tokens_path(shard)
        token_parts[shard] = parts(path, f"token table of shard {shard}")
        rows = _count(dict(store.group(path, path).attrs), "n_tokens", path)
        groups.append(Group("tokens", None, shard, path, _digest(token_parts[shard] + vocab), rows))
    for layer in store.layers():
        for shard in store.shards(layer):
            path = spec.activation_path(layer, shard)
            own = parts(path, f"layer {layer} shard {shard}")
            stamp = _digest(own + token_parts.get(shard, [b"no token table"]))
            rows = _count(store.info(layer, shard), "nnz", path)
            groups.append(Group("activations", layer, shard, path, stamp, rows))
    return groups
