"""Activation cosine, relative activity thresholds and the BOS switch, each against numpy."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts
from helpers import table_measures as table_reference

from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.stats import measures, query
from featstore.stats.query import PairQuery
from featstore.stats.shardsums import Variant
from featstore.store import spec


@pytest.fixture
def two_shards(tmp_path):
    """Layers 6 and 7 over two shards of 48 tokens (sequences of 8), as dense arrays too."""
    acts = {
        layer: {s: sparse_acts(48, 9 if layer == 6 else 7, 0.35, seed + k) for k, s in
                enumerate(("s0", "s1"))}
        for layer, seed in ((6, 0), (7, 10))
    }  # fmt: skip
    store = build_store(tmp_path / "home", acts)
    dense = {
        layer: np.vstack([m.toarray().astype(np.float64) for m in per.values()])
        for layer, per in acts.items()
    }
    return store, dense[6], dense[7]


def test_cosine_column_is_uncentred_cosine_of_the_activations(two_shards):
    store, x, y = two_shards
    frame = query.pair_stats(store, PairQuery(6, 7))
    fa, fb = frame["feature_a"].to_numpy(), frame["feature_b"].to_numpy()
    want = (x.T @ y) / np.sqrt(np.outer((x * x).sum(0), (y * y).sum(0)))
    np.testing.assert_allclose(frame["cosine"].to_numpy(), want[fa, fb], rtol=1e-9)
    top = frame.filter(measures.above("cosine", 0.3))
    assert top.height == int(((want >= 0.3) & (x.T @ y > 0)).sum()) > 0
    kept = query.pair_stats(store, PairQuery(6, 7, thresholds={"cosine": 0.3}))
    assert kept.select("feature_a", "feature_b").equals(top.select("feature_a", "feature_b"))


def test_cosine_threshold_counts_never_coactive_pairs_at_zero(two_shards):
    store, x, y = two_shards
    _, counts = query.pair_report(store, PairQuery(6, 7, thresholds={"cosine": 0.0}))
    alive = int(((x > 0).any(0)).sum()) * int(((y > 0).any(0)).sum())
    assert counts["cosine"] == alive  # every pair of firing features has cosine >= 0


def relative_reference(m: np.ndarray, r: float) -> np.ndarray:
    """Activations above r x their column's maximum; the rest zero."""
    return np.where(m > r * m.max(axis=0, keepdims=True), m, 0.0)


@pytest.mark.parametrize("r", [0.2, 0.5])
def test_relative_threshold_counts_match_numpy(two_shards, r):
    store, x, y = two_shards
    frame = query.pair_stats(store, PairQuery(6, 7, variant=Variant(relative_threshold=r)))
    xr, yr = relative_reference(x, r), relative_reference(y, r)
    ref = table_reference(xr, yr)
    fa, fb = frame["feature_a"].to_numpy(), frame["feature_b"].to_numpy()
    both = (xr > 0).astype(int).T @ (yr > 0).astype(int)
    assert frame.height == int((both > 0).sum())
    np.testing.assert_array_equal(frame["n_both"].to_numpy(), both[fa, fb])
    for name in ("jaccard", "sufficiency", "necessity"):
        got = frame[name].fill_null(np.nan).to_numpy()
        np.testing.assert_allclose(got, ref[name][fa, fb], rtol=1e-12, err_msg=name)


def test_relative_threshold_uses_the_maxima_of_the_chosen_shards(two_shards):
    store, x, y = two_shards
    one = query.pair_stats(
        store, PairQuery(6, 7, shards=["s0"], variant=Variant(relative_threshold=0.5))
    )
    xr, yr = relative_reference(x[:48], 0.5), relative_reference(y[:48], 0.5)
    both = (xr > 0).astype(int).T @ (yr > 0).astype(int)
    assert one["n_both"].sum() == both.sum()
    saved = query.pair_stats(
        store,
        PairQuery(6, 7, shards=["s0"], variant=Variant(relative_threshold=0.5), keep_sums=True),
    )
    assert saved.equals(one)
    folders = [f for f in store.children(spec.PAIRS) if ".r0.5-" in f]
    assert len(folders) == 1  # keyed by the shards whose maxima set the thresholds
    whole = query.pair_stats(
        store, PairQuery(6, 7, variant=Variant(relative_threshold=0.5), keep_sums=True)
    )
    assert len([f for f in store.children(spec.PAIRS) if ".r0.5-" in f]) == 2
    assert not whole.equals(one)


def test_without_bos_equals_statistics_of_the_other_positions(tmp_path, two_shards):
    store, x, y = two_shards
    got = query.pair_stats(store, PairQuery(6, 7, variant=Variant(bos=False)))
    keep = np.arange(x.shape[0]) % 8 != 0  # build_store: sequences of 8 tokens
    cut = {6: {"s": sp.csr_matrix(x[keep])}, 7: {"s": sp.csr_matrix(y[keep])}}
    want = query.pair_stats(build_store(tmp_path / "cut", cut), PairQuery(6, 7))
    assert got.select("feature_a", "feature_b", "n_tokens", "n_both").equals(
        want.select("feature_a", "feature_b", "n_tokens", "n_both")
    )
    np.testing.assert_allclose(got["pearson"].to_numpy(), want["pearson"].to_numpy(), rtol=1e-9)
    saved = query.pair_stats(store, PairQuery(6, 7, variant=Variant(bos=False), keep_sums=True))
    assert "6-7.nobos" in store.children(spec.PAIRS) and saved.equals(got)
    assert query.pair_stats(store, PairQuery(6, 7, variant=Variant(bos=False))).equals(
        got
    )  # read back


def test_relative_threshold_without_bos_takes_maxima_past_bos(tmp_path, two_shards):
    store, x, y = two_shards
    got = query.pair_stats(
        store, PairQuery(6, 7, variant=Variant(relative_threshold=0.3, bos=False))
    )
    keep = np.arange(x.shape[0]) % 8 != 0
    xr, yr = relative_reference(x[keep], 0.3), relative_reference(y[keep], 0.3)
    both = (xr > 0).astype(int).T @ (yr > 0).astype(int)
    assert got.height == int((both > 0).sum()) and got["n_tokens"][0] == keep.sum()


def test_stats_cli_records_the_variant_in_the_file(two_shards, tmp_path, capsys):
    store, _, _ = two_shards
    out = tmp_path / "pairs.parquet"
    args = ["--home", str(store.home), "stats", "--layer-a", "6", "--layer-b", "7"]
    assert main([*args, "--relative-threshold", "0.2", "--no-bos", "--out", str(out)]) == 0
    meta = json.loads(pq.read_metadata(out).metadata[b"featstore.variant"])
    assert meta == {"active_threshold": 0.0, "relative_threshold": 0.2, "bos": "excluded",
                    "null": False}  # fmt: skip
    assert pl.read_parquet(out).height > 0
    capsys.readouterr()
    assert main([*args, "--relative-threshold", "1.5", "--out", str(out)]) == 2
    assert "relative_threshold must be a number in [0, 1)" in capsys.readouterr().err


def test_bad_relative_thresholds_are_refused():
    for bad in (-0.1, 1.0, float("nan"), "0.2"):
        with pytest.raises(FeatstoreError, match="relative_threshold"):
            Variant(relative_threshold=bad)
