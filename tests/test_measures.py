"""Every cross-layer measure equals a direct numpy/scipy computation, edge cases included."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import scipy.stats
from helpers import build_store, sparse_acts
from helpers import table_measures as table_reference

from featstore.analysis import decoders
from featstore.analysis.graph import build_graph
from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.stats import finish, measures, query, shardsums
from featstore.stats.query import PairQuery
from featstore.stats.shardsums import Variant
from featstore.store import spec


def edge_layers(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dense layers whose first columns are: never active, active on every token, on one token,
    and (in b) exactly where a's feature 4 is off: a mutually exclusive pair."""
    x = sparse_acts(n, 9, 0.3, seed).toarray().astype(np.float64)
    y = sparse_acts(n, 7, 0.3, seed + 1).toarray().astype(np.float64)
    for m in (x, y):
        m[:, 0] = 0.0
        m[:, 1] = np.random.default_rng(seed).uniform(0.5, 2.0, n)
        m[:, 2] = 0.0
        m[5, 2] = 1.0
    y[:, 3] = np.where(x[:, 4] > 0, 0.0, 1.0)
    as_stored = lambda m: m.astype(np.float32).astype(np.float64)  # noqa: E731
    return as_stored(x), as_stored(y)


@pytest.fixture
def edge_store(tmp_path):
    x, y = edge_layers()
    store = build_store(tmp_path / "home", {6: {"s": sp.csr_matrix(x)}, 7: {"s": sp.csr_matrix(y)}})
    return store, x, y


def test_table_measures_match_direct_definitions_on_every_pair(edge_store):
    store, x, y = edge_store
    frame = query.pair_stats(
        store, PairQuery(6, 7, all_pairs=True, features_a=(0, 9), features_b=(0, 7))
    )
    ref = table_reference(x, y)
    fa, fb = frame["feature_a"].to_numpy(), frame["feature_b"].to_numpy()
    for name in measures.NEW_COLUMNS:
        got = frame[name].fill_null(np.nan).to_numpy()
        np.testing.assert_allclose(got, ref[name][fa, fb], rtol=1e-9, atol=1e-12, err_msg=name)
    never = frame.filter(pl.col("feature_a") == 0)  # never active: no conditional, no PMI
    assert never["sufficiency"].null_count() == never.height == never["pmi"].null_count()
    always = frame.filter((pl.col("feature_a") == 1) & (pl.col("feature_b") == 1))
    assert always["sufficiency"][0] == 1.0 and always["mutual_information"][0] == 0.0
    exclusive = frame.filter((pl.col("feature_a") == 4) & (pl.col("feature_b") == 3))
    assert exclusive["n_both"][0] == 0 and exclusive["pmi"][0] == -np.inf
    assert exclusive["mutual_information"][0] == pytest.approx(
        scipy.stats.entropy([np.mean(x[:, 4] > 0), np.mean(x[:, 4] == 0)])
    )  # b is "not a": it carries all of a's entropy


def test_mutual_information_keeps_its_digits_for_rare_features():
    n, ca, cb = 10**7, np.array([3]), np.array([5])
    got = measures.mutual_information(measures.Table(n, ca, cb, np.array([1])))
    p = np.array([[1, 2], [4, n - 3 - 5 + 1]], dtype=np.longdouble) / n
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    want = float(np.sum(p * np.log(p / (pa * pb))))
    assert got[0] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("k, m", [(0, 10), (3, 10), (10, 10), (1, 1), (40, 1000)])
def test_wilson_interval_matches_scipy(k, m):
    lo, hi = measures.wilson(k, m)
    ci = scipy.stats.binomtest(k, m).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)


def test_interval_columns_match_scipy(edge_store):
    store, x, y = edge_store
    frame = query.pair_stats(store, PairQuery(6, 7, intervals=True))
    assert set(measures.INTERVAL_COLUMNS) <= set(frame.columns)
    for row in frame.filter(pl.col("pearson").is_not_null()).head(12).iter_rows(named=True):
        i, j = row["feature_a"], row["feature_b"]
        ci = scipy.stats.pearsonr(x[:, i], y[:, j]).confidence_interval(0.95)
        assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        count_a = int((x[:, i] > 0).sum())
        ci = scipy.stats.binomtest(row["n_both"], count_a).proportion_ci(method="wilson")
        assert (row["sufficiency_lo"], row["sufficiency_hi"]) == pytest.approx((ci.low, ci.high))
        ci = scipy.stats.binomtest(row["n_both"], row["n_either"]).proportion_ci(method="wilson")
        assert (row["jaccard_lo"], row["jaccard_hi"]) == pytest.approx((ci.low, ci.high))
    assert query.pair_stats(store, PairQuery(6, 7)).columns == list(
        finish.SCHEMA
    )  # no bounds unasked


