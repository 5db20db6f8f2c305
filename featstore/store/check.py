"""`featstore check`: verify a whole store against docs/STORE_FORMAT.md and list every problem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.local import FeatureStats, Store
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
    for folder in store.children(spec.PAIRS):
        for shard in store.children(f"{spec.PAIRS}/{folder}"):
            where = f"pair sums {folder} shard {shard}"
            problems += _guard(where, _check_pairs, store, folder, shard)
    problems += _guard("SQL index", check_index, store)
    return problems


# Folders that hold groups; one without its zarr.json is invisible to every reader.
GROUP_FOLDERS = ("*", f"{spec.ACTIVATIONS}/*", f"{spec.ACTIVATIONS}/*/*", f"{spec.TOKENS}/*",
                 f"{spec.PAIRS}/*", f"{spec.PAIRS}/*/*")  # fmt: skip


def _unreadable_folders(store: Store) -> Iterator[str]:
    if not store.local:  # object storage has no folders, only keys; a group is its zarr.json
        return
    for pattern in GROUP_FOLDERS:
        for folder in sorted(store.root_path.glob(pattern)):
            hidden = folder.name in (spec.STAGING, spec.TRASH)
            if folder.is_dir() and not hidden and not (folder / "zarr.json").exists():
                path = folder.relative_to(store.root_path).as_posix()
                yield f"{path}: missing {path}/zarr.json, so readers skip this folder"


def _guard(where: str, check: Callable[..., Iterator[str]], *args: Any) -> list[str]:
    try:
        return list(check(*args))
    except FeatstoreError as exc:
        return [str(exc)]
    except Exception as exc:  # a damaged file can fail anywhere inside zarr or numcodecs
        return [f"{where}: unreadable ({type(exc).__name__}: {exc})"]


def _check_tokens(store: Store, shard: str, rows: dict[str, int]) -> Iterator[str]:
    table = store.tokens(shard)
    rows[shard] = table.height
    if table.height and (table["seq"].min() < 0 or table["pos"].min() < 0):
        yield f"token table {shard}: negative seq or pos in {spec.tokens_path(shard)}"


def _check_csr(
    store: Store, layer: int, shard: str, token_rows: dict[str, int], d_saes: set[int]
) -> Iterator[str]:
    where = f"layer {layer} shard {shard} ({spec.activation_path(layer, shard)})"
    attrs = store.info(layer, shard)
    if (
        attrs.get(spec.ENCODING_TYPE) != spec.CSR
        or attrs.get(spec.ENCODING_VERSION) != spec.CSR_VERSION
    ):
        encoding = (attrs.get(spec.ENCODING_TYPE), attrs.get(spec.ENCODING_VERSION))
        yield f"{where}: unknown encoding {encoding}"
        return
    n_tokens, d_sae = attrs[spec.SHAPE]
    d_saes.add(d_sae)
    group = store.group(spec.activation_path(layer, shard), where)
    indptr = np.asarray(store.read_array(group, "indptr", where))
    nnz = group["data"].shape[0]
    if indptr.shape != (n_tokens + 1,):
        yield f"{where}: indptr has {indptr.size} entries, shape says {n_tokens + 1}"
    elif indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != nnz:
        yield f"{where}: indptr is not monotone from 0 to nnz {nnz}"
    if group["indices"].shape[0] != nnz or attrs.get("nnz") != nnz:
        yield f"{where}: data, indices and attrs disagree on nnz"
    if token_rows.get(shard) != n_tokens:
        yield f"{where}: {n_tokens} rows but token table has {token_rows.get(shard)}"
    bad, counts = _scan_values(store, layer, shard, d_sae)
    yield from (f"{where}: {problem}" for problem in bad)
    if not bad and not np.array_equal(counts, store.feature_stats(layer, shard).count):
        yield f"{where}: feature_count does not match the data"


def _scan_values(store: Store, layer: int, shard: str, d_sae: int) -> tuple[list[str], np.ndarray]:
    """Problems of the values and feature ids, and each feature's active count, in one pass."""
    problems = []
    counts = np.zeros(d_sae, np.int64)
    for start, block in store.iter_blocks(layer, shard):
        if block.nnz and (block.indices.min() < 0 or block.indices.max() >= d_sae):
            problems.append(f"feature ids out of range [0, {d_sae}) from token {start}")
            continue
        if not np.all(np.isfinite(block.data)) or (block.nnz and block.data.min() < 0):
            problems.append(f"NaN, infinite or negative values from token {start}")
        counts += FeatureStats.of(block).count
    return problems, counts


PAIR_ARRAYS = ("feature_a", "feature_b", "n_both", "sum_xy", "indptr")


def _check_pairs(store: Store, folder: str, shard: str) -> Iterator[str]:
    path = f"{spec.PAIRS}/{folder}/{shard}"
    where = f"pair sums {folder} shard {shard} ({path})"
    group = store.group(path, where)
    attrs = dict(group.attrs)
    encoding = (attrs.get(spec.ENCODING_TYPE), attrs.get(spec.ENCODING_VERSION))
    if encoding != (spec.PAIR_STATS, spec.PAIR_STATS_VERSION):
        yield f"{where}: unknown encoding {encoding}"
        return
    arrays = {name: np.asarray(store.read_array(group, name, where)) for name in PAIR_ARRAYS}
    fa, fb, indptr = arrays["feature_a"], arrays["feature_b"], arrays["indptr"]
    nnz, d_a, d_b = fa.size, int(attrs["d_a"]), int(attrs["d_b"])
    if any(arrays[name].size != nnz for name in PAIR_ARRAYS[1:4]):
        yield f"{where}: feature_a, feature_b, n_both and sum_xy differ in length"
        return
    in_range = True
    for name, ids, d in (("feature_a", fa, d_a), ("feature_b", fb, d_b)):
        if nnz and (ids.min() < 0 or ids.max() >= d):
            in_range = False
            yield f"{where}: {name} ids out of range [0, {d})"
    key = fa.astype(np.int64) * d_b + fb
    if np.any(np.diff(key) <= 0):
        yield f"{where}: pairs not sorted and unique by (feature_a, feature_b)"
    if indptr.shape != (d_a + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        yield f"{where}: indptr is not monotone from 0 over d_a + 1 = {d_a + 1} entries"
    elif in_range and not np.array_equal(np.diff(indptr), np.bincount(fa, minlength=d_a)):
        yield f"{where}: indptr does not match feature_a"
    if nnz and (arrays["n_both"].min() < 1 or not np.all(arrays["sum_xy"] >= 0)):
        yield f"{where}: n_both below 1, or sum_xy negative or NaN"
