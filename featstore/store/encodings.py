"""Every on-disk encoding in one place: its stamp, its attributes' check and its values' check,
registered by (encoding-type, encoding-version) as anndata's `_io/specs` does.

Writers stamp a group with `stamp(TYPE)`; readers open it with `require(attrs, TYPE, what)`,
which dispatches on the stamped attributes and refuses an unknown encoding with an error naming
the spec and the fix. Every array is written with a fill value no valid element takes
(`fill_value`: NaN, the integer minimum, 0xFF for UTF-8 bytes), so a deleted chunk, which zarr
reads as the fill value, is caught by `check_read` with one reduction; an array written with
another fill value (a store from before spec version 3) has its chunks' presence checked instead.
`check_values` holds what each array's values must satisfy (docs/STORE_FORMAT.md), used where
data is read and by `featstore check`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.core.sync

from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.blockpass import first_unsorted_row

SPEC_DOC = "docs/STORE_FORMAT.md"
PAIR_GROUP_ARRAYS = ("feature_a", "feature_b", "n_both", "sum_xy", "indptr")
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Encoding:
    """One (type, version): the attributes it requires and how each array's values are checked."""

    type: str
    version: str
    attrs: Callable[[Mapping[str, Any]], str | None]  # None when sound, else the problem

    @property
    def key(self) -> tuple[str, str]:
        return self.type, self.version


def _count(value: Any, limit: int = 2**62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _csr_attrs(attrs: Mapping[str, Any]) -> str | None:
    shape = attrs.get(spec.SHAPE)
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(_count, shape))):
        return f"shape {shape!r} is not [n_tokens, d_sae]"
    if not 0 < shape[1] <= INT32_MAX:
        return f"d_sae {shape[1]} outside 1..2^31-1"
    if attrs.get("d_sae", shape[1]) != shape[1] or not _count(attrs.get("nnz")):
        return "d_sae or nnz missing or disagreeing with shape"
    return None


def _token_attrs(attrs: Mapping[str, Any]) -> str | None:
    n = attrs.get("n_tokens")
    return None if n is None or _count(n) else f"n_tokens {n!r} is not a count"


def _pair_attrs(attrs: Mapping[str, Any]) -> str | None:
    if not all(_count(attrs.get(k)) for k in ("n_tokens", "d_a", "d_b")):
        return "n_tokens, d_a or d_b missing or not a count"
    if not (0 < attrs["d_a"] <= INT32_MAX and 0 < attrs["d_b"] <= INT32_MAX):
        return "d_a or d_b outside 1..2^31-1"
    return None


def _no_attrs(attrs: Mapping[str, Any]) -> str | None:
    return None


REGISTRY: dict[tuple[str, str], Encoding] = {
    e.key: e
    for e in (
        Encoding(spec.CSR, spec.CSR_VERSION, _csr_attrs),
        Encoding(spec.TOKEN_TABLE, spec.TOKEN_TABLE_VERSION, _token_attrs),
        Encoding(spec.VOCAB, spec.VOCAB_VERSION, _no_attrs),
        Encoding(spec.PAIR_STATS, spec.PAIR_STATS_VERSION, _pair_attrs),
    )
}
CURRENT = {e.type: e for e in REGISTRY.values()}  # what writers stamp


def stamp(encoding_type: str) -> dict[str, Any]:
    """The attributes that mark a group as written in the current version of `encoding_type`."""
    e = CURRENT[encoding_type]
    return {
        spec.ENCODING_TYPE: e.type,
        spec.ENCODING_VERSION: e.version,
        spec.FEATSTORE_VERSION: spec.SPEC_VERSION,
    }


def require(attrs: Mapping[str, Any], encoding_type: str, what: str, path: str) -> Encoding:
    """The encoding of a group's `attrs`, which must be a known version of `encoding_type` with
    sound attributes; else a one-line error naming the spec and the fix."""
    found = (attrs.get(spec.ENCODING_TYPE), attrs.get(spec.ENCODING_VERSION))
    encoding = REGISTRY.get(found) if all(isinstance(f, str) for f in found) else None
    if found[0] != encoding_type or encoding is None:
        known = sorted(v for t, v in REGISTRY if t == encoding_type)
        raise FeatstoreError(
            f"{what}: {path}/zarr.json has encoding {found}, this featstore reads "
            f"{encoding_type} {known} ({SPEC_DOC}): upgrade featstore, or rewrite the group"
        )
    problem = encoding.attrs(attrs)
    if problem:
        raise FeatstoreError(f"{what}: corrupt attributes in {path}/zarr.json: {problem}")
    return encoding


