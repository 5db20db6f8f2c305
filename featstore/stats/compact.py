"""A layer's activations in the compact form the pair kernels read, and memory prefetching.

`Compact` is a canonical CSR matrix (tokens x features, values > 0) held in the smallest exact
types: feature ids in uint16 when the layer has at most 65,536 features, values in float32 when
every value is a float32 (the store's values are). At 24,576 features that is 6 bytes a nonzero
against 12 for scipy's float64/int32 CSR: 10^7 tokens of L0 48 in 2.9 GB. The kernels multiply
in float64 (a product of two float32 is exact there), so the sums are those of the float64
matrices bit for bit. The feature-major side a kernel walks (A.T) is built per range of
features (`Compact.feature_major`), never for the whole layer at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from featstore.errors import FeatstoreError

SMALL_IDS = 1 << 16  # layers of at most this many features keep their ids in uint16


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring `array[index]` into cache (LLVM's prefetch: read, keep, data)."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        where = builder.bitcast(builder.gep(ary.data, [args[1]]), byte_ptr)
        builder.call(fn, [where, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


def _value_type(data: np.ndarray) -> type:
    if data.dtype == np.float32:
        return np.float32
    as32 = data.astype(np.float32)
    return np.float32 if np.array_equal(as32, data) else np.float64


@dataclass(frozen=True)
class Compact:
    """A canonical CSR matrix (sorted unique ids, values > 0) in compact types."""

    indptr: np.ndarray  # (rows + 1,) int64
    indices: np.ndarray  # (nnz,) uint16 or int32: column ids
    data: np.ndarray  # (nnz,) float32 or float64
    shape: tuple[int, int]

    @staticmethod
    def of(matrix: sp.spmatrix | Compact) -> Compact:
        """`matrix` (made canonical: float64, duplicates summed, zeros dropped) compacted."""
        if isinstance(matrix, Compact):
            return matrix
        csr = sp.csr_matrix(matrix)
        if csr.dtype not in (np.float32, np.float64) or not csr.has_canonical_format:
            csr = sp.csr_matrix(csr, dtype=np.float64, copy=True)
            csr.sum_duplicates()
        if not csr.data.all():  # zeros stored: not the caller's arrays that lose them
            csr = csr.copy()
            csr.eliminate_zeros()
        return Compact.stacked([csr])

    @staticmethod
    def stacked(parts: Sequence[sp.csr_matrix]) -> Compact:
        """Canonical CSR matrices of one width stacked by rows (`filled`)."""
        value = np.float32 if all(_value_type(p.data) == np.float32 for p in parts) else np.float64
        sizes = sum(p.shape[0] for p in parts), sum(p.nnz for p in parts), parts[0].shape[1]
        return Compact.filled(iter(parts), *sizes, value)

    @staticmethod
    def filled(
        parts: Iterator[sp.csr_matrix], rows: int, nnz: int, d: int, value: type = np.float32
    ) -> Compact:
        """Canonical CSR matrices (`rows` x `d` in all, `nnz` entries, values exact in `value`)
        stacked by rows as they come (`Filling`)."""
        filling = Filling(rows, nnz, d, value)
        for part in parts:
            filling.add(part)
        return filling.done()

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, data) for the kernels (token-major: B's side)."""
        return self.indptr, self.indices, self.data

    def column_counts(self) -> np.ndarray:
        """Entries per column (compiled: numpy's bincount would copy the ids as int64 first,
        8 bytes a nonzero, 3.9 GB for a layer of 10^7 tokens)."""
        return _column_counts(self.indices, self.shape[1])

    def feature_work(self, row_weight: np.ndarray) -> np.ndarray:
        """Per column j: the sum of `row_weight` over the rows where j is stored (with B's
        nonzeros per token, the multiply-adds of A's feature j against B)."""
        return _feature_work(self.indptr, self.indices, np.asarray(row_weight, np.int64),
                             self.shape[1])  # fmt: skip

    def feature_major(
        self, lo: int, hi: int, counts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ptr, rows, values) of columns lo..hi-1 as CSR of the transpose (A.T's side of the
        kernels, rows rising): `ptr` has an entry per column + 1 of the whole matrix, empty
        outside [lo, hi), so the kernels index it by the column itself. `counts`:
        `column_counts`, when known."""
        return next(self.feature_majors([(lo, hi)], counts))

    def feature_majors(
        self, ranges: Iterable[tuple[int, int]], counts: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`feature_major` of each range of columns in turn (ranges rising, not overlapping),
        in one pass over the matrix in all: each row's ids rise (canonical CSR; the store's
        reader checks it), so each row keeps where the last range stopped and the next range
        starts there, instead of every range scanning every entry."""
        counts = self.column_counts() if counts is None else counts
        at = self.indptr[:-1].copy()  # per row: its first entry not yet taken
        last = 0
        for lo, hi in ranges:
            if not last <= lo <= hi <= self.shape[1]:
                raise FeatstoreError(f"column ranges must rise within [0, {self.shape[1]}): "
                                     f"{(lo, hi)} after {last}")  # fmt: skip
            ptr = np.zeros(self.shape[1] + 1, np.int64)
            ptr[lo + 1 : hi + 1] = np.cumsum(counts[lo:hi])
            ptr[hi + 1 :] = ptr[hi]
            rows = np.empty(int(ptr[hi]), np.int32)
            values = np.empty(int(ptr[hi]), self.data.dtype)
            placed = _fill_columns(self.indptr, self.indices, self.data, lo, hi, at, ptr.copy(),
                                   rows, values)  # fmt: skip
            if placed != rows.size:  # a row's ids did not rise: never hand out unfilled entries
                raise FeatstoreError(f"columns {lo}..{hi - 1}: {placed} of {rows.size} entries "
                                     "found; feature ids must rise within each row")  # fmt: skip
            last = hi
            yield ptr, rows, values