# -- thresholds, support and never-co-active pairs ------------------------------------------------


def test_thresholds_on_any_measure_with_min_both(edge_store):
    store, x, y = edge_store
    frame = query.pair_stats(
        store, PairQuery(6, 7, thresholds={"sufficiency": 0.4, "pmi": 0.01}, min_both=3)
    )
    ref = table_reference(x, y)
    both = (x > 0).astype(int).T @ (y > 0).astype(int)
    with np.errstate(invalid="ignore"):
        keep = (ref["sufficiency"] >= 0.4) & (ref["pmi"] >= 0.01) & (both >= 3)
    want = set(zip(*np.nonzero(keep), strict=True))
    assert set(frame.select("feature_a", "feature_b").iter_rows()) == want


@pytest.mark.parametrize(
    "thresholds, min_both",
    [
        ({"mutual_information": 0.05}, 0),
        ({"agreement": 0.9}, 0),
        ({"mutual_information": 0.02, "pearson": -0.3}, 0),
        ({"necessity": 0.0}, 0),
        ({"mutual_information": 0.01}, 2),
        ({}, 2),
    ],
)
def test_threshold_counts_of_any_measure_cover_never_coactive_pairs(
    edge_store, thresholds, min_both
):
    store, x, y = edge_store
    frame, counts = query.pair_report(
        store, PairQuery(6, 7, thresholds=thresholds, min_both=min_both)
    )
    ref = table_reference(x, y)
    with np.errstate(invalid="ignore"):
        ref["pearson"] = np.corrcoef(x.T, y.T)[:9, 9:]
        ref["agreement"] = ((x > 0)[:, :, None] == (y > 0)[:, None, :]).mean(0)
        both = (x > 0).astype(int).T @ (y > 0).astype(int)
        ok = {m: ref[m] >= t - 1e-12 for m, t in thresholds.items()}
    support = both >= max(min_both, 0)
    for measure, mask in ok.items():
        assert counts[measure] == int((mask & support).sum()), measure
    everything = np.logical_and.reduce([support, *ok.values()])
    assert counts["all"] == int(everything.sum()) >= frame.height


def test_never_coactive_pairs_lists_exactly_the_high_ones(edge_store):
    store, x, y = edge_store
    listed, total = measures.never_coactive_pairs(
        store, 6, 7, "mutual_information", 0.05, shards=["s"]
    )
    ref = table_reference(x, y)["mutual_information"]
    both = (x > 0).astype(int).T @ (y > 0).astype(int)
    want = set(zip(*np.nonzero((both == 0) & (ref >= 0.05)), strict=True))
    assert (4, 3) in want and total == len(want)
    assert set(listed.select("feature_a", "feature_b").iter_rows()) == want
    np.testing.assert_allclose(
        listed["mutual_information"], ref[listed["feature_a"], listed["feature_b"]]
    )
    few, total_again = measures.never_coactive_pairs(
        store, 6, 7, "mutual_information", 0.05, shards=["s"], limit=1
    )
    assert few.height == 1 and total_again == total


# -- variants: active threshold and the null model -----------------------------------------------


def test_active_threshold_equals_statistics_of_thresholded_activations(tmp_path, edge_store):
    store, x, y = edge_store
    got = query.pair_stats(store, PairQuery(6, 7, variant=Variant(active_threshold=0.8)))
    cut = {k: {"s": sp.csr_matrix(np.where(m > 0.8, m, 0.0))} for k, m in ((6, x), (7, y))}
    want = query.pair_stats(build_store(tmp_path / "cut", cut), PairQuery(6, 7))
    assert got.select("feature_a", "feature_b", "n_both").equals(
        want.select("feature_a", "feature_b", "n_both")
    )
    for col in ("pearson", "sufficiency", "mutual_information"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-9)
    assert store.children(spec.PAIRS) == []  # a query computes the variant in memory
    saved = query.pair_stats(
        store, PairQuery(6, 7, variant=Variant(active_threshold=0.8), keep_sums=True)
    )
    assert store.children(spec.PAIRS) == ["6-7.t0.8"]  # its own record, the plain one untouched
    assert saved.equals(got)
    assert query.pair_stats(store, PairQuery(6, 7, variant=Variant(active_threshold=0.8))).equals(
        got
    )
    plain = query.pair_stats(store, PairQuery(6, 7))
    assert plain.height > got.height


