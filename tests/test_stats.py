"""Exact all-pairs statistics: three engines, one result, equal to numpy/scipy references."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import scipy.stats
from helpers import build_store, sparse_acts

from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.stats import (
    finish,
    kernel,
    measures,
    query,
    shardsums,
)
from featstore.stats.query import PairQuery
from featstore.store import spec
from featstore.store.local import FeatureStats


def reference(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of every pair, straight from the dense definitions (d_a x d_b arrays)."""
    on_x, on_y = x > 0, y > 0
    d_a = x.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = np.corrcoef(x.T, y.T)[:d_a, d_a:] if x.shape[0] > 1 else np.nan
        both = (on_x[:, :, None] & on_y[:, None, :]).sum(0)
        either = (on_x[:, :, None] | on_y[:, None, :]).sum(0)
        return {
            "n_both": both,
            "n_either": either,
            "sum_xy": x.T @ y,
            "pearson": np.broadcast_to(pearson, both.shape),
            "agreement": (on_x[:, :, None] == on_y[:, None, :]).mean(0),
            "jaccard": both / either,
        }


def assert_matches(frame: pl.DataFrame, ref: dict[str, np.ndarray], offset=(0, 0)) -> None:
    fa = frame["feature_a"].to_numpy() - offset[0]
    fb = frame["feature_b"].to_numpy() - offset[1]
    for name, want in ref.items():
        got = frame[name].fill_null(np.nan).to_numpy()
        np.testing.assert_allclose(got, want[fa, fb], rtol=1e-9, atol=1e-9, err_msg=name)


def dense(matrix: sp.spmatrix) -> np.ndarray:
    return matrix.toarray().astype(np.float64)