class Filling:
    """A `Compact` filled part by part (canonical CSR matrices of `d` columns stacked by rows),
    into arrays made once for the sizes announced: no stacked copy in scipy's types first. A
    part that breaks those sizes is an error (e.g. the data changed since the sizes were read);
    values not exact in float32 turn the whole into float64."""

    def __init__(self, rows: int, nnz: int, d: int, value: type = np.float32) -> None:
        self.indptr = np.zeros(rows + 1, np.int64)
        self.indices = np.empty(nnz, np.uint16 if d <= SMALL_IDS else np.int32)
        self.data = np.empty(nnz, value)
        self.d, self.row, self.at = d, 0, 0

    def add(self, part: sp.csr_matrix) -> None:
        n, k, rows, nnz = part.shape[0], part.nnz, self.indptr.size - 1, self.data.size
        if part.shape[1] != self.d or self.row + n > rows or self.at + k > nnz:
            raise FeatstoreError(f"a part of {part.shape} with {k} entries overflows the "
                                 f"{rows} x {self.d} rows and {nnz} entries announced")  # fmt: skip
        if self.data.dtype == np.float32 and _value_type(part.data) != np.float32:
            self.data = self.data.astype(np.float64)  # rare: values float32 cannot hold
        self.indptr[self.row + 1 : self.row + n + 1] = part.indptr[1:] + self.at
        self.indices[self.at : self.at + k], self.data[self.at : self.at + k] = (
            part.indices, part.data)  # fmt: skip
        self.row, self.at = self.row + n, self.at + k

    def done(self) -> Compact:
        rows, nnz = self.indptr.size - 1, self.data.size
        if (self.row, self.at) != (rows, nnz):
            raise FeatstoreError(
                f"parts of {self.row} rows and {self.at} entries, announced {rows} and {nnz}"
            )
        return Compact(self.indptr, self.indices, self.data, (rows, self.d))


@numba.njit(nogil=True, cache=True)
def _column_counts(indices, d):
    out = np.zeros(d, np.int64)
    for j in indices:
        out[j] += 1
    return out


@numba.njit(nogil=True, cache=True)
def _feature_work(indptr, indices, weight, d):
    out = np.zeros(d, np.int64)
    for t in range(indptr.size - 1):
        w = weight[t]
        for q in range(indptr[t], indptr[t + 1]):
            out[indices[q]] += w
    return out


@numba.njit(nogil=True, cache=True)
def _fill_columns(indptr, indices, data, lo, hi, at, cursor, rows, values):
    """Scatter the entries of columns lo..hi-1 to their column's run (rows in order), each
    row read from `at[row]` (its entries before hold columns below lo) and left at its first
    entry of a column >= hi; returns how many entries it placed."""
    placed = 0
    for t in range(indptr.size - 1):
        q, end = at[t], indptr[t + 1]
        while q < end and indices[q] < lo:
            q += 1
        start = q
        while q < end and indices[q] < hi:
            j = indices[q]
            c = cursor[j]
            rows[c], values[c] = t, data[q]
            cursor[j] = c + 1
            q += 1
        placed += q - start
        at[t] = q
    return placed
