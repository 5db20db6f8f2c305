"""The partners' null model (`featstore.stats.shifted`): shift 1 is the store's null model row for
row, every shift is a permutation undone by its negative, and the sums and the summary equal
numpy on dense columns realigned by an independent reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from featstore.stats.shardsums import null_rows
from featstore.stats.shifted import SequenceShifts, null_summary, shifted_sums


def random_tokens(rng) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of a few lengths (some alone of theirs), ids not in order, rows shuffled."""
    lengths = rng.integers(1, 7, size=rng.integers(1, 10))
    ids = rng.permutation(lengths.size) * 3 + 1
    seq = np.concatenate([np.full(n, s) for n, s in zip(lengths, ids, strict=True)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    shuffle = rng.permutation(seq.size)
    return seq[shuffle].astype(np.int32), pos[shuffle].astype(np.int32)


def reference_rows(seq: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """Shift k by loops: the k-th next sequence of the same length by id, cyclically; itself
    rolled by half its length where that is the sequence itself."""
    where = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(seq, pos, strict=True))}
    length = {int(s): int((seq == s).sum()) for s in np.unique(seq)}
    out = np.empty(seq.size, np.int64)
    for r, (s, p) in enumerate(zip(seq.tolist(), pos.tolist(), strict=True)):
        group = sorted(x for x in length if length[x] == length[s])
        partner = group[(group.index(s) + k) % len(group)]
        roll = length[s] // 2 if partner == s else 0
        out[r] = where[(partner, (p + roll) % length[s])]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_shifts_are_the_null_model_and_permutations(seed):
    rng = np.random.default_rng(seed)
    seq, pos = random_tokens(rng)
    shifts = SequenceShifts.of(seq, pos)
    rows = np.arange(seq.size)
    np.testing.assert_array_equal(shifts.rows(rows, 1), null_rows(pl.DataFrame({"seq": seq,
                                                                                "pos": pos})))
    for k in range(1, 8):
        forward = shifts.rows(rows, k)
        np.testing.assert_array_equal(forward, reference_rows(seq, pos, k))
        np.testing.assert_array_equal(np.sort(forward), rows)
        np.testing.assert_array_equal(shifts.rows(forward, -k), rows)


@pytest.mark.parametrize("seed", range(8))
def test_shifted_sums_equal_numpy(seed):
    rng = np.random.default_rng(100 + seed)
    seq, pos = random_tokens(rng)
    n = seq.size
    x = np.where(rng.random(n) < rng.uniform(0.1, 0.9), rng.lognormal(size=n), 0.0)
    y = np.where(rng.random(n) < rng.uniform(0.1, 0.9), rng.lognormal(size=n), 0.0)
    ks = np.arange(1, 9)
    (ra,), (rb,) = np.nonzero(x), np.nonzero(y)
    n_both, sum_xy = shifted_sums(SequenceShifts.of(seq, pos), n, ra, x[ra], rb, y[rb], ks)
    for i, k in enumerate(ks):
        met = y[reference_rows(seq, pos, int(k))]
        assert n_both[i] == int(((x > 0) & (met > 0)).sum())
        assert sum_xy[i] == pytest.approx(float(x @ met), rel=1e-12, abs=1e-12)


def test_null_summary_equals_numpy():
    null = np.array([0.1, 0.3, 0.2, 0.5, np.nan])
    got = null_summary(0.3, null)
    finite = null[np.isfinite(null)]
    assert got["null_mean"] == pytest.approx(finite.mean())
    assert got["null_sd"] == pytest.approx(finite.std(ddof=1))
    assert got["null_z"] == pytest.approx((0.3 - finite.mean()) / finite.std(ddof=1))
    assert got["null_p"] == pytest.approx((1 + 2) / 5)  # 0.3 and 0.5 reach it
    assert null_summary(0.3, np.array([0.2, 0.2]))["null_z"] is None  # no spread
    assert null_summary(0.3, np.array([0.2, 0.2 + 1e-17, 0.2]))["null_z"] is None  # rounding
    assert set(null_summary(float("nan"), null).values()) == {None}
    assert set(null_summary(0.3, np.zeros(0)).values()) == {None}