def edge_matrices(n: int = 40) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Columns: on every token (varying), on every token (constant), on none, on one token."""
    rng = np.random.default_rng(7)
    x = sparse_acts(n, 8, 0.3, seed=11).toarray()
    y = sparse_acts(n, 6, 0.3, seed=12).toarray()
    for m in (x, y):
        m[:, 0] = rng.uniform(0.5, 2.0, n)
        m[:, 1] = 1.5
        m[:, 2] = 0.0
        m[:, 3] = 0.0
        m[rng.integers(n), 3] = 2.0
    return sp.csr_matrix(x), sp.csr_matrix(y)


@pytest.fixture
def two_shards(tmp_path: Path):
    acts = {
        6: {"s0": sparse_acts(70, 12, 0.25, seed=1), "s1": sparse_acts(45, 12, 0.25, seed=2)},
        7: {"s0": sparse_acts(70, 15, 0.25, seed=3), "s1": sparse_acts(45, 15, 0.25, seed=4)},
    }
    return build_store(tmp_path / "home", acts), acts


# -- engines --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", query.ENGINES)
@pytest.mark.parametrize(
    "n, d_a, d_b, density, seed",
    [
        pytest.param(50, 10, 12, 0.3, 0, id="small"),
        pytest.param(300, 40, 30, 0.05, 1, id="sparse"),
        pytest.param(1, 5, 5, 0.8, 2, id="single token"),
    ],
)
def test_engines_match_numpy(tmp_path, engine, n, d_a, d_b, density, seed):
    a, b = sparse_acts(n, d_a, density, seed), sparse_acts(n, d_b, density, seed + 100)
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    counts = query.shard_pair_counts(store, 6, 7, "s", engine=engine)
    x, y = dense(a), dense(b)
    both = (x > 0).astype(np.int64).T @ (y > 0)
    fa, fb = np.nonzero(both)  # row-major: sorted by (a, b)
    np.testing.assert_array_equal(counts.feature_a, fa)
    np.testing.assert_array_equal(counts.feature_b, fb)
    np.testing.assert_array_equal(counts.n_both, both[fa, fb])
    np.testing.assert_allclose(counts.sum_xy, (x.T @ y)[fa, fb], rtol=1e-12)
    assert counts.n_tokens == n and (counts.d_a, counts.d_b) == (d_a, d_b)


def test_edge_cases_match_corrcoef_and_scipy(tmp_path):
    a, b = edge_matrices()
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    frames = [
        query.pair_stats(store, PairQuery(6, 7, engine=e, recompute=True)) for e in query.ENGINES
    ]
    for frame in frames[1:]:
        assert frame.select("feature_a", "feature_b", "n_both", "n_either").equals(
            frames[0].select("feature_a", "feature_b", "n_both", "n_either")
        )
        for col in ("sum_xy", "pearson", "agreement", "jaccard"):
            np.testing.assert_allclose(frame[col].to_numpy(), frames[0][col].to_numpy(), rtol=1e-12)
    x, y = dense(a), dense(b)
    assert_matches(frames[0], reference(x, y))
    frame = frames[0]
    assert (
        frame.filter(pl.col("feature_a") == 1)["pearson"].null_count()
        == frame.filter(pl.col("feature_a") == 1).height
    )  # a constant feature has no correlation
    assert frame.filter(pl.col("feature_a") == 2).height == 0  # never active: no co-active pair
    row = frame.filter((pl.col("feature_a") == 0) & (pl.col("feature_b") == 0))
    assert row["pearson"][0] == pytest.approx(scipy.stats.pearsonr(x[:, 0], y[:, 0]).statistic)


def test_constant_feature_has_no_pearson_despite_rounding(tmp_path):
    x = sparse_acts(1000, 3, 0.2, seed=5).toarray()
    x[:, 0] = 0.7  # n*sumsq - sum^2 rounds to about 1e-8 here, not 0
    store = build_store(tmp_path, {6: {"s": sp.csr_matrix(x)}, 7: {"s": sparse_acts(1000, 4, 0.3)}})
    frame = query.pair_stats(store, PairQuery(6, 7))
    assert frame.filter(pl.col("feature_a") == 0)["pearson"].null_count() == 4
    assert frame.filter(pl.col("feature_a") == 1)["pearson"].null_count() == 0


def test_blocks_and_pure_function_agree(tmp_path):
    a, b = sparse_acts(500, 30, 0.1, 3), sparse_acts(500, 20, 0.1, 4)
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    whole = query.sparse_pair_counts(a, b)
    blocked = shardsums.shard_pair_counts(store, 6, 7, "s", block_tokens=64)
    np.testing.assert_array_equal(blocked.n_both, whole.n_both)
    np.testing.assert_allclose(blocked.sum_xy, whole.sum_xy, rtol=1e-12)
    feature_blocks = list(shardsums.iter_sparse_pair_counts(a, b, max_work=300))
    assert len(feature_blocks) > 3
    streamed = shardsums.PairCounts.total(feature_blocks, same_tokens=True)
    for name in ("feature_a", "feature_b", "n_both", "sum_xy"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name))
    assert streamed.n_tokens == 500
    loose = list(shardsums.iter_sparse_pair_counts(a, b, max_work=300, sort=False))
    assert [p.feature_a[0] for p in loose] == [p.feature_a[0] for p in feature_blocks]
    resorted = shardsums.PairCounts.total(loose, same_tokens=True).sorted()
    for name in ("feature_a", "feature_b", "n_both", "sum_xy"):
        np.testing.assert_array_equal(getattr(resorted, name), getattr(whole, name))
    shardsums.save_shard_pairs(store, 6, 7, "s", iter(feature_blocks))
    part = shardsums.load_shard_pairs(store, 6, 7, "s", (4, 9))
    inside = whole.select((4, 9))
    np.testing.assert_array_equal(part.feature_b, inside.feature_b)
    np.testing.assert_array_equal(part.n_both, inside.n_both)
    with_zero = a.copy()
    with_zero.data[0] = 0.0  # an explicit zero is not an activation
    x = dense(with_zero)
    zeroed = query.sparse_pair_counts(with_zero.tocoo(), b)
    both = (x > 0).astype(np.int64).T @ (dense(b) > 0)
    np.testing.assert_array_equal(zeroed.n_both, both[both > 0])


def test_two_shards_merged_equal_one_shard_of_both(tmp_path, two_shards):
    store, acts = two_shards
    merged = query.pair_stats(store, PairQuery(6, 7))
    joined = {layer: {"all": sp.vstack([m["s0"], m["s1"]]).tocsr()} for layer, m in acts.items()}
    one = query.pair_stats(build_store(tmp_path / "one", joined), PairQuery(6, 7))
    assert merged.select("feature_a", "feature_b", "n_both").equals(
        one.select("feature_a", "feature_b", "n_both")
    )
    for col in ("sum_xy", "pearson", "agreement", "jaccard"):
        np.testing.assert_allclose(merged[col].to_numpy(), one[col].to_numpy(), rtol=1e-10)
    assert_matches(merged, reference(dense(joined[6]["all"]), dense(joined[7]["all"])))


# -- storage --------------------------------------------------------------------------------------


def test_shard_sums_are_saved_reused_and_a_new_shard_costs_its_own(two_shards, monkeypatch):
    store, acts = two_shards  # kept sums (keep_sums): a cache, off by default
    first = query.pair_stats(store, PairQuery(6, 7, keep_sums=True))
    attrs = dict(store.group(spec.pairs_path(6, 7, "s0"), "pairs").attrs)
    assert attrs[spec.ENCODING_TYPE] == "pair_stats_coo" and attrs["layers"] == [6, 7]
    assert attrs["n_tokens"] == 70 and (attrs["d_a"], attrs["d_b"]) == (12, 15)
    computed = []
    original = shardsums.iter_shard_pair_counts
    monkeypatch.setattr(
        shardsums,
        "iter_shard_pair_counts",
        lambda st, a, b, s, e: computed.append(s) or original(st, a, b, s, e),
    )
    assert query.pair_stats(store, PairQuery(6, 7, keep_sums=True)).equals(first)
    assert computed == []
    store.write_activations(6, "s2", sparse_acts(30, 12, 0.25, seed=5))
    store.write_activations(7, "s2", sparse_acts(30, 15, 0.25, seed=6))
    query.pair_stats(store, PairQuery(6, 7, keep_sums=True))
    assert computed == ["s2"]
    store.write_activations(7, "s1", sparse_acts(45, 15, 0.3, seed=9))  # stale sums
    query.pair_stats(store, PairQuery(6, 7, keep_sums=True))
    assert computed == ["s2", "s1"]
    same_pattern = store.read(6, "s0")
    same_pattern.data *= 2  # new values, same nonzeros
    store.write_activations(6, "s0", same_pattern)
    query.pair_stats(store, PairQuery(6, 7, keep_sums=True))
    assert computed == ["s2", "s1", "s0"]


def test_small_feature_blocks_give_the_same_table_and_counts(two_shards):
    store, _ = two_shards
    kwargs = {"min_pearson": -0.1, "min_jaccard": 0.05}
    streamed = query.pair_report(store, PairQuery(6, 7, **kwargs))  # computed in memory
    query.pair_stats(
        store, PairQuery(6, 7, keep_sums=True)
    )  # saved sums: read in blocks of max_block_pairs
    whole, whole_counts = query.pair_report(store, PairQuery(6, 7, **kwargs))
    blocked, blocked_counts = query.pair_report(store, PairQuery(6, 7, max_block_pairs=7, **kwargs))
    assert blocked.equals(whole) and blocked_counts == whole_counts
    assert streamed[0].equals(whole) and streamed[1] == whole_counts
    assert len(shardsums.feature_blocks(store, 6, 7, ["s0", "s1"], (0, 12), 7)) > 5


def test_merged_table_is_saved_for_sql(two_shards):
    store, _ = two_shards
    path = query.pair_stats_path(store, 6, 7)
    frame = query.pair_stats(store, PairQuery(6, 7, min_pearson=0.3))
    assert not path.exists()  # a thresholded query writes no table unasked
    assert query.pair_stats(store, PairQuery(6, 7, min_pearson=0.3, save=True)).equals(frame)
    saved = pl.read_parquet(path)
    assert saved["layer_a"].unique().to_list() == [6] and saved["layer_b"].unique().to_list() == [7]
    assert saved.filter(pl.col("pearson") >= 0.3).drop("layer_a", "layer_b").equals(frame)


def test_saving_keeps_no_pair_state_unless_asked(two_shards, capsys):
    """Issue 15: the merged table is written without any per-shard pair state (its size would
    grow with the shards); kept sums give the same table bit for bit, and are then reused."""
    store, acts = two_shards
    argv = ["--home", str(store.home), "stats", "--layer-a", "6", "--layer-b", "7", "--out"]
    out = str(store.home.parent / "out.parquet")
    assert main([*argv, out]) == 0
    assert query.pair_stats_path(store, 6, 7).exists() and store.children(spec.PAIRS) == []
    table = query.pair_stats(store, PairQuery(6, 7, save=True))
    assert store.children(spec.PAIRS) == []
    joined = [sp.vstack([m["s0"], m["s1"]]).tocsr() for m in acts.values()]
    assert_matches(table, reference(*(dense(m) for m in joined)))
    assert main([*argv, out, "--keep-shard-sums"]) == 0
    assert store.children(spec.PAIRS + "/6-7") == ["s0", "s1"]
    assert query.pair_stats(store, PairQuery(6, 7)).equals(table)  # read back: the same bits
    capsys.readouterr()


def test_new_shard_streamed_in_small_blocks_beside_saved_ones(two_shards, monkeypatch):
    store, acts = two_shards
    query.pair_stats(store, PairQuery(6, 7, shards=["s0"], keep_sums=True))  # s0 saved, s1 not
    monkeypatch.setattr(kernel, "MAX_BLOCK_WORK", 40)  # many blocks per shard
    assert len(list(shardsums.iter_sparse_pair_counts(acts[6]["s1"], acts[7]["s1"]))) > 3
    kwargs = {"min_pearson": 0.05, "min_both": 2}
    got, counts = query.pair_report(store, PairQuery(6, 7, **kwargs))
    assert store.children(spec.PAIRS + "/6-7") == ["s0"]  # a query saves nothing
    assert not query.pair_stats_path(store, 6, 7).exists()
    again, counts_again = query.pair_report(
        store, PairQuery(6, 7, max_block_pairs=9, keep_sums=True, **kwargs)
    )
    assert store.children(spec.PAIRS + "/6-7") == ["s0", "s1"]
    assert got.equals(again) and counts == counts_again
    joined = [sp.vstack([m["s0"], m["s1"]]).tocsr() for m in acts.values()]
    ref = reference(*(dense(m) for m in joined))
    with np.errstate(invalid="ignore"):
        want = (ref["pearson"] >= 0.05) & (ref["n_both"] >= 2)
    pairs_wanted = set(zip(*np.nonzero(want), strict=True))
    assert set(got.select("feature_a", "feature_b").iter_rows()) == pairs_wanted
    assert_matches(got, ref)
    unfiltered = query.pair_stats(store, PairQuery(6, 7, recompute=True))
    keep = query.passes(0.05) & (pl.col("n_both") >= 2)
    assert unfiltered.filter(keep).equals(got)


# -- ranges, all pairs and thresholds -------------------------------------------------------------


def test_all_pairs_reproduce_the_dense_table_for_a_10x10_range(tmp_path):
    a, b = sparse_acts(80, 30, 0.08, 21), sparse_acts(80, 25, 0.08, 22)
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    frame = query.pair_stats(
        store, PairQuery(6, 7, features_a=(5, 15), features_b=(10, 20), all_pairs=True)
    )
    assert frame.height == 100
    assert (frame["n_both"] == 0).sum() > 0  # some pairs are never co-active
    ref = reference(dense(a)[:, 5:15], dense(b)[:, 10:20])
    assert_matches(frame, ref, offset=(5, 10))
    co_active = query.pair_stats(store, PairQuery(6, 7, features_a=(5, 15), features_b=(10, 20)))
    assert co_active.equals(frame.filter(pl.col("n_both") > 0))


@pytest.mark.parametrize(
    "min_pearson, min_jaccard",
    [(0.2, None), (None, 0.15), (0.1, 0.1), (-0.05, None), (-0.2, 0.0), (-1.0, None), (0.0, -1.0)],
)
@pytest.mark.parametrize("ranges", [(None, None), ((3, 17), (0, 9))])
def test_threshold_counts_match_brute_force(tmp_path, min_pearson, min_jaccard, ranges):
    x, y = edge_matrices(60)
    more_a, more_b = sparse_acts(60, 12, 0.1, 31), sparse_acts(60, 10, 0.1, 32)
    a, b = sp.hstack([x, more_a]).tocsr(), sp.hstack([y, more_b]).tocsr()
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    ra, rb = ranges
    frame = query.pair_stats(store, PairQuery(6, 7, features_a=ra, features_b=rb))
    got = query.threshold_counts(
        frame,
        store.feature_stats(6, "s"),
        store.feature_stats(7, "s"),
        min_pearson=min_pearson,
        min_jaccard=min_jaccard,
        features_a=ra,
        features_b=rb,
    )
    ra, rb = ra or (0, a.shape[1]), rb or (0, b.shape[1])
    ref = reference(dense(a)[:, slice(*ra)], dense(b)[:, slice(*rb)])
    with np.errstate(invalid="ignore"):
        ok_p = ref["pearson"] >= min_pearson - 1e-12 if min_pearson is not None else True
        ok_j = ref["jaccard"] >= min_jaccard if min_jaccard is not None else True
    assert got["pairs"] == ref["n_both"].size
    assert got["co_active"] == int((ref["n_both"] > 0).sum())
    if min_pearson is not None:
        assert got["pearson"] == int(np.sum(ok_p))
    if min_jaccard is not None:
        assert got["jaccard"] == int(np.sum(ok_j))
    assert got["all"] == int(np.sum(np.broadcast_to(ok_p & ok_j, ref["n_both"].shape)))


def test_threshold_counts_for_big_d_need_no_dense_array():
    rng = np.random.default_rng(0)
    d = 30_000  # a dense d x d float64 array would need 7 GB
    count = rng.integers(1, 50, d)
    total = count * rng.uniform(0.5, 2.0, d)
    stats_a = FeatureStats(1000, count, total, total * 2.5)
    empty = finish.finish_stats(shardsums.PairCounts.empty(1000, d, d), stats_a, stats_a)
    got = query.threshold_counts(empty, stats_a, stats_a, min_pearson=-0.01)
    u = finish.Spread.of(stats_a).u
    sample = rng.integers(0, d, (2, 200_000))
    share = np.mean(-(u[sample[0]] * u[sample[1]]) >= -0.01)
    assert got["pearson"] == pytest.approx(share * d * d, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_pearson": 1.5}, "min_pearson"),
        ({"min_jaccard": -2}, "min_jaccard"),
        ({"features_a": (5, 5)}, "features_a"),
        ({"features_b": (0, 99)}, "features_b"),
        ({"engine": "spark"}, "engine"),
        ({"shards": ["nope"]}, "nope"),
    ],
)
def test_bad_arguments_are_one_line_errors(two_shards, kwargs, message):
    store, _ = two_shards
    with pytest.raises(FeatstoreError, match=message):
        query.pair_stats(store, PairQuery(6, 7, recompute=True, **kwargs))


def test_layers_with_different_token_counts_are_refused(tmp_path):
    store = build_store(tmp_path, {6: {"s": sparse_acts(10, 4)}, 7: {"s": sparse_acts(10, 4)}})
    store.write_activations(7, "s", sparse_acts(11, 4))
    with pytest.raises(FeatstoreError, match="layer 6 has 10 tokens, layer 7 has 11"):
        query.pair_stats(store, PairQuery(6, 7))


# -- command line ---------------------------------------------------------------------------------


def test_cli_writes_the_passing_pairs(two_shards, tmp_path, capsys):
    store, _ = two_shards
    out = tmp_path / "out.parquet"
    argv = ["--home", str(store.home), "stats", "--layer-a", "6", "--layer-b", "7"]
    argv += ["--min-pearson", "0.2", "--min-jaccard", "0.1", "--out", str(out)]
    assert main(argv) == 0
    want = query.pair_stats(store, PairQuery(6, 7, min_pearson=0.2, min_jaccard=0.1))
    assert pl.read_parquet(out).equals(want)
    printed = capsys.readouterr().out
    assert f"wrote {want.height} pairs" in printed and "pearson >= 0.2" in printed


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--layer-a", "5", "--layer-b", "7"], id="unknown layer"),
        pytest.param(["--layer-a", "6", "--layer-b", "7", "--min-pearson", "1.5"], id="threshold"),
        pytest.param(["--layer-a", "6", "--layer-b", "7", "--features-a", "4:4"], id="empty range"),
        pytest.param(["--layer-a", "6", "--layer-b", "7", "--engine", "x"], id="engine"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(two_shards, tmp_path, capsys, extra):
    store, _ = two_shards
    out = tmp_path / "out.parquet"
    assert main(["--home", str(store.home), "stats", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore: error: ") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("seed", range(5))
def test_balanced_ranges_cover_in_order_within_the_limit(seed):
    rng = np.random.default_rng(seed)
    work = rng.integers(0, 20, rng.integers(1, 60))
    ranges = shardsums.balanced_ranges(work, 25)
    assert ranges[0][0] == 0 and ranges[-1][1] == work.size
    assert all(lo < hi == lo2 for (lo, hi), (lo2, _) in itertools.pairwise(ranges))
    assert all(work[lo:hi].sum() <= 25 + work[lo:hi].max() for lo, hi in ranges)


# -- the query path: the Pearson screen in the engine, chunks and threads -------------------------


def screen_of(a: sp.csr_matrix, b: sp.csr_matrix, threshold: float) -> kernel.Screen:
    stats_ab = FeatureStats.of(a), FeatureStats.of(b)
    return finish.pearson_screen(stats_ab, [("pearson", threshold)])


@pytest.mark.parametrize("threshold", [None, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("max_work", [None, 40])
def test_screened_engine_keeps_exactly_the_pairs_passing_the_screen(threshold, max_work):
    x, y = edge_matrices(90)
    a = sp.hstack([x, sparse_acts(90, 30, 0.15, 43)]).tocsr()
    b = sp.hstack([y, sparse_acts(90, 25, 0.15, 44)]).tocsr()
    xd, yd = dense(a), dense(b)
    if threshold is None:  # a screen every co-active pair passes
        screen = kernel.Screen(np.ones(a.shape[1]), np.ones(b.shape[1]), -np.inf)
    else:
        screen = screen_of(a, b, threshold)
    blocks = list(shardsums.iter_sparse_pair_counts(a, b, max_work=max_work, screen=screen))
    got = shardsums.PairCounts.total(blocks, same_tokens=True)
    assert max_work is None or len(blocks) > 3
    both = (xd > 0).astype(np.int64).T @ (yd > 0)
    fa, fb = np.nonzero(both)  # row-major: sorted by (feature_a, feature_b)
    sum_xy = (xd.T @ yd)[fa, fb]
    bound = sum_xy * screen.col[fb] * screen.row[fa]
    with np.errstate(invalid="ignore"):
        keep = bound >= screen.floor
    assert 0 < keep.sum() and (threshold is None or keep.sum() < keep.size)
    np.testing.assert_array_equal(got.feature_a, fa[keep])
    np.testing.assert_array_equal(got.feature_b, fb[keep])
    np.testing.assert_array_equal(got.n_both, both[fa, fb][keep])
    np.testing.assert_allclose(got.sum_xy, sum_xy[keep], rtol=1e-12)
    # The sums are scipy's to the last bit: the same products added in the same order.
    product = (a.T.astype(np.float64) @ b.astype(np.float64)).tocsr()
    np.testing.assert_array_equal(got.sum_xy, np.asarray(product[got.feature_a, got.feature_b])[0])


def test_screened_engine_on_a_single_token_and_on_no_coactive_pair():
    x, y = sp.csr_matrix(np.array([[0.0, 2.0, 1.0]])), sp.csr_matrix(np.array([[3.0, 0.0]]))
    screen = kernel.Screen(np.ones(3), np.ones(2), -np.inf)
    got = shardsums.PairCounts.total(list(shardsums.iter_sparse_pair_counts(x, y, screen=screen)))
    assert (got.feature_a.tolist(), got.feature_b.tolist()) == ([1, 2], [0, 0])
    assert got.n_both.tolist() == [1, 1] and got.sum_xy.tolist() == [6.0, 3.0]
    apart = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
    alone = sp.csr_matrix(np.array([[0.0], [1.0]]))
    none = list(shardsums.iter_sparse_pair_counts(apart, alone, screen=kernel.Screen(
        np.ones(2), np.ones(1), -np.inf)))  # fmt: skip
    assert sum(p.nnz for p in none) == 0


@pytest.mark.parametrize("d_b", [200, 5000, 70_000])  # features sorted in 1, 2, 3 radix passes
@pytest.mark.parametrize("sort", [True, False])
def test_engine_rows_of_many_features_equal_scipy_sorted_or_grouped(d_b, sort):
    rng = np.random.default_rng(d_b)
    a = sparse_acts(60, 4, 0.5, 51)
    b = sp.random(60, d_b, density=min(0.5, 600 / d_b), format="csr", random_state=rng)
    b.data = b.data.astype(np.float32) + np.float32(0.01)
    blocks = list(shardsums.iter_sparse_pair_counts(a, b, max_work=800, sort=sort))
    assert len(blocks) > 1 and all(np.all(np.diff(p.feature_a) >= 0) for p in blocks)
    got = shardsums.PairCounts.total(blocks, same_tokens=True)
    want = (a.T.astype(np.float64) @ b.astype(np.float64)).tocsr()
    want.sort_indices()
    assert np.diff(want.indptr).max() > 128  # rows long enough for the radix sort
    fa = np.repeat(np.arange(a.shape[1]), np.diff(want.indptr))
    got = got if sort else got.sorted()  # unsorted: each feature_a's pairs together (above)
    np.testing.assert_array_equal(got.feature_a, fa)
    np.testing.assert_array_equal(got.feature_b, want.indices)
    np.testing.assert_array_equal(got.sum_xy, want.data)
    on = (a.T > 0).astype(np.int64) @ (b > 0).astype(np.int64)
    np.testing.assert_array_equal(got.n_both, np.asarray(on[got.feature_a, got.feature_b])[0])


def test_a_screen_that_does_not_fit_the_layers_is_refused_in_one_line():
    a, b = sparse_acts(30, 6, 0.3, 45), sparse_acts(30, 5, 0.3, 46)
    wrong = kernel.Screen(np.ones(6), np.ones(4), 0.1)
    with pytest.raises(FeatstoreError, match="do not fit layers of 6 and 5 features"):
        list(shardsums.iter_sparse_pair_counts(a, b, screen=wrong))


@pytest.mark.parametrize("threshold", [0.0, 1e-6, 0.05, 0.3, 0.9, 1.0])
def test_pearson_screen_keeps_every_pair_reaching_the_threshold(threshold):
    x, y = edge_matrices(90)
    a = sp.hstack([x, sparse_acts(90, 20, 0.15, 43)]).tocsr()
    b = sp.hstack([y, sparse_acts(90, 16, 0.15, 44)]).tocsr()
    counts = query.sparse_pair_counts(a, b)
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    rules = [("pearson", threshold)]
    exact = finish.measure_values(counts, sa, sb, ["pearson"])["pearson"]
    want = np.flatnonzero(finish.passing_mask({"pearson": exact}, counts.n_both, rules))
    screen = finish.pearson_screen((sa, sb), rules)
    if threshold <= 0:
        assert screen is None
    else:
        assert set(want) <= set(screen.positions(counts, 16))
    rows, values = finish.passing_rows(counts, sa, sb, rules)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(values["pearson"], exact[want])


@pytest.mark.parametrize("every", [False, True])
def test_passing_rows_by_small_chunks_equal_one_pass(monkeypatch, every):
    a, b = sparse_acts(300, 30, 0.1, 45), sparse_acts(300, 25, 0.1, 46)
    counts = query.sparse_pair_counts(a, b)
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    rules = finish.conditions(0.05, None, {"sufficiency": 0.1, "mutual_information": 0.001})
    names = ["pearson", "sufficiency", "mutual_information"]
    values = finish.measure_values(counts, sa, sb, names)
    keep = np.flatnonzero(finish.passing_mask(values, counts.n_both, rules, min_both=2))
    monkeypatch.setattr(finish, "CHUNK_PAIRS", 7)
    rows, got = finish.passing_rows(counts, sa, sb, rules, min_both=2, every=every)
    np.testing.assert_array_equal(rows, keep)
    for name in names:
        np.testing.assert_array_equal(got[name], values[name] if every else values[name][keep])
    np.testing.assert_array_equal(got["n_both"], counts.n_both if every else counts.n_both[keep])


def test_pipelined_keeps_the_order_of_the_items():
    import time
    from concurrent.futures import ThreadPoolExecutor

    def slow_first(i: int, delay: float) -> int:
        time.sleep(delay)
        return i

    items = [(i, 0.02 if i % 3 == 0 else 0.0) for i in range(10)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(query._pipelined(pool, slow_first, items, 2)) == list(range(10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_pearson": 0.1},
        {"min_pearson": 0.1, "thresholds": {"sufficiency": 0.2, "pmi": 0.0}, "min_both": 2},
        {"min_pearson": 0.05, "intervals": True, "features_a": (3, 30), "features_b": (2, 20)},
        {"min_pearson": -0.05},
    ],
)
def test_screened_queries_in_small_blocks_match_numpy(tmp_path, monkeypatch, kwargs):
    a, b = sparse_acts(250, 40, 0.08, 47), sparse_acts(250, 30, 0.08, 48)
    store = build_store(tmp_path, {6: {"s": a}, 7: {"s": b}})
    whole = query.pair_stats(
        store, PairQuery(6, 7, save=False)
    )  # every co-active pair, every measure
    monkeypatch.setattr(kernel, "MAX_BLOCK_WORK", 60)  # many blocks, pipelined
    monkeypatch.setattr(finish, "CHUNK_PAIRS", 16)
    got = query.pair_stats(store, PairQuery(6, 7, **kwargs))
    assert not store.children(spec.PAIRS)  # a query saves nothing
    ra, rb = kwargs.get("features_a", (0, 40)), kwargs.get("features_b", (0, 30))
    ref = reference(dense(a)[:, slice(*ra)], dense(b)[:, slice(*rb)])
    assert_matches(got, ref, offset=(ra[0], rb[0]))
    keep = pl.col("pearson") >= kwargs["min_pearson"]
    for measure, threshold in kwargs.get("thresholds", {}).items():
        keep &= pl.col(measure) >= threshold
    keep &= pl.col("n_both") >= kwargs.get("min_both", 0)
    keep &= pl.col("feature_a").is_between(*ra, closed="left")
    keep &= pl.col("feature_b").is_between(*rb, closed="left")
    assert got.drop(measures.INTERVAL_COLUMNS, strict=False).equals(whole.filter(keep))
    if kwargs.get("intervals"):
        feature_stats = store.feature_stats(6, "s"), store.feature_stats(7, "s")
        assert got.equals(measures.with_intervals(whole.filter(keep), *feature_stats))
