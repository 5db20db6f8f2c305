"""Compiled passes over a block of activations on its way into the store: dense codes in host
memory to CSR (`dense_csr`), and the checks of `validate_activations` with the block's
per-feature sums together (`check_block`); and the reader's check that each token's feature
ids rise (`first_unsorted_row`).

Extraction stores hundreds of nonzeros per token and layer; checking them (finite, positive,
feature ids in range, sorted without repeats) and summing them per feature with numpy took
several passes and temporaries per nonzero. `check_block` does both in one pass over the CSR
arrays as they come (scipy's canonical form: what `dense_to_csr` hands over). A block it cannot
vouch for (unsorted, repeated or explicit-zero entries, or an invalid value) goes the slow way,
through `validate_activations`, which canonicalises it or names the problem in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

OK, NOT_CANONICAL = 0, 1


@numba.njit(nogil=True, cache=True)
def check_block(indptr, indices, data, d, sums):
    """OK if the CSR arrays (rows by `indptr`) are canonical with every value finite and > 0 and
    every feature id in [0, d), with each value's count, sum and sum of squares (float64, in
    order, as `np.bincount` adds them) added to `sums[feature]` (d, 3): one cache line per
    value, not three; else NOT_CANONICAL (the sums then hold part of the block)."""
    nnz = indices.size
    if indptr[0] != 0 or indptr[indptr.size - 1] != nnz or data.size != nnz:
        return NOT_CANONICAL
    for r in range(indptr.size - 1):
        lo, hi = indptr[r], indptr[r + 1]
        if lo > hi or hi > nnz:
            return NOT_CANONICAL
        last = -1
        for p in range(lo, hi):
            j = indices[p]
            x = np.float64(data[p])
            # `not x > 0` also catches NaN; x - x is NaN for an infinity.
            if j <= last or j >= d or not x > 0 or x - x != 0:
                return NOT_CANONICAL
            last = j
            sums[j, 0] += 1.0
            sums[j, 1] += x
            sums[j, 2] += x * x
    return OK


@numba.njit(nogil=True, cache=True)
def first_unsorted_row(indptr, indices):
    """The first row whose feature ids do not rise strictly (repeated or out of order), or -1:
    rows by `indptr` (monotone, within `indices`), which may start past 0 (a block read from
    the middle of a shard: `indices` then starts at `indptr[0]`)."""
    base = indptr[0]
    for r in range(indptr.size - 1):
        for p in range(indptr[r] - base + 1, indptr[r + 1] - base):
            if indices[p] <= indices[p - 1]:
                return r
    return -1


@dataclass(frozen=True)
class CheckedBlock:
    """A block's CSR arrays in the store's types and its per-feature sums."""

    n_rows: int
    indptr: np.ndarray  # (rows + 1,) int64, from 0
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray  # (nnz,) float32
    sums: np.ndarray  # (d, 3) float64: each feature's count, sum and sum of squares

    @property
    def count(self) -> np.ndarray:  # (d,) int64
        return self.sums[:, 0].astype(np.int64)

    @property
    def total(self) -> np.ndarray:  # (d,) float64
        return self.sums[:, 1]

    @property
    def sumsq(self) -> np.ndarray:  # (d,) float64
        return self.sums[:, 2]


def fast_block(block: object, d: int, sums: np.ndarray | None = None) -> CheckedBlock | None:
    """The checked block and its sums by one `check_block` pass, or None where the block is not
    a canonical, valid CSR matrix of float32 values `d` wide (the caller then validates it).
    The sums go to `sums` ((d, 3) float64, zeroed first) where given: a writer's buffer, used
    again for each block (no fresh pages each time)."""
    if not (sp.issparse(block) and block.format == "csr" and block.ndim == 2):
        return None
    if block.shape[1] != d or block.dtype != np.float32 or d >= 2**31:
        return None
    indices = block.indices.astype(np.int32, copy=False)
    indptr = block.indptr.astype(np.int64, copy=False)
    if sums is None:
        sums = np.zeros((d, 3))  # counts exact in float64: a shard has < 2^53 tokens
    else:
        sums.fill(0.0)
    if check_block(indptr, indices, block.data, d, sums) != OK:
        return None
    return CheckedBlock(block.shape[0], indptr, indices, block.data, sums)


SCAN = 16  # floats tested at once for any nonzero: one or two SIMD registers


@numba.njit(nogil=True, cache=True)
def _dense_csr(dense, indptr):
    """(indices, data) of the nonzeros of a C-ordered 2-D float32 array, row by row, and its
    row pointers in `indptr`. Codes are sparse (~140 nonzeros in 24,576): each run of SCAN
    floats is first tested at once by OR-ing its bits (SIMD, at memory speed), and only a run
    with a bit set is copied, without branches (every float written, the count moved by
    `x != 0`; so -0.0 is skipped, NaN kept)."""
    rows, cols = dense.shape
    bits = dense.view(np.int32)
    runs = cols // SCAN
    indices = np.empty(max(rows * 64, cols, 1024), np.int32)
    data = np.empty(indices.size, np.float32)
    m = 0
    for r in range(rows):
        if m + cols > indices.size:  # room for a whole row, so the row's loop never checks
            size = max(2 * indices.size, m + cols)
            grown_i, grown_d = np.empty(size, np.int32), np.empty(size, np.float32)
            grown_i[:m], grown_d[:m] = indices[:m], data[:m]
            indices, data = grown_i, grown_d
        for b in range(runs):
            lo = b * SCAN
            any_bit = 0
            for c in range(lo, lo + SCAN):
                any_bit |= bits[r, c]
            if any_bit != 0:
                for c in range(lo, lo + SCAN):
                    x = dense[r, c]
                    indices[m], data[m] = c, x
                    m += x != 0
        for c in range(runs * SCAN, cols):
            x = dense[r, c]
            indices[m], data[m] = c, x
            m += x != 0
        indptr[r + 1] = m
    return indices[:m], data[:m]


def dense_csr(dense: np.ndarray) -> sp.csr_matrix:
    """A dense (tokens, features) float32 array's nonzeros as CSR, in one compiled pass (NaN
    counts as a nonzero: `check_block` refuses it later)."""
    dense = np.ascontiguousarray(dense, np.float32)
    indptr = np.zeros(dense.shape[0] + 1, np.int64)
    indices, data = _dense_csr(dense, indptr)
    return sp.csr_matrix((data, indices, indptr), shape=dense.shape)
