"""`featstore check`: verify a whole store against docs/STORE_FORMAT.md and list every problem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from featstore.errors import FeatstoreError
from featstore.store import encodings, spec
from featstore.store.local import FeatureStats, Store
from featstore.store.snapshot import Commit, SnapshotChanged, check_listing, shard_of
from featstore.store.sqlindex import check_index


def check_store(store: Store) -> list[str]:
    """Every problem found, one line each, naming layer, shard and file; empty when sound."""
    problems: list[str] = list(_unreadable_folders(store))
    token_rows: dict[str, int] = {}
    for shard in store.token_shards():
        problems += _guard(f"token table {shard}", _check_tokens, store, shard, token_rows)
    for layer in store.layers():
        d_saes: set[int] = set()
        for shard in store.shards(layer):
            where = f"layer {layer} shard {shard}"
            problems += _guard(where, _check_csr, store, layer, shard, token_rows, d_saes)
        if len(d_saes) > 1:
            problems.append(f"layer {layer}: shards disagree on d_sae {sorted(d_saes)}")
    used = {shard for layer in store.layers() for shard in store.shards(layer)}
    problems += [
        f"token table {shard}: no layer has shard {shard} (an orphan; `featstore ingest` of the "
        f"shard replaces it)"
        for shard in sorted(set(token_rows) - used)
    ]
    for folder in store.children(spec.PAIRS):
        for shard in store.children(f"{spec.PAIRS}/{folder}"):
            where = f"pair sums {folder} shard {shard}"
            problems += _guard(where, _check_pairs, store, folder, shard)
    problems += list(_check_commits(store))
    problems += _guard("SQL index", check_index, store)
    return problems + list(_check_parquet(store))


def _check_commits(store: Store) -> Iterator[str]:
    """Each shard's groups are of one state (docs/STORE_FORMAT.md, "Reading: all at once"): on
    a store no writer is writing, a group behind what another's commit requires is damage (or
    a crafted attribute), and every reader of the shard would give up on it."""
    paths = [spec.tokens_path(s) for s in store.token_shards()]
    paths += [spec.activation_path(x, s) for x in store.layers() for s in store.shards(x)]
    paths += [f"{spec.PAIRS}/{f}/{s}" for f in store.children(spec.PAIRS)
              for s in store.children(f"{spec.PAIRS}/{f}")]  # fmt: skip
    by_shard: dict[str, dict[str, Commit]] = {}
    for path in paths:
        by_shard.setdefault(shard_of(path), {})[path] = store._current_commit(path)
    for shard, commits in sorted(by_shard.items()):
        try:
            check_listing(commits, pending=False)  # recovered on open: none pending
        except SnapshotChanged as exc:
            yield f"shard {shard}: its groups are not of one commit ({exc}); rewrite the shard"


# Folders that hold groups; one without its zarr.json is invisible to every reader.
GROUP_FOLDERS = ("*", f"{spec.ACTIVATIONS}/*", f"{spec.ACTIVATIONS}/*/*", f"{spec.TOKENS}/*",
                 f"{spec.PAIRS}/*", f"{spec.PAIRS}/*/*")  # fmt: skip


def _unreadable_folders(store: Store) -> Iterator[str]:
    if not store.local:  # object storage has no folders, only keys; a group is its zarr.json
        return
    for pattern in GROUP_FOLDERS:
        for folder in sorted(store.root_path.glob(pattern)):
            hidden = folder.name in (spec.STAGING, spec.TRASH, spec.COMMITS)
            if folder.is_dir() and not hidden and not (folder / "zarr.json").exists():
                path = folder.relative_to(store.root_path).as_posix()
                yield f"{path}: missing {path}/zarr.json, so readers skip this folder"


def _guard(where: str, check: Callable[..., Iterator[str]], *args: Any) -> list[str]:
    try:  # one commit's groups (args[0] is the store)
        return args[0].consistently(lambda: list(check(*args)))
    except FeatstoreError as exc:
        return [str(exc)]
    except Exception as exc:  # a damaged file can fail anywhere inside zarr or numcodecs
        return [f"{where}: unreadable ({type(exc).__name__}: {exc})"]


def _check_tokens(store: Store, shard: str, rows: dict[str, int]) -> Iterator[str]:
    rows[shard] = store.tokens(shard).height  # its values are checked as it is read
    yield from ()


def _check_csr(
    store: Store, layer: int, shard: str, token_rows: dict[str, int], d_saes: set[int]
) -> Iterator[str]:
    where = f"layer {layer} shard {shard} ({spec.activation_path(layer, shard)})"
    attrs = store.info(layer, shard)  # an unknown encoding or bad attributes raise here
    n_tokens, d_sae = attrs[spec.SHAPE]
    d_saes.add(d_sae)
    group = store.group(spec.activation_path(layer, shard), where)
    indptr = store.read_array(group, "indptr", where)
    nnz = group["data"].shape[0]
    if indptr.shape != (n_tokens + 1,):
        yield f"{where}: indptr has {indptr.size} entries, shape says {n_tokens + 1}"
    elif indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != nnz:
        yield f"{where}: indptr is not monotone from 0 to nnz {nnz}"
    if group["indices"].shape[0] != nnz or attrs.get("nnz") != nnz:
        yield f"{where}: data, indices and attrs disagree on nnz"
    if token_rows.get(shard) != n_tokens:
        yield f"{where}: {n_tokens} rows but token table has {token_rows.get(shard)}"
    digest = attrs.get(spec.ROWS_HASH)
    if digest is not None and shard in token_rows and digest != store.rows_hash(shard):
        yield f"{where}: written for another token table than tokens/{shard} (out of line)"
    counts = np.zeros(d_sae, np.int64)
    for _, block in store.iter_blocks(layer, shard):  # each block checked as it is read
        counts += FeatureStats.of(block).count
    if not np.array_equal(counts, store.feature_stats(layer, shard).count):
        yield f"{where}: feature_count does not match the data"


def _check_pairs(store: Store, folder: str, shard: str) -> Iterator[str]:
    path = f"{spec.PAIRS}/{folder}/{shard}"
    where = f"pair sums {folder} shard {shard} ({path})"
    group = store.encoded(path, where, spec.PAIR_STATS)
    d_a, d_b = int(group.attrs["d_a"]), int(group.attrs["d_b"])
    arrays = {name: store.read_array(group, name, where) for name in encodings.PAIR_GROUP_ARRAYS}
    problem = encodings.pair_problem(arrays, d_a, d_b)
    if problem:
        yield f"{where}: {problem}"
        return
    fa, fb, indptr = arrays["feature_a"], arrays["feature_b"], arrays["indptr"]
    if np.any(np.diff(fa.astype(np.int64) * d_b + fb) <= 0):
        yield f"{where}: pairs not sorted and unique by (feature_a, feature_b)"
    if indptr.shape != (d_a + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        yield f"{where}: indptr is not monotone from 0 over d_a + 1 = {d_a + 1} entries"
    elif not np.array_equal(np.diff(indptr), np.bincount(fa, minlength=d_a)):
        yield f"{where}: indptr does not match feature_a"


PARQUET_KEYS = ("feature_a", "feature_b")  # what every derived pair table holds


def _check_parquet(store: Store) -> Iterator[str]:
    """Each merged `pair_stats/*.parquet` must read whole, with its key columns."""
    for path in sorted((store.home / spec.PAIR_STATS_DIR).glob("*.parquet")):
        where = f"{spec.PAIR_STATS_DIR}/{path.name}"
        try:
            table = pq.ParquetFile(path)
            missing = set(PARQUET_KEYS) - set(table.schema_arrow.names)
            for i in range(table.num_row_groups):  # every page decoded: checksums, lengths
                table.read_row_group(i)
        except Exception as exc:
            yield f"{where}: not a readable Parquet file ({type(exc).__name__}: {exc})"
            continue
        if missing:
            yield f"{where}: lacks columns {sorted(missing)}"