# -- values ----------------------------------------------------------------------------------------


def fill_value(dtype: np.dtype) -> Any:
    """A value no valid element of an array of `dtype` takes: what a missing chunk reads as."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return float("nan")
    if dtype.kind == "i":
        return int(np.iinfo(dtype).min)
    if dtype == np.uint8:
        return 0xFF  # never a byte of UTF-8
    raise ValueError(f"no fill value for dtype {dtype}")


def _is_sentinel(array: zarr.Array) -> bool:
    try:
        expected = fill_value(array.dtype)
    except ValueError:
        return False
    found = array.fill_value
    return bool(np.isnan(found)) if isinstance(expected, float) else found == expected


def check_read(array: zarr.Array, values: np.ndarray, sel: slice) -> str | None:
    """None if `values` (array[sel]) came from chunks that are all there, else the problem."""
    if not values.size:
        return None
    if _is_sentinel(array):
        if values.dtype.kind == "f":
            bad = bool(np.isnan(values.min()))  # NaN propagates: one reduction
        elif values.dtype == np.uint8:
            bad = int(values.max()) == 0xFF
        else:
            bad = int(values.min()) == int(np.iinfo(values.dtype).min)
        if bad:
            fill = "NaN" if values.dtype.kind == "f" else array.fill_value
            return f"fill value {fill} read: a deleted chunk, or a value no writer stores"
        return None
    missing = _missing_chunks(array, sel)
    return f"missing chunk(s) {missing[:5]}" if missing else None


def _missing_chunks(array: zarr.Array, sel: slice) -> list[int]:
    """Chunk numbers of array[sel] that have no object in the store (zarr reads them as fill)."""
    start, stop, _ = sel.indices(array.shape[0])
    size = array.chunks[0]
    numbers = list(range(start // size, (max(stop, start + 1) - 1) // size + 1))
    store, prefix = array.store_path.store, array.store_path.path
    keys = [f"{prefix}/{array.metadata.encode_chunk_key((i,))}" for i in numbers]

    async def exist() -> list[bool]:
        import asyncio

        return list(await asyncio.gather(*(store.exists(k) for k in keys)))

    found = zarr.core.sync.sync(exist())
    return [i for i, ok in zip(numbers, found, strict=True) if not ok]


def csr_problem(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, nnz: int, d_sae: int
) -> str | None:
    """What is wrong with a CSR row block read from a group of `nnz` values (None if sound):
    what the numba kernel and scipy would otherwise read out of bounds, or wrong."""
    if indptr.size and (int(indptr[0]) < 0 or int(indptr[-1]) > nnz):
        return f"indptr outside [0, nnz {nnz}]"
    if indptr.size > 1 and np.any(indptr[1:] < indptr[:-1]):
        return "indptr is not monotone"
    if data.size != indices.size or (indptr.size and data.size != indptr[-1] - indptr[0]):
        return "data, indices and indptr disagree on the number of values"
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= d_sae):
        return f"feature ids out of range [0, {d_sae})"
    if data.size and not (float(data.min()) > 0 and float(data.max()) < np.inf):
        return "values NaN, infinite, zero or negative"
    row = first_unsorted_row(indptr, indices) if indices.size else -1
    if row >= 0:  # the kernels count a repeated feature twice: never read as data
        return f"feature ids repeated or not rising in row {row} of the block"
    return None


def pair_problem(arrays: Mapping[str, np.ndarray], d_a: int, d_b: int) -> str | None:
    """What is wrong with COO pair sums read from a pair group (None if sound)."""
    fa, fb = arrays["feature_a"], arrays["feature_b"]
    if any(arrays[n].size != fa.size for n in ("feature_b", "n_both", "sum_xy")):
        return "feature_a, feature_b, n_both and sum_xy differ in length"
    for name, ids, d in (("feature_a", fa, d_a), ("feature_b", fb, d_b)):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= d):
            return f"{name} ids out of range [0, {d})"
    n_both, sum_xy = arrays["n_both"], arrays["sum_xy"]
    if n_both.size and (int(n_both.min()) < 1 or not float(sum_xy.min()) >= 0):
        return "n_both below 1, or sum_xy negative or NaN"
    return None


def token_problem(columns: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with token-table columns (None if sound)."""
    sizes = {c.size for c in columns.values()}
    if len(sizes) > 1:
        return "seq, pos and token differ in length"
    for name in ("seq", "pos"):
        col = columns.get(name)
        if col is not None and col.size and int(col.min()) < 0:
            return f"negative {name}"
    token = columns.get("token")
    if token is not None and token.size and int(token.min()) < -1:
        return "token ids below -1"
    return None
