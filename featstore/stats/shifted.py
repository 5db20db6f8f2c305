"""The null model of a few pairs, from their features' rows alone: K shifted alignments.

The store's null model (`featstore.stats.shardsums.null_rows`, docs/MEASURES.md) pairs each
sequence of a shard with the next sequence of the same length (by sequence id, cyclically; a
sequence alone of its length with itself rolled by half its length) and recomputes the pair
sums on that misalignment. Shift k generalises it: each sequence is paired with the k-th next
sequence of its length group (shift 1 is the store's null model, row for row); where that is the
sequence itself (k a multiple of the group's size) its positions are rolled by half its length.
Every shift is a permutation of a shard's rows, so per-feature sums stay as they are and only
`n_both` and `sum_xy` change.

For one pair, the sums under shifts 1..K need only the two features' nonzero rows (a feature
filter on the SQL index), not the layers: `SequenceShifts.rows(rows, k)` maps rows of layer a to
the rows of layer b they meet under shift k (`k < 0`: the inverse), and `shifted_sums` counts the
meetings. What a null comparison reports of those K values is in `null_summary`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SequenceShifts:
    """A shard's sequences grouped by length, to map rows under shift k (see module doc)."""

    order: np.ndarray  # rows sorted by (seq, pos)
    place: np.ndarray  # place of each row in `order`
    seq_of: np.ndarray  # index of each place's sequence (sequences sorted by seq id)
    offset: np.ndarray  # each place's offset in its sequence
    starts: np.ndarray  # each sequence's first place
    lengths: np.ndarray  # each sequence's length
    group: np.ndarray  # each sequence's first index in `by_length`
    size: np.ndarray  # each sequence's group size
    rank: np.ndarray  # each sequence's index within its group
    by_length: np.ndarray  # sequences sorted by (length, seq id)

    @staticmethod
    def of(seq: np.ndarray, pos: np.ndarray) -> SequenceShifts:
        """From a token table's `seq` and `pos` columns."""
        order = np.lexsort((pos, seq))
        place = np.empty_like(order)
        place[order] = np.arange(order.size)
        sorted_seq = seq[order]
        starts = np.flatnonzero(np.r_[True, sorted_seq[1:] != sorted_seq[:-1]][: seq.size])
        lengths = np.diff(np.r_[starts, seq.size])
        seq_of = np.repeat(np.arange(starts.size), lengths)
        by_length = np.lexsort((np.arange(starts.size), lengths))
        first = np.flatnonzero(np.r_[True, np.diff(lengths[by_length]) != 0])
        sizes = np.diff(np.r_[first, starts.size])
        group, size, rank = (np.empty(starts.size, np.int64) for _ in range(3))
        group[by_length] = np.repeat(first, sizes)
        size[by_length] = np.repeat(sizes, sizes)
        rank[by_length] = np.arange(starts.size) - group[by_length]
        offset = np.arange(seq.size) - starts[seq_of]
        return SequenceShifts(order, place, seq_of, offset, starts, lengths, group, size, rank,
                              by_length)  # fmt: skip

    def rows(self, rows: np.ndarray, k: int) -> np.ndarray:
        """The rows that `rows` meet under shift k (k < 0: the inverse of shift -k)."""
        at = self.place[rows]
        s = self.seq_of[at]
        m = self.size[s]
        partner = self.by_length[self.group[s] + (self.rank[s] + k) % m]
        length = self.lengths[s]
        roll = np.where(k % m == 0, np.sign(k) * (length // 2), 0)
        return self.order[self.starts[partner] + (self.offset[at] + roll) % length]


def shifted_sums(
    shifts: SequenceShifts, n_rows: int, rows_a: np.ndarray, values_a: np.ndarray,
    rows_b: np.ndarray, values_b: np.ndarray, ks: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`n_both` and `sum_xy` of one pair in one shard under each shift of `ks`: layer a's
    nonzeros (`rows_a`, `values_a`) against layer b's (all > 0) realigned. The smaller side is
    mapped, the other looked up in a dense column of the shard's `n_rows`."""
    forward = rows_a.size <= rows_b.size
    mine, my_values, other, other_values = (
        (rows_a, values_a, rows_b, values_b) if forward else (rows_b, values_b, rows_a, values_a)
    )
    dense = np.zeros(n_rows, np.float64)
    dense[other] = other_values
    n_both = np.zeros(ks.size, np.int64)
    sum_xy = np.zeros(ks.size, np.float64)
    if not mine.size or not other.size:
        return n_both, sum_xy
    for i, k in enumerate(ks.tolist()):
        met = dense[shifts.rows(mine, k if forward else -k)]
        n_both[i] = np.count_nonzero(met)
        sum_xy[i] = float(np.dot(met, my_values))
    return n_both, sum_xy


def null_summary(value: float, null: np.ndarray) -> dict[str, float | None]:
    """A value against its K null values: their mean and standard deviation (ddof 1), z, and
    the permutation p-value (1 + #null >= value) / (K + 1). Undefined ones are None (z where the
    null values differ only by rounding)."""
    null = null[np.isfinite(null)]
    if not null.size or value is None or not np.isfinite(value):
        return {"null_mean": None, "null_sd": None, "null_z": None, "null_p": None}
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    spread = sd > max(1e-9 * max(abs(mean), abs(value)), 1e-12)  # not rounding noise
    z = (value - mean) / sd if spread else None
    return {"null_mean": mean, "null_sd": sd if np.isfinite(sd) else None, "null_z": z,
            "null_p": (1 + int((null >= value).sum())) / (null.size + 1)}  # fmt: skip
