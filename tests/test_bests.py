"""Several measures' bests in one compiled pass equal numpy over the dense table of every pair."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import build_store, correlated_layers, table_measures

from featstore.errors import FeatstoreError
from featstore.stats.bests import MEASURES, several_bests
from featstore.stats.scan import PairScan

MIN_BOTH = 2
THRESHOLDS = {"pearson": 0.2, "cosine": 0.3, "jaccard": 0.1, "agreement": 0.9, "sufficiency": 0.4,
              "necessity": 0.4, "mutual_information": 0.01, "pmi": 1.0}  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    acts = correlated_layers((6, 7), n_tokens=300, d=20, seed=5)
    acts = {k: x.astype(np.float32).astype(np.float64) for k, x in acts.items()}
    acts[7][:, 19] = 0.0  # a dead feature: no partner on either side
    # Two shards, so the kernel sums each alone and adds them, as the saved sums would.
    shards = {k: {"s0": sp.csr_matrix(x[:160]), "s1": sp.csr_matrix(x[160:])}
              for k, x in acts.items()}  # fmt: skip
    store = build_store(tmp_path_factory.mktemp("bests"), shards)
    return store, acts


def reference(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    ref = table_measures(x, y)
    sq_x, sq_y = (x**2).sum(0), (y**2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref["cosine"] = (x.T @ y) / np.sqrt(np.outer(sq_x, sq_y))
    return ref


def masked(ref: dict[str, np.ndarray], m: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where((ref["n_both"] >= MIN_BOTH) & np.isfinite(ref[m]), ref[m], -np.inf)


def test_every_measure_bests_counts_and_edges_equal_numpy(pair):
    store, acts = pair
    ref = reference(acts[6], acts[7])
    extra = np.array([3, -1, *range(18)], np.int32)  # another method's partners (-1: none)
    got = several_bests(PairScan.open(store, 6, 7, save=False), THRESHOLDS, MIN_BOTH,
                        edge=("pearson", 0.25), extra=[extra])  # fmt: skip
    assert set(MEASURES) == set(THRESHOLDS)
    for m, t in THRESHOLDS.items():
        score = masked(ref, m)
        for side, s in (("a", score), ("b", score.T)):
            value, partner = got.side(m, side)
            has = np.isfinite(s).any(1)
            np.testing.assert_array_equal(partner >= 0, has, err_msg=f"{m} {side}")
            np.testing.assert_allclose(value[has], s[has].max(1), rtol=1e-12, err_msg=m)
            best = s[has].max(1, keepdims=True)
            lowest = np.argmax(s[has] >= best - 1e-12 * np.abs(best), axis=1)  # ties: the lower
            np.testing.assert_array_equal(partner[has], lowest, err_msg=f"{m} {side}")
        assert got.above[m] == int((score >= t).sum()), m
    keep = masked(ref, "pearson") >= 0.25
    fa, fb = np.nonzero(keep)
    np.testing.assert_array_equal(got.edges.feature_a, fa)
    np.testing.assert_array_equal(got.edges.feature_b, fb)
    np.testing.assert_array_equal(got.edges.n_both, ref["n_both"][fa, fb])
    np.testing.assert_allclose(got.edges.sum_xy, ref["pearson"][fa, fb], rtol=1e-12)
    # picks: every feature's best pairs and its extra partner, where co-active on MIN_BOTH tokens
    want = set()
    for m in THRESHOLDS:
        value, partner = got.side(m, "a")
        want |= {(i, int(partner[i])) for i in np.flatnonzero(partner >= 0)}
    want |= {(i, int(j)) for i, j in enumerate(extra) if j >= 0 and ref["n_both"][i, j] >= 2}
    picks = got.picks
    assert set(zip(picks.feature_a.tolist(), picks.feature_b.tolist(), strict=True)) == want
    np.testing.assert_array_equal(picks.n_both, ref["n_both"][picks.feature_a, picks.feature_b])
    product = acts[6].T @ acts[7]
    np.testing.assert_allclose(picks.sum_xy, product[picks.feature_a, picks.feature_b],
                               rtol=1e-12)  # fmt: skip


def test_unknown_measure_is_one_line(pair):
    store, _ = pair
    with pytest.raises(FeatstoreError, match="no compiled form"):
        several_bests(PairScan.open(store, 6, 7, save=False), {"decoder_cosine": 0.1}, 1)


def test_histograms_counts_and_edges_of_every_co_active_pair_equal_numpy(pair):
    """What the plots draw: over every co-active pair (min_both 1), each measure's histogram as
    `np.histogram` over the same bins (values outside left out), counts above threshold, and the
    edges co-active on enough tokens."""
    store, acts = pair
    ref = reference(acts[6], acts[7])
    co_active = ref["n_both"] >= 1
    agreement = ref["agreement"][co_active]
    low = float(np.quantile(agreement, 0.1))  # a tenth of the pairs fall below the bins
    bins = {"agreement": np.linspace(low, 1.0, 31), "jaccard": np.linspace(0.0, 1.0, 31)}
    thresholds = {"pearson": 0.2, "agreement": 0.95, "jaccard": 0.2}
    got = several_bests(PairScan.open(store, 6, 7, save=False), thresholds, 1,
                        edge=("pearson", 0.2), edge_min_both=10, bins=bins)  # fmt: skip
    for m, e in bins.items():
        values = ref[m][co_active & np.isfinite(ref[m])]
        np.testing.assert_array_equal(got.histograms[m], np.histogram(values, bins=e)[0])
    assert got.histograms["agreement"].sum() < co_active.sum()  # some were outside
    for m, t in thresholds.items():
        with np.errstate(invalid="ignore"):
            assert got.above[m] == int((co_active & (ref[m] >= t)).sum()), m
    with np.errstate(invalid="ignore"):
        fa, fb = np.nonzero((ref["n_both"] >= 10) & (ref["pearson"] >= 0.2))
    np.testing.assert_array_equal(got.edges.feature_a, fa)
    np.testing.assert_array_equal(got.edges.feature_b, fb)
    assert fa.size and (ref["n_both"][(ref["pearson"] >= 0.2)] < 10).any()  # the bar mattered


def test_histograms_need_one_number_of_bins(pair):
    store, _ = pair
    bins = {"agreement": np.linspace(0, 1, 11), "jaccard": np.linspace(0, 1, 21)}
    with pytest.raises(FeatstoreError, match="one number"):
        several_bests(PairScan.open(store, 6, 7, save=False), {"pearson": 0.2}, 1, bins=bins)