def test_null_rows_pair_each_sequence_with_another_at_the_same_position():
    tokens = pl.DataFrame(
        {"seq": [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3, "pos": [*range(4)] * 3 + [*range(3)]}
    )
    rows = shardsums.null_rows(tokens)
    seq, pos = tokens["seq"].to_numpy(), tokens["pos"].to_numpy()
    assert sorted(rows) == list(range(15))  # a permutation
    same_length = seq < 3
    assert np.all(seq[rows][same_length] != seq[same_length])
    assert np.all(pos[rows][same_length] == pos[same_length])
    assert np.all(pos[rows][~same_length] != pos[~same_length])  # alone: rolled in place


def test_null_model_is_the_same_engine_on_deranged_sequences(tmp_path, edge_store):
    store, x, y = edge_store
    got = query.pair_stats(store, PairQuery(6, 7, variant=Variant(null=True)))
    # build_store's token table: sequences of 8 tokens; the null pairs sequence i with i + 1.
    shift = np.roll(np.arange(x.shape[0]).reshape(-1, 8), -1, axis=0).ravel()
    moved = {6: {"s": sp.csr_matrix(x)}, 7: {"s": sp.csr_matrix(y[shift])}}
    want = query.pair_stats(build_store(tmp_path / "moved", moved), PairQuery(6, 7))
    assert got.select("feature_a", "feature_b", "n_both").equals(
        want.select("feature_a", "feature_b", "n_both")
    )
    np.testing.assert_allclose(got["pearson"].to_numpy(), want["pearson"].to_numpy(), rtol=1e-9)
    # Computed in memory (a query) or saved and read back: the same table, bit for bit.
    screened = query.pair_stats(
        store, PairQuery(6, 7, min_pearson=0.05, variant=Variant(null=True))
    )
    assert not store.children(spec.PAIRS)
    saved = query.pair_stats(store, PairQuery(6, 7, variant=Variant(null=True), keep_sums=True))
    assert store.children(spec.PAIRS) == ["6-7.null"] and saved.equals(got)
    reused = query.pair_stats(store, PairQuery(6, 7, min_pearson=0.05, variant=Variant(null=True)))
    assert reused.equals(screened) and screened.equals(got.filter(pl.col("pearson") >= 0.05))


def test_variant_with_duckdb_engine_is_refused(edge_store):
    store, _, _ = edge_store
    with pytest.raises(FeatstoreError, match="plain sums"):
        query.pair_stats(store, PairQuery(6, 7, engine="duckdb", variant=Variant(null=True)))
    with pytest.raises(FeatstoreError, match="active_threshold"):
        Variant(active_threshold=-1)


# -- decoder cosine and the graph -----------------------------------------------------------------


def test_decoder_cosine_keeps_the_top_k_of_each_row_and_column():
    rng = np.random.default_rng(3)
    w_a, w_b = rng.normal(size=(37, 16)), rng.normal(size=(29, 16))
    w_a[5] = 0.0  # a dead feature: cosine 0
    frame = decoders.decoder_cosine(w_a, w_b, k=3, block_rows=8)
    unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)  # noqa: E731
    cos = unit(w_a) @ unit(w_b).T
    rank_row = np.argsort(np.argsort(-cos, axis=1), axis=1)
    rank_col = np.argsort(np.argsort(-cos, axis=0), axis=0)
    want = set(zip(*np.nonzero((rank_row < 3) | (rank_col < 3)), strict=True))
    got = set(frame.select("feature_a", "feature_b").iter_rows())
    # The dead feature's cosines all tie at 0: any 3 of them are its top 3.
    dead = {(i, j) for i, j in got if i == 5}
    assert got - dead == {(i, j) for i, j in want if i != 5}
    assert len(dead) == 3 and all(cos[i, j] == 0 for i, j in dead)
    np.testing.assert_allclose(
        frame["decoder_cosine"], cos[frame["feature_a"], frame["feature_b"]], atol=1e-6
    )


def test_graph_on_a_new_measure_and_on_decoder_cosine(edge_store):
    store, _, _ = edge_store
    frame = query.pair_stats(store, PairQuery(6, 7))
    graph = build_graph({(6, 7): frame}, metric="necessity", threshold=0.5, min_both=4)
    want = frame.filter((pl.col("necessity") >= 0.5) & (pl.col("n_both") >= 4))
    assert graph.number_of_edges() == want.height > 0
    cosines = pl.DataFrame({"feature_a": [0, 1], "feature_b": [2, 3], "decoder_cosine": [0.9, 0.1]})
    graph = build_graph({(6, 7): cosines}, metric="decoder_cosine", threshold=0.5)
    assert list(graph.edges) == [("L6:0", "L7:2")]  # no n_both needed: data-free


# -- command line ---------------------------------------------------------------------------------


