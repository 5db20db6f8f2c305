"""Pair sums of two activation matrices (tokens x features, non-negative), in memory.

For feature i of A and j of B: `n_both` (tokens where both are > 0) and `sum_xy` (sum over
tokens of the product); only co-active pairs have either nonzero, so `PairCounts` holds them as
COO sorted by (feature_a, feature_b). Two engines compute them from matrices: `sparse` (one
compiled pass per block of features, `coactive_block`, on two threads: sums and counts together,
as a sparse product A.T @ B would add them) and `polars` (a join on the token and a group-by);
`featstore.pairs` adds the `duckdb` engine and keeps the sums per shard in the store. A query
that keeps few pairs passes a `Screen`: the sparse engine tests it in the same pass and keeps
only the pairs that pass.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numba
import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.errors import FeatstoreError
from featstore.stats.compact import Compact, prefetch

MAX_BLOCK_WORK = 30_000_000  # multiply-adds per kernel call: bounds its output arrays
SCREENED_CAPACITY = 1 << 12  # first room for a screened block's pairs (it grows as needed)
# Blocks per kernel run at least: computing a block overlaps the use of the one before.
PIPELINE_BLOCKS = 8
LOOKAHEAD_BLOCKS = 2  # blocks computed ahead of the one used
PREFETCH_TOKENS = 8  # how far ahead the kernels ask for B's rows (measured: 4-16 alike)
CACHE_LINE = 64  # bytes
CHUNK_ENTRIES = 1 << 25  # A's nonzeros made feature-major at once (~256 MB of float32)

Range = tuple[int, int]
T = TypeVar("T")


@dataclass(frozen=True)
class PairCounts:
    """Co-activation sums of feature pairs over `n_tokens` tokens, sorted by (a, b), unique."""

    n_tokens: int
    d_a: int
    d_b: int
    feature_a: np.ndarray  # (pairs,) int32
    feature_b: np.ndarray  # (pairs,) int32
    n_both: np.ndarray  # (pairs,) int64: tokens where both features are > 0
    sum_xy: np.ndarray  # (pairs,) float64: sum over tokens of the product

    @staticmethod
    def from_coo(n_tokens: int, d_a: int, d_b: int, fa, fb, n_both, sum_xy) -> PairCounts:
        """Sum duplicate pairs and sort by (feature_a, feature_b)."""
        key = np.asarray(fa, np.int64) * d_b + np.asarray(fb, np.int64)
        n_both, sum_xy = np.asarray(n_both, np.int64), np.asarray(sum_xy, np.float64)
        if key.size and not np.all(key[1:] > key[:-1]):
            # Stable sort is timsort: near linear on the concatenated sorted runs of a merge.
            order = np.argsort(key, kind="stable")
            key, n_both, sum_xy = key[order], n_both[order], sum_xy[order]
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            key = key[starts]
            n_both, sum_xy = np.add.reduceat(n_both, starts), _run_sums(sum_xy, starts)
        fa, fb = np.divmod(key, d_b)
        return PairCounts(
            n_tokens, d_a, d_b, fa.astype(np.int32), fb.astype(np.int32), n_both, sum_xy
        )

    @staticmethod
    def empty(n_tokens: int, d_a: int, d_b: int) -> PairCounts:
        return PairCounts.from_coo(n_tokens, d_a, d_b, [], [], [], [])

    @property
    def nnz(self) -> int:
        return int(self.feature_a.size)

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts.total([self, other])

    @staticmethod
    def total(parts: Sequence[PairCounts], same_tokens: bool = False) -> PairCounts:
        """The sums over disjoint token sets (shards, token blocks), in one merge; with
        `same_tokens`, the parts are blocks of pairs over the same tokens instead."""
        shapes = {(p.d_a, p.d_b) for p in parts}
        if len(shapes) != 1:
            raise FeatstoreError(f"pair counts of different feature counts cannot add: {shapes}")
        n_tokens = parts[0].n_tokens if same_tokens else sum(p.n_tokens for p in parts)
        full = [p for p in parts if p.nnz]
        if len(full) <= 1:
            return dataclasses.replace(full[0] if full else parts[0], n_tokens=n_tokens)
        cat = [np.concatenate([getattr(p, f) for p in full]) for f in PAIR_ARRAYS]
        if same_tokens and all(_before(p, q) for p, q in itertools.pairwise(full)):
            return PairCounts(n_tokens, *shapes.pop(), *cat)  # ordered blocks: already canonical
        return PairCounts.from_coo(n_tokens, *shapes.pop(), *cat)

    def select(
        self, features_a: Range | None = None, features_b: Range | None = None
    ) -> PairCounts:
        """The pairs with feature_a in [lo, hi) and feature_b in [lo, hi)."""
        keep = np.ones(self.nnz, dtype=bool)
        for values, rng in ((self.feature_a, features_a), (self.feature_b, features_b)):
            if rng is not None:
                keep &= (values >= rng[0]) & (values < rng[1])
        if features_a is None and features_b is None:
            return self
        return self.subset(keep)

    def sorted(self) -> PairCounts:
        """The same pairs sorted by (feature_a, feature_b)."""
        order = self.order()
        return self if order is None else self.subset(order)

    def order(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The permutation of `rows` (positions; default all) that sorts their pairs by
        (feature_a, feature_b); None where they are sorted already."""
        fa, fb = (self.feature_a, self.feature_b) if rows is None else (
            self.feature_a[rows], self.feature_b[rows])  # fmt: skip
        key = fa.astype(np.int64) * self.d_b + fb
        if not key.size or np.all(key[1:] > key[:-1]):
            return None
        # Stable sort is timsort: near linear on the sorted runs (of feature_a) it gets.
        return np.argsort(key, kind="stable")

    def subset(self, keep: np.ndarray | slice) -> PairCounts:
        """The pairs where the boolean mask `keep` is true, or at the positions or slice `keep`."""
        return dataclasses.replace(self, **{f: getattr(self, f)[keep] for f in PAIR_ARRAYS})


