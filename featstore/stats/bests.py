"""Several measures at once over one layer pair, in one compiled pass: each feature's best partner
by each measure (both sides), the pairs reaching each measure's threshold (counted), histograms of
measures over fixed bins, the pairs reaching one measure's threshold (written out: graph edges)
and the sums of each feature's best pairs (written out: to score them by every measure
afterwards).

What a comparison of methods and the plots need, without finishing or holding every co-active pair:
memory is a few arrays per feature and measure plus the pairs written out; time is one pass of the
sparse engine's accumulation (`kernel._gather`) with each measure's formula per co-active pair.
Values are `finish.measure_values`' formulas in their order of operations (`best.form_of` for
pearson, cosine, jaccard, necessity, sufficiency; `_count_value` here for agreement, pmi and mutual
information), ties go to the lower partner, NaN never counts, and only finite values reach a
threshold (as `measures.above`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from featstore.errors import FeatstoreError
from featstore.stats import kernel
from featstore.stats.best import FORMS, form_of, kernel_inputs
from featstore.stats.kernel import PairCounts
from featstore.stats.scan import PairScan, stacked_matrices
from featstore.store.local import FeatureStats

AGREEMENT = 10  # (n - (count_a + count_b - n_both) + n_both) / n
PMI = 11  # log1p((n * n_both - count_a * count_b) / (count_a * count_b))
MUTUAL_INFORMATION = 12  # the four cells' n_ij log(n n_ij / (n_i n_j)), summed, / n
COUNT_FORMS = {"agreement": AGREEMENT, "pmi": PMI, "mutual_information": MUTUAL_INFORMATION}
MEASURES = (*FORMS, *COUNT_FORMS)  # every measure `several_bests` computes


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _count_value(form, c, ca, cb, n):
    """Agreement, pmi or mutual information of a pair co-active on `c` of `n` tokens, its
    features active on `ca` and `cb` (`measures`' formulas, in their order)."""
    if form == AGREEMENT:
        return (n - (ca + cb - c) + c) / float(n)
    excess = float(n * c - ca * cb)
    if form == PMI:
        return np.log1p(excess / (float(ca) * float(cb)))
    nf, caf, cbf, cf = float(n), float(ca), float(cb), float(c)
    n_a0, n_b0 = nf - caf, nf - cbf
    total = 0.0
    for cell in range(4):
        if cell == 0:
            n_ij, n_i, n_j, sign = cf, caf, cbf, 1.0
        elif cell == 1:
            n_ij, n_i, n_j, sign = caf - cf, caf, n_b0, -1.0
        elif cell == 2:
            n_ij, n_i, n_j, sign = cbf - cf, n_a0, cbf, -1.0
        else:
            n_ij, n_i, n_j, sign = n_a0 - cbf + cf, n_a0, n_b0, 1.0
        term = excess / (n_i * n_j)
        if sign < 0:
            term = -term
        term = np.log1p(term) * n_ij
        if n_ij > 0:
            total = total + term
    total /= nf
    return 0.0 if total < 0.0 else total


def count_value(measure: str, n_both: int, count_a: int, count_b: int, n: int) -> float:
    """Agreement, pmi or mutual information of one pair, exactly as the pass computes it."""
    return float(_count_value(COUNT_FORMS[measure], n_both, count_a, count_b, n))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _measure(form, s, c, r, q, uu, scale):
    if form >= AGREEMENT:  # counts: r, q are the features' counts, scale the tokens
        return _count_value(form, c, np.int64(r), np.int64(q), np.int64(scale))
    return kernel._value(form, s, c, r, q, uu, scale)


@numba.njit(nogil=True, cache=True)
def _put(out, m, i, j, n_both, value):
    """Row m of the (feature_a, feature_b, n_both, value) arrays `out`, grown when full."""
    fa, fb, nb, v = out
    if m == fa.size:
        fa, fb = kernel._grown(fa, 2 * m, m), kernel._grown(fb, 2 * m, m)
        nb, v = kernel._grown(nb, 2 * m, m), kernel._grown(v, 2 * m, m)
    fa[m], fb[m], nb[m], v[m] = i, j, n_both, value
    return (fa, fb, nb, v), m + 1


@numba.njit(nogil=True, cache=True, error_model="numpy")
def bests_block(
    a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, lo, hi, seg, forms, scale, row, col, row_u, col_u,
    clip_lo, clip_hi, floor, min_both, edge, edge_floor, edge_min_both, bins, extra, capacity,
):  # fmt: skip
    """For features lo..hi-1 of A with every feature of B, their pairs co-active on >= `min_both`
    tokens under each measure t (`forms[t]`, factors `row[t]`, ...): best value and partner of
    each of lo..hi-1 and of each feature of B (-inf, -1 where none), pairs whose finite value
    reaches `floor[t]`; the pairs whose finite value of measure `edge` (-1: none) reaches
    `edge_floor` on >= `edge_min_both` tokens, with that value (`edges`, their first `n_edges`
    rows); the histogram of each measure t's finite values over the bin edges `bins[t]` (no
    histogram where they are all NaN or `bins` is None; as `np.histogram`: half-open bins, the
    last one closed, values outside not counted); and the sums (n_both, sum_xy) of each
    feature's best pairs and of its partners in `extra` (methods x features of A, -1: none)
    when co-active on >= `min_both` tokens (`picks`, first `n_picks` rows, each pair once)."""
    n_m, d_b = forms.size, col.shape[1]
    acc, cnt, touched, tot, tcnt, ttouched = kernel._accumulators(d_b, seg)
    best_a = np.full((n_m, hi - lo), -np.inf)
    part_a = np.full((n_m, hi - lo), -1, np.int32)
    best_b = np.full((n_m, d_b), -np.inf)
    part_b = np.full((n_m, d_b), -1, np.int32)
    above = np.zeros(n_m, np.int64)
    # `bins` None (no histogram) is pruned when compiled: the comparison's pass pays nothing.
    if bins is None:
        hist = np.zeros((n_m, 0), np.int64)
    else:
        hist = np.zeros((n_m, bins.shape[1] - 1), np.int64)
    room = max(capacity, 1)
    edges = (np.empty(room, np.int32), np.empty(room, np.int32), np.empty(room, np.int64),
             np.empty(room))  # fmt: skip
    picks = (np.empty(room, np.int32), np.empty(room, np.int32), np.empty(room, np.int64),
             np.empty(room))  # fmt: skip
    n_edges = n_picks = 0
    mine = np.empty(n_m + extra.shape[0], np.int32)
    for i in range(lo, hi):
        k, sums, counts, found = kernel._gather(
            i, a_ptr, a_tok, a_val, b_ptr, b_feat, b_val, seg, acc, cnt, touched, tot, tcnt,
            ttouched,
        )  # fmt: skip
        for r in range(k):
            j = found[r]
            if counts[j] < min_both:
                continue
            for t in range(n_m):
                v = _measure(forms[t], sums[j], counts[j], row[t, i], col[t, j],
                             row_u[t, i] * col_u[t, j], scale[t])  # fmt: skip
                if v != v:  # NaN
                    continue
                v = min(max(v, clip_lo[t]), clip_hi[t])
                if np.isfinite(v):
                    above[t] += v >= floor[t]
                    if t == edge and v >= edge_floor and counts[j] >= edge_min_both:
                        edges, n_edges = _put(edges, n_edges, i, j, counts[j], v)
                    if bins is not None:
                        if bins[t, 0] == bins[t, 0]:
                            _bin(hist[t], bins[t], v)
                if v > best_a[t, i - lo] or (v == best_a[t, i - lo] and j < part_a[t, i - lo]):
                    best_a[t, i - lo], part_a[t, i - lo] = v, j
                if v > best_b[t, j]:  # i rises: on a tie the lower one stays
                    best_b[t, j], part_b[t, j] = v, i
        n_mine = 0
        for t in range(n_m + extra.shape[0]):
            j = part_a[t, i - lo] if t < n_m else extra[t - n_m, i]
            if j < 0 or counts[j] < min_both:
                continue
            seen = False
            for u in range(n_mine):
                seen = seen or mine[u] == j
            if not seen:
                mine[n_mine] = j
                n_mine += 1
                picks, n_picks = _put(picks, n_picks, i, j, counts[j], sums[j])
        for r in range(k):
            sums[found[r]] = 0.0
            counts[found[r]] = 0
    return best_a, part_a, best_b, part_b, above, hist, edges, n_edges, picks, n_picks


@numba.njit(nogil=True, cache=True)
def _bin(hist, edges, v):
    """Count `v` in `hist` over the uniform bin `edges` as `np.histogram` does: the index from
    the arithmetic, then moved so that edges[k] <= v < edges[k + 1] (the last bin closed)."""
    n = hist.size
    first, last = edges[0], edges[n]
    if not first <= v <= last:
        return
    k = min(int((v - first) / (last - first) * n), n - 1)
    if v < edges[k]:
        k -= 1
    elif k < n - 1 and v >= edges[k + 1]:
        k += 1
    hist[k] += 1


@dataclass(frozen=True)
class Bests:
    """What `several_bests` found over a layer pair (see there), per measure in order."""

    measures: tuple[str, ...]
    best_a: np.ndarray  # (measures, d_a) float64: -inf where none
    partner_a: np.ndarray  # (measures, d_a) int64: -1 where none
    best_b: np.ndarray  # (measures, d_b)
    partner_b: np.ndarray  # (measures, d_b)
    above: dict[str, int]  # measure -> pairs reaching its threshold
    histograms: dict[str, np.ndarray]  # measure -> counts in the bins asked for
    edges: PairCounts  # pairs reaching the edge threshold; sum_xy holds the edge measure's value
    picks: PairCounts  # each feature of A's best pairs (and extra partners): their sums

    def side(self, measure: str, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(value, partner) per feature of layer a (side "a") or b, by `measure`."""
        t = self.measures.index(measure)
        return (self.best_a[t], self.partner_a[t]) if side == "a" else (
            self.best_b[t], self.partner_b[t])  # fmt: skip


def _factors(measures: Sequence[str], sa: FeatureStats, sb: FeatureStats) -> list[np.ndarray]:
    """forms, scale, row, col, row_u, col_u, clip_lo, clip_hi stacked over `measures`."""
    per = []
    for m in measures:
        if m in COUNT_FORMS:
            count_a, count_b = (np.asarray(s.count, np.float64) for s in (sa, sb))
            zero_a, zero_b = np.zeros_like(count_a), np.zeros_like(count_b)
            per.append((COUNT_FORMS[m], float(sa.n_tokens), count_a, count_b, zero_a, zero_b,
                        -np.inf, np.inf))  # fmt: skip
        else:
            per.append(form_of(m, sa, sb))
    cols = list(zip(*per, strict=True))
    return [np.asarray(cols[0], np.int64), np.asarray(cols[1], np.float64),
            *(np.ascontiguousarray(np.stack(c), np.float64) for c in cols[2:6]),
            np.asarray(cols[6], np.float64), np.asarray(cols[7], np.float64)]  # fmt: skip


def several_bests(
    scan: PairScan,
    thresholds: Mapping[str, float],
    min_both: int,
    edge: tuple[str, float] | None = None,
    extra: Sequence[np.ndarray] = (),
    *,
    edge_min_both: int | None = None,
    bins: Mapping[str, np.ndarray] | None = None,
) -> Bests:
    """Over the pair `scan` opens (its shards and variant), the pairs co-active on >= `min_both`
    tokens: per measure of `thresholds` (any of `MEASURES`), each feature's best partner on both
    sides and the pairs reaching the threshold; the pairs reaching `edge` = (measure, threshold)
    on >= `edge_min_both` tokens (default `min_both`); the histogram of each measure of `bins`
    over its uniform bin edges (`np.histogram`'s bins); the sums of each feature of A's best pairs
    and of its partners in `extra` (arrays over A's features, -1: none)."""
    thresholds, bins = dict(thresholds), dict(bins or {})
    for m in [*([edge[0]] if edge else []), *bins]:
        thresholds.setdefault(m, np.inf)  # its bests come along; `above` counts none
    names = tuple(thresholds)
    unknown = [m for m in names if m not in MEASURES]
    if unknown:
        raise FeatstoreError(f"no compiled form for {unknown}: use one of {', '.join(MEASURES)}")
    m_a, m_b, cuts = stacked_matrices(scan.store, scan.a, scan.b, scan.shards, scan.variant)
    arrays, blocks = kernel_inputs(m_a, m_b)
    factors = _factors(names, *scan.stats)
    floor = np.array([thresholds[m] for m in names], np.float64)
    d_a, d_b, n = m_a.shape[1], m_b.shape[1], int(cuts[-1])
    others = np.full((len(extra), d_a), -1, np.int32)
    for e, partners in enumerate(extra):
        others[e] = partners
    edge_index, edge_floor = (names.index(edge[0]), float(edge[1])) if edge else (-1, np.inf)
    n_bins = {len(e) - 1 for e in bins.values()}
    if len(n_bins) > 1 or min(n_bins, default=1) < 1:
        raise FeatstoreError(f"histograms need one number (>= 1) of bins, got {sorted(n_bins)}")
    bin_edges = np.full((len(names), min(n_bins, default=0) + 1), np.nan) if bins else None
    for m, e in bins.items():
        bin_edges[names.index(m)] = e
    edge_min_both = min_both if edge_min_both is None else edge_min_both
    best_a, part_a = np.full((len(names), d_a), -np.inf), np.full((len(names), d_a), -1, np.int64)
    best_b, part_b = np.full((len(names), d_b), -np.inf), np.full((len(names), d_b), -1, np.int64)
    above = np.zeros(len(names), np.int64)
    hist = np.zeros((len(names), 0 if bin_edges is None else bin_edges.shape[1] - 1), np.int64)
    edges, picks = [], []
    seg = np.asarray(cuts, np.int64)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(bests_block, *arrays, lo, hi, seg, *factors[:6], factors[6], factors[7],
                        floor, int(min_both), edge_index, edge_floor, int(edge_min_both),
                        bin_edges, others, kernel.SCREENED_CAPACITY)
            for lo, hi in blocks
        ]  # fmt: skip
        for (lo, hi), job in zip(blocks, jobs, strict=True):  # in order: ties keep the lower a
            b_a, p_a, b_b, p_b, up, counted, found, n_found, chosen, n_chosen = job.result()
            best_a[:, lo:hi], part_a[:, lo:hi] = b_a, p_a
            better = b_b > best_b
            best_b[better], part_b[better] = b_b[better], p_b[better]
            above += up
            hist += counted
            edges.append([x[:n_found] for x in found])
            picks.append([x[:n_chosen] for x in chosen])

    def counts(parts: list) -> PairCounts:
        columns = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [[]] * 4
        return PairCounts.from_coo(n, d_a, d_b, *columns)

    return Bests(names, best_a, part_a, best_b, part_b, dict(zip(names, above.tolist(),
                 strict=True)),
                 {m: hist[names.index(m)] for m in bins}, counts(edges), counts(picks))