def test_stats_cli_new_options(edge_store, tmp_path, capsys):
    store, _, _ = edge_store
    out = tmp_path / "out.parquet"
    argv = [
        "--home",
        str(store.home),
        "stats",
        "--layer-a",
        "6",
        "--layer-b",
        "7",
        "--out",
        str(out),
    ]
    extra = ["--min", "sufficiency=0.3", "--min-both", "2", "--intervals", "--null"]
    assert main([*argv, *extra]) == 0
    asked = PairQuery(
        6,
        7,
        thresholds={"sufficiency": 0.3},
        min_both=2,
        intervals=True,
        variant=Variant(null=True),
    )
    want = query.pair_stats(store, asked)
    assert pl.read_parquet(out).equals(want)
    assert "sufficiency >= 0.3" in capsys.readouterr().out
    assert main([*argv, "--never-coactive", "mutual_information=0.05"]) == 0
    listed, total = measures.never_coactive_pairs(
        store, 6, 7, "mutual_information", 0.05, shards=["s"]
    )
    assert (
        pl.read_parquet(out).equals(listed)
        and f"{total} never-co-active" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--min", "lift=2"], "unknown metric"),
        (["--min", "jaccard"], "MEASURE=VALUE"),
        (["--active-threshold", "-1"], "active_threshold"),
        (["--never-coactive", "decoder_cosine=0.5"], "not a data measure"),
    ],
)
def test_stats_cli_bad_new_options_are_one_line(edge_store, tmp_path, capsys, extra, message):
    store, _, _ = edge_store
    argv = ["--home", str(store.home), "stats", "--layer-a", "6", "--layer-b", "7"]
    assert main([*argv, *extra, "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_decoder_cosine_in_stats_and_graph_commands(edge_store, tmp_path, monkeypatch):
    store, _, _ = edge_store
    rng = np.random.default_rng(9)
    w = {6: rng.normal(size=(9, 5)), 7: rng.normal(size=(7, 5))}
    monkeypatch.setattr(decoders, "load_decoder", lambda source, layer: w[layer])
    unit = {k: m / np.linalg.norm(m, axis=1, keepdims=True) for k, m in w.items()}
    cos = unit[6] @ unit[7].T
    out = tmp_path / "out.parquet"
    argv = ["--home", str(store.home), "stats", "--layer-a", "6", "--layer-b", "7"]
    assert main([*argv, "--decoder-cosine", "7", "--out", str(out)]) == 0  # k = d_b: every pair
    frame = pl.read_parquet(out)
    want = cos[frame["feature_a"], frame["feature_b"]]
    np.testing.assert_allclose(frame["decoder_cosine"], want, atol=1e-6)  # float32 products
    argv = ["--home", str(store.home), "graph", "--layers", "6", "7", "--metric", "decoder_cosine"]
    assert main([*argv, "--threshold", "0.5", "--out", str(tmp_path / "g")]) == 0
    edges = pl.read_parquet(tmp_path / "g" / "edges.parquet")
    top = decoders.decoder_cosine(w[6], w[7], 10)  # the graph keeps each feature's top 10
    want = top.filter(pl.col("decoder_cosine") >= 0.5)
    assert sorted(edges.select("feature_a", "feature_b").rows()) == sorted(
        want.select("feature_a", "feature_b").rows()
    )


def test_decoder_cosines_are_saved_once_per_pair_of_decoders(tmp_path, monkeypatch):
    """Saved under a digest of both decoders and k; read back instead of recomputed; another
    decoder or k is another file; a damaged file is computed again; the best of the top k is
    each row's largest cosine (numpy over the whole matrix)."""
    import types

    store = types.SimpleNamespace(home=tmp_path)
    rng = np.random.default_rng(4)
    w_a, w_b = rng.normal(size=(40, 12)).astype(np.float32), rng.normal(size=(33, 12))
    first = decoders.saved_decoder_cosine(store, w_a, w_b, 4)
    assert first.equals(decoders.decoder_cosine(w_a, w_b, 4))
    (saved,) = (tmp_path / "decoders").glob("*.parquet")
    monkeypatch.setattr(decoders, "decoder_cosine", lambda *a: pytest.fail("recomputed"))
    assert decoders.saved_decoder_cosine(store, w_a, w_b, 4).equals(first)
    monkeypatch.undo()
    decoders.saved_decoder_cosine(store, w_a, w_b * 2 + 1, 4)
    decoders.saved_decoder_cosine(store, w_a, w_b, 5)
    assert len(list((tmp_path / "decoders").glob("*.parquet"))) == 3
    saved.write_bytes(b"not parquet")
    assert decoders.saved_decoder_cosine(store, w_a, w_b, 4).equals(first)
    assert pl.read_parquet(saved).equals(first)
    cos, match = decoders.best_of_top_k(first, 40)
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    full = unit(w_a.astype(np.float64)) @ unit(w_b).T
    np.testing.assert_allclose(cos, full.max(1), atol=1e-6)
    np.testing.assert_array_equal(match, full.argmax(1))