PAIR_ARRAYS = ("feature_a", "feature_b", "n_both", "sum_xy")


@numba.njit(nogil=True, cache=True)
def _run_sums(values, starts):
    """The sum of each run values[starts[k]:starts[k + 1]], added left to right: the order
    that makes merged sums canonical (numpy's reduceat adds some runs in another order)."""
    out = np.empty(starts.size, np.float64)
    for k in range(starts.size):
        end = starts[k + 1] if k + 1 < starts.size else values.size
        total = values[starts[k]]
        for p in range(starts[k] + 1, end):
            total += values[p]
        out[k] = total
    return out


@dataclass(frozen=True)
class Screen:
    """The pairs a query may keep: sum_xy * row[feature_a] * col[feature_b] >= floor (never
    where a factor is NaN). Pair sums computed with a screen hold only those pairs."""

    row: np.ndarray  # (d_a,) float64
    col: np.ndarray  # (d_b,) float64
    floor: float

    def checked(self, d_a: int, d_b: int) -> Screen:
        """This screen with contiguous float64 factors, checked against the layers' widths
        (the compiled pass reads them unchecked)."""
        row, col = (np.ascontiguousarray(x, np.float64) for x in (self.row, self.col))
        if row.shape != (d_a,) or col.shape != (d_b,):
            raise FeatstoreError(
                f"screen factors of shapes {row.shape} and {col.shape} do not fit layers of "
                f"{d_a} and {d_b} features"
            )
        return Screen(row, col, float(self.floor))

    def positions(self, counts: PairCounts, chunk: int) -> np.ndarray:
        """Positions of the pairs of `counts` that pass, `chunk` pairs at a time."""
        found = []
        for lo in range(0, counts.nnz, chunk):
            part = counts.subset(slice(lo, lo + chunk))
            # take with native-int positions: with int32 ones numpy's take is several times slower
            bound = part.sum_xy * self.col.take(part.feature_b.astype(np.intp))
            bound *= self.row.take(part.feature_a.astype(np.intp))
            with np.errstate(invalid="ignore"):  # NaN never passes
                found.append(np.flatnonzero(bound >= self.floor) + lo)
        return np.concatenate(found) if found else np.zeros(0, np.int64)


def _before(p: PairCounts, q: PairCounts) -> bool:
    """Whether every pair of `p` sorts before every pair of `q` (both canonical, nonempty)."""
    return (int(p.feature_a[-1]), int(p.feature_b[-1])) < (int(q.feature_a[0]), int(q.feature_b[0]))


# -- engines: each gives the same PairCounts for one block of tokens ------------------------------


def canonical_input(matrix: sp.spmatrix) -> sp.csr_matrix:
    csr = sp.csr_matrix(matrix, dtype=np.float64)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    return csr


def balanced_ranges(work: np.ndarray, limit: int) -> list[Range]:
    """Consecutive ranges of items [0, len(work)) holding ~`limit` work each (an item more)."""
    ends = np.cumsum(work)
    total = int(ends[-1]) if ends.size else 0
    cuts = np.searchsorted(ends, np.arange(limit, total, limit), side="right")
    edges = np.unique(np.r_[0, cuts, work.size])
    return [(int(x), int(y)) for x, y in itertools.pairwise(edges)] or [(0, work.size)]


@numba.njit
def _grown(values, size, used):
    """`values` in a new array of `size`, its first `used` entries copied."""
    out = np.empty(size, values.dtype)
    out[:used] = values[:used]
    return out


@numba.njit
def _sort_features(keys, spare, k, passes):
    """`keys[:k]` sorted (features < 256**passes) in `keys` or `spare`: the array returned.
    A radix sort where a row holds many features (a linear pass per byte), else numpy's."""
    if k <= 128:
        keys[:k].sort()
        return keys
    counts = np.empty(257, np.int64)
    for shift in range(0, 8 * passes, 8):
        counts[:] = 0
        for r in range(k):
            counts[((keys[r] >> shift) & 255) + 1] += 1
        for h in range(256):
            counts[h + 1] += counts[h]
        for r in range(k):
            byte = (keys[r] >> shift) & 255
            spare[counts[byte]] = keys[r]
            counts[byte] += 1
        keys, spare = spare, keys
    return keys


@numba.njit(nogil=True, cache=True)
def _fold(touched, k, acc, cnt, ttouched, kt, tot, tcnt):
    """Add one segment's sums (`acc`, `cnt` at `touched[:k]`) to the totals (`tot`, `tcnt`,
    their features `ttouched[:kt]`), clear them; returns the totals' new feature count."""
    for r in range(k):
        j = touched[r]
        ttouched[kt] = j
        kt += tcnt[j] == 0
        tcnt[j] += cnt[j]
        tot[j] += acc[j]
        acc[j] = 0.0
        cnt[j] = 0
    return kt


@numba.njit(nogil=True, cache=True)
def _accumulators(d_b, seg):
    """The dense accumulators `_gather` fills: sums, counts and touched features of one
    segment, and their totals over segments (empty where there is one segment)."""
    acc = np.zeros(d_b, np.float64)
    cnt = np.zeros(d_b, np.int64)
    touched = np.empty(d_b + 1, np.int32)  # + 1: the branch-free append writes one past
    width = d_b if seg.size > 2 else 0
    tot, tcnt = np.zeros(width, np.float64), np.zeros(width, np.int64)
    ttouched = np.empty(width + 1, np.int32)
    return acc, cnt, touched, tot, tcnt, ttouched


@numba.njit(nogil=True, cache=True)
def _add_tokens(start, end, a_tok, a_val, b_ptr, b_feat, b_val, acc, cnt, touched, k):
    """Add the pairs of A's entries start..end-1 (one feature's tokens) with B's features on
    those tokens to `acc` and `cnt`, appending new features to `touched[k:]`; returns the new k."""
    for p in range(start, end):
        # Ask for what position p + PREFETCH_TOKENS will read: B's row there, whole (every
        # cache line of its ids and of its values: rows lie at random, and the hardware fetches
        # ahead only within a line or two), and B's row pointer of the token PREFETCH_TOKENS
        # further, which that row's address needs. Reading B's rows was most of the pass: with
        # a row's first lines alone asked for, ~5.5 ns a multiply-add waited on memory; with
        # all of them ~1.9 (bench/RESULTS.md). Written out here, not called: a call passes the
        # arrays with atomic reference counts, which two threads then fight over.
        if p + 2 * PREFETCH_TOKENS < end:
            prefetch(b_ptr, a_tok[p + 2 * PREFETCH_TOKENS])
        if p + PREFETCH_TOKENS < end:
            ahead = a_tok[p + PREFETCH_TOKENS]
            first, stop = b_ptr[ahead], b_ptr[ahead + 1]
            for q in range(first, stop, CACHE_LINE // b_feat.itemsize):
                prefetch(b_feat, q)
            for q in range(first, stop, CACHE_LINE // b_val.itemsize):
                prefetch(b_val, q)
            if stop > first:  # the last line of each, where the row does not start a line
                prefetch(b_feat, stop - 1)
                prefetch(b_val, stop - 1)
        t, x = a_tok[p], np.float64(a_val[p])
        for q in range(b_ptr[t], b_ptr[t + 1]):
            j = b_feat[q]
            touched[k] = j  # kept where j is new; branch-free, as j is new too often to predict
            k += cnt[j] == 0
            cnt[j] += 1
            acc[j] += x * np.float64(b_val[q])  # exact for float32 inputs: sums as float64's
    return k


@numba.njit(nogil=True, cache=True)
def _segment_end(p, end, a_tok, limit):
    """The first position from p (before `end`) whose token is >= `limit`."""
    while p < end and a_tok[p] < limit:
        p += 1
    return p


@numba.njit(nogil=True, cache=True)
def _gather(i, a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, seg, acc, cnt, touched, tot, tcnt,
            ttouched):  # fmt: skip
    """(k, sums, counts, found): the sums and counts of feature i of A with each co-active
    feature of B, at `found[:k]` of the dense `sums` and `counts` (the caller clears them).

    One pass over i's tokens, as scipy's product does it (the same sums in the same order).
    `seg` cuts the tokens into segments (0 = seg[0] < ... < seg[-1] = tokens): each pair's sum
    over each segment is taken alone, in token order, and the segments' sums are added in
    order, exactly as adding the sums of separate shards (`PairCounts.total`) does."""
    p, end = a_ptr[i], a_ptr[i + 1]
    if seg.size <= 2:
        k = _add_tokens(p, end, a_tok, a_val, b_ptr, b_feat, b_val, acc, cnt, touched, 0)
        return k, acc, cnt, touched
    kt = 0
    for s in range(seg.size - 1):
        q = _segment_end(p, end, a_tok, seg[s + 1])
        k = _add_tokens(p, q, a_tok, a_val, b_ptr, b_feat, b_val, acc, cnt, touched, 0)
        kt = _fold(touched, k, acc, cnt, ttouched, kt, tot, tcnt)
        p = q
    return kt, tot, tcnt, ttouched


@numba.njit(nogil=True, cache=True)
def coactive_block(
    a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, lo, hi, row, col, floor, capacity, sort, seg
):
    """(feature_a, feature_b, n_both, sum_xy, pairs) of the co-active pairs of features
    lo..hi-1 of A (CSR of A.T: features x tokens, tokens sorted) and every feature of B (CSR:
    tokens x features) that pass the `Screen` (row, col, floor; floor -inf: every pair), each
    feature_a's pairs together and, with `sort`, sorted by feature_b; the arrays' first `pairs`
    entries hold them (`capacity`: their first size).

    One pass per feature of A (`_gather`): a dense accumulator over B's features gathers the
    sums and counts of its co-active pairs, the screen runs on them there, and only the pairs
    passing are written out. `seg`: token segments summed apart (`_gather`)."""
    d_b = col.size
    passes = 1
    while d_b > 256**passes:
        passes += 1
    acc, cnt, touched, tot, tcnt, ttouched = _accumulators(d_b, seg)
    spare = np.empty(d_b + 1, np.int32)
    out_a = np.empty(max(capacity, 1), np.int32)
    out_b, out_n, out_s = np.empty_like(out_a), np.empty(out_a.size, np.int64), np.empty(out_a.size)
    m = 0
    for i in range(lo, hi):
        k, sums, counts, found = _gather(
            i, a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, seg, acc, cnt, touched, tot, tcnt,
            ttouched,
        )  # fmt: skip
        kept = 0
        for r in range(k):  # the screen: the passing features move to the front of `found`
            j = found[r]
            if sums[j] * col[j] * row[i] >= floor:
                found[r], found[kept] = found[kept], j
                kept += 1
            else:
                sums[j] = 0.0
                counts[j] = 0
        if m + kept > out_a.size:
            size = max(2 * out_a.size, m + kept)
            out_a, out_b = _grown(out_a, size, m), _grown(out_b, size, m)
            out_n, out_s = _grown(out_n, size, m), _grown(out_s, size, m)
        keys = _sort_features(found, spare, kept, passes) if sort else found
        for r in range(kept):
            j = keys[r]
            out_a[m], out_b[m], out_n[m], out_s[m] = i, j, counts[j], sums[j]
            m += 1
            sums[j] = 0.0
            counts[j] = 0
    return out_a, out_b, out_n, out_s, m


# How `best_block` turns a pair's sums into its value (the formulas of `finish.measure_values`,
# in their order of operations, so the values are theirs bit for bit):
SUM_FORM = 0  # sums * scale * row[i] * col[j] - row_u[i] * col_u[j]  (pearson)
COUNT_RATIO = 1  # counts / (row[i] * col[j])  (necessity, sufficiency)
SUM_OVER_ROOT = 2  # sums / sqrt(row[i] * col[j])  (cosine; NaN where that is 0)
COUNT_JACCARD = 3  # counts / (row[i] + col[j] - counts)  (jaccard: row, col the counts)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _value(form, s, c, r, q, uu, scale):
    """One pair's measure from its sum `s` and count `c`, the factors `r` (its feature of A),
    `q` (of B) and `uu` (row_u * col_u), by `form`."""
    if form == SUM_FORM:
        v = s * scale
        v *= r
        v *= q
        return v - uu
    if form == COUNT_RATIO:
        return c / (r * q)
    if form == COUNT_JACCARD:
        return c / (r + q - c)
    norm = np.sqrt(r * q)
    return s / norm if norm > 0 else np.nan


@numba.njit(nogil=True, cache=True, error_model="numpy")
def best_block(
    a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, lo, hi, seg, form, scale, row, col, row_u, col_u,
    clip_lo, clip_hi, min_both,
):  # fmt: skip
    """Each feature's best partner by one measure among its co-active pairs (on >= `min_both`
    tokens) of features lo..hi-1 of A and every feature of B, without writing the pairs out:
    (value, partner) of each of lo..hi-1 (-inf, -1 where none) and of each feature of B over
    these features of A. Ties go to the lower partner; NaN values never count. `form` and its
    factors say how sums become the measure (`SUM_FORM`, ...); values are clipped to
    [`clip_lo`, `clip_hi`]. Sums as `coactive_block`'s (`_gather`)."""
    d_b = col.size
    acc, cnt, touched, tot, tcnt, ttouched = _accumulators(d_b, seg)
    best_a = np.full(hi - lo, -np.inf)
    part_a = np.full(hi - lo, -1, np.int32)
    best_b = np.full(d_b, -np.inf)
    part_b = np.full(d_b, -1, np.int32)
    for i in range(lo, hi):
        k, sums, counts, found = _gather(
            i, a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, seg, acc, cnt, touched, tot, tcnt,
            ttouched,
        )  # fmt: skip
        for r in range(k):
            j = found[r]
            if counts[j] >= min_both:
                v = _value(form, sums[j], counts[j], row[i], col[j], row_u[i] * col_u[j], scale)
                if v == v:  # not NaN
                    v = min(max(v, clip_lo), clip_hi)  # as finish's np.clip
                    if v > best_a[i - lo] or (v == best_a[i - lo] and j < part_a[i - lo]):
                        best_a[i - lo], part_a[i - lo] = v, j
                    if v > best_b[j]:  # i rises: on a tie the lower one stays
                        best_b[j], part_b[j] = v, i
            sums[j] = 0.0
            counts[j] = 0
    return best_a, part_a, best_b, part_b


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ratio_block(
    a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, lo, hi, seg, count_a, count_b, least, min_both,
    capacity,
):  # fmt: skip
    """(feature_a, feature_b, n_both, reach, pairs): the co-active pairs of features lo..hi-1
    of A and every feature of B, on >= `min_both` tokens, whose necessity n_both / count_b
    (reach bit 1) or sufficiency n_both / count_a (bit 2) is >= `least`, in one pass (the
    arrays' first `pairs` entries; `capacity`: their first size). The same ratios, in the same
    float64 division, as `measures.necessity` and `sufficiency`."""
    acc, cnt, touched, tot, tcnt, ttouched = _accumulators(count_b.size, seg)
    out_a = np.empty(max(capacity, 1), np.int32)
    out_b, out_n = np.empty_like(out_a), np.empty(out_a.size, np.int64)
    out_r = np.empty(out_a.size, np.int8)
    m = 0
    for i in range(lo, hi):
        k, sums, counts, found = _gather(
            i, a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, seg, acc, cnt, touched, tot, tcnt,
            ttouched,
        )  # fmt: skip
        for r in range(k):
            j = found[r]
            c = counts[j]
            if c >= min_both:
                necessity = c / count_b[j] >= least
                sufficiency = c / count_a[i] >= least
                if necessity or sufficiency:
                    if m == out_a.size:
                        out_a, out_b = _grown(out_a, 2 * m, m), _grown(out_b, 2 * m, m)
                        out_n, out_r = _grown(out_n, 2 * m, m), _grown(out_r, 2 * m, m)
                    out_a[m], out_b[m], out_n[m] = i, j, c
                    out_r[m] = 1 * necessity + 2 * sufficiency
                    m += 1
            sums[j] = 0.0
            counts[j] = 0
    return out_a, out_b, out_n, out_r, m


@numba.njit(nogil=True, cache=True, error_model="numpy")
def prefix_block(
    a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, lo, hi, seg, ends, forms, scale, row, col, row_u,
    col_u, clip_lo, clip_hi, floor, min_both,
):  # fmt: skip
    """Pairs above thresholds over growing prefixes of the segments, in one pass: for features
    lo..hi-1 of A with every feature of B, per prefix p (the first `ends[p]` segments;
    `ends[-1]` all of them) and measure m: (above, stable, change) (P, M) arrays: the pairs
    co-active on >= `min_both` tokens whose measure reaches `floor[m]` over prefix p, those of
    them that also reach it over all segments, and the sum of |value over p - value over all|
    on those. Per prefix and measure, `forms[m]` with factors `scale[p, m]`, `row[p, m]`,
    `col[p, m]`, `row_u[p, m]`, `col_u[p, m]` (the per-feature sums of that prefix) and clip
    [`clip_lo[m]`, `clip_hi[m]`], as `best_block`. The running sums after each segment are
    the prefix sums themselves (`_gather`'s order): no pair is written out, nothing is kept
    across features but P x M numbers."""
    d_b = col.shape[2]
    n_p, n_m = row.shape[0], row.shape[1]
    acc, cnt, touched, tot, tcnt, ttouched = _accumulators(d_b, np.zeros(3, np.int64))
    flag = np.zeros((n_p, n_m, d_b), np.bool_)
    val = np.zeros((n_p, n_m, d_b))
    above = np.zeros((n_p, n_m), np.int64)
    stable = np.zeros((n_p, n_m), np.int64)
    change = np.zeros((n_p, n_m))
    for i in range(lo, hi):
        p, end = a_ptr[i], a_ptr[i + 1]
        kt, pe = 0, 0
        for s in range(seg.size - 1):
            q = _segment_end(p, end, a_tok, seg[s + 1])
            k = _add_tokens(p, q, a_tok, a_val, b_ptr, b_feat, b_val, acc, cnt, touched, 0)
            kt = _fold(touched, k, acc, cnt, ttouched, kt, tot, tcnt)
            p = q
            if s + 1 == ends[pe]:  # the prefix's sums are complete: test them
                for r in range(kt):
                    j = ttouched[r]
                    if tcnt[j] < min_both:
                        continue
                    for m in range(n_m):
                        v = _value(forms[m], tot[j], tcnt[j], row[pe, m, i], col[pe, m, j],
                                   row_u[pe, m, i] * col_u[pe, m, j], scale[pe, m])  # fmt: skip
                        if v == v:
                            v = min(max(v, clip_lo[m]), clip_hi[m])
                            if v >= floor[m]:
                                flag[pe, m, j], val[pe, m, j] = True, v
                pe += 1
        last = n_p - 1
        for r in range(kt):
            j = ttouched[r]
            for m in range(n_m):
                for pp in range(n_p):
                    if flag[pp, m, j]:
                        above[pp, m] += 1
                        if flag[last, m, j]:
                            stable[pp, m] += 1
                            change[pp, m] += abs(val[pp, m, j] - val[last, m, j])
                        flag[pp, m, j] = False
            tot[j] = 0.0
            tcnt[j] = 0
    return above, stable, change


def _start_block(
    pool: ThreadPoolExecutor, shape: tuple[int, int, int], arrays: tuple, features: Range,
    screen: Screen, capacity: int, sort: bool, seg: np.ndarray,
) -> Callable[[], PairCounts]:  # fmt: skip
    """Start `coactive_block` of `features` of A on `pool` (`arrays`: A's `feature_major` side
    holding those features, and B's `Compact.arrays`; `shape`: tokens, d_a, d_b); the function
    returned waits for its pairs."""
    job = pool.submit(
        coactive_block, *arrays, *features, screen.row, screen.col, screen.floor, capacity, sort,
        seg,
    )  # fmt: skip

    def done() -> PairCounts:
        *found, m = job.result()
        fa, fb, n_both, sum_xy = (x[:m] for x in found)
        return PairCounts(*shape, fa, fb, n_both, sum_xy)

    return done


def chunked(blocks: list[Range], counts: np.ndarray, limit: int) -> list[tuple[Range, list[Range]]]:
    """The blocks grouped into runs whose features hold ~`limit` entries (`counts` per feature;
    one block at least): (range of the run's features, its blocks)."""
    runs: list[tuple[Range, list[Range]]] = []
    for lo, hi in blocks:
        if runs:
            (first, _), members = runs[-1]
            if int(counts[first:hi].sum()) <= limit:
                runs[-1] = ((first, hi), [*members, (lo, hi)])
                continue
        runs.append(((lo, hi), [(lo, hi)]))
    return runs


def iter_sparse_pair_counts(
    A: sp.spmatrix | Compact,
    B: sp.spmatrix | Compact,
    max_work: int | None = None,
    sort: bool = True,
    screen: Screen | None = None,
    segments: Sequence[int] | None = None,
) -> Iterator[PairCounts]:
    """`sparse_pair_counts` in blocks of feature_a of ~`max_work` multiply-adds (None:
    `MAX_BLOCK_WORK`, and at least ~`PIPELINE_BLOCKS` blocks), in order, by `coactive_block`
    on two threads. The next blocks are computed while one is used: memory holds up to
    `LOOKAHEAD_BLOCKS` + 1 blocks' pairs, and A's feature-major side of ~`CHUNK_ENTRIES`
    nonzeros at a time, two at most (the next built on a thread while this one is used,
    `built_ahead`; all of them in one pass over A, `Compact.feature_majors`). Without `sort`,
    each feature_a's pairs come together but not sorted by feature_b (`PairCounts.sorted`
    sorts them). With a
    `screen`, only the pairs passing it come. `segments` (token boundaries from 0 to the token
    count) sums the tokens between each two apart and adds those sums in order, bit for bit
    the sums of the segments computed alone and added by `PairCounts.total` (stacked shards)."""
    if A.shape[0] != B.shape[0]:
        raise FeatstoreError(f"layers differ in token count: {A.shape[0]} vs {B.shape[0]}")
    seg = np.asarray([0, A.shape[0]] if segments is None else segments, np.int64)
    if seg.size < 2 or seg[0] != 0 or seg[-1] != A.shape[0] or np.any(np.diff(seg) < 0):
        raise FeatstoreError(f"segments must rise from 0 to {A.shape[0]} tokens")
    a, b = Compact.of(A), Compact.of(B)
    shape = (a.shape[0], a.shape[1], b.shape[1])
    work = a.feature_work(np.diff(b.indptr))  # multiply-adds per feature of A
    limit = max_work or min(MAX_BLOCK_WORK, -(-int(work.sum()) // PIPELINE_BLOCKS))
    blocks = balanced_ranges(work, max(limit, 1))
    if screen is None:  # every co-active pair: at most one per multiply-add, room made at once
        screen = Screen(np.ones(shape[1]), np.ones(shape[2]), -np.inf)
        rooms = {r: int(work[r[0] : r[1]].sum()) for r in blocks}
    else:  # few pass: the output grows as needed
        screen, sort = screen.checked(*shape[1:]), True
        rooms = {r: SCREENED_CAPACITY for r in blocks}
    counts = a.column_counts()

    def starts(pool: ThreadPoolExecutor) -> Iterator[Callable[[], Callable[[], PairCounts]]]:
        runs = chunked(blocks, counts, CHUNK_ENTRIES)
        sides = built_ahead(a.feature_majors([r for r, _ in runs], counts))
        for (_, members), side in zip(runs, sides, strict=True):
            arrays = side + b.arrays()
            for r in members:
                yield functools.partial(
                    _start_block, pool, shape, arrays, r, screen, rooms[r], sort, seg
                )

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield from run_ahead(starts(pool), LOOKAHEAD_BLOCKS + 1)


def run_ahead(starts: Iterable[Callable[[], Callable[[], T]]], ahead: int) -> Iterator[T]:
    """Each `start()` begins some work (on threads) and returns the function that waits for its
    result; the results come in order, with up to `ahead` pieces of work begun at once."""
    pending: collections.deque[Callable[[], T]] = collections.deque()
    for start in starts:
        pending.append(start())
        if len(pending) >= ahead:
            yield pending.popleft()()
    while pending:
        yield pending.popleft()()


def built_ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of `items` in order, each next one made on a thread while the caller uses the
    one before (`items`' work releases the GIL: compiled code): A's feature-major side of the
    next run of blocks is built while the kernels work through this one's, instead of the
    kernels waiting for it."""
    with ThreadPoolExecutor(max_workers=1) as builder:
        job = builder.submit(next, items, None)
        while (item := job.result()) is not None:
            job = builder.submit(next, items, None)
            yield item


def sparse_pair_counts(A: sp.spmatrix, B: sp.spmatrix) -> PairCounts:
    """n_both = Abin.T @ Bbin and sum_xy = A.T @ B (tokens x features, non-negative) with scipy."""
    return PairCounts.total(list(iter_sparse_pair_counts(A, B)), same_tokens=True)


def _long(matrix: sp.csr_matrix) -> pl.LazyFrame:
    """One row (row, feature, value) per stored value."""
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    return pl.LazyFrame({"row": rows, "feature": matrix.indices, "value": matrix.data})


def polars_pair_counts(A: sp.spmatrix, B: sp.spmatrix) -> PairCounts:
    """The same sums by a polars join on the token row and a group-by of feature pairs."""
    if A.shape[0] != B.shape[0]:
        raise FeatstoreError(f"layers differ in token count: {A.shape[0]} vs {B.shape[0]}")
    a, b = canonical_input(A), canonical_input(B)
    out = (
        _long(a)
        .join(_long(b), on="row", suffix="_b")
        .group_by("feature", "feature_b")
        .agg(n_both=pl.len(), sum_xy=(pl.col("value") * pl.col("value_b")).sum())
        .collect(engine="streaming")
    )
    cols = [out[c].to_numpy() for c in ("feature", "feature_b", "n_both", "sum_xy")]
    return PairCounts.from_coo(A.shape[0], a.shape[1], b.shape[1], *cols)
