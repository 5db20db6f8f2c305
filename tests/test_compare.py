"""Methods compared: every table equals a brute-force computation on dense activations."""

from __future__ import annotations

import networkx as nx
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import scipy.stats
from helpers import build_store, correlated_layers, table_measures

from featstore.analysis.compare import CompareConfig, compare_methods, run_comparison
from featstore.errors import FeatstoreError
from featstore.store import spec

LAYERS = (6, 7, 8, 9)
SEQ = 8  # build_store's sequence length
THRESHOLDS = {"pearson": 0.2, "sufficiency": 0.4, "mutual_information": 0.02}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    acts = correlated_layers(LAYERS, n_tokens=160, d=12, seed=3)
    acts = {k: x.astype(np.float32).astype(np.float64) for k, x in acts.items()}
    acts[7][:, 11] = 0.0  # a dead feature
    home = tmp_path_factory.mktemp("compare")
    store = build_store(home, {k: {"s": sp.csr_matrix(x)} for k, x in acts.items()})
    rng = np.random.default_rng(0)
    decoders = {k: rng.normal(size=(12, 8)) for k in LAYERS}
    causal = pl.DataFrame(
        {"layer_a": [6, 6, 7], "feature_a": [0, 1, 2], "layer_b": [7, 7, 8],
         "feature_b": [3, 4, 5], "relative_effect": [-0.5, 0.2, 0.9]}
    )  # fmt: skip
    (home / spec.CAUSAL_DIR).mkdir()
    causal.write_parquet(home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE)
    cfg = CompareConfig(layers=LAYERS, thresholds=THRESHOLDS, min_both=2, seed=1)
    return store, acts, decoders, cfg, compare_methods(store, cfg, decoders)


def dense_best(x: np.ndarray, y: np.ndarray, min_both: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per measure: (features with a best successor, the best, its score) by numpy argmax."""
    ref = table_measures(x, y)
    out = {}
    for m in THRESHOLDS:
        with np.errstate(invalid="ignore"):
            score = np.where((ref["n_both"] >= min_both) & np.isfinite(ref[m]), ref[m], -np.inf)
        has = np.flatnonzero(np.isfinite(score).any(1))
        out[m] = (has, score[has].argmax(1), score[has].max(1))
    return out


def deranged(y: np.ndarray) -> np.ndarray:
    return y[np.roll(np.arange(y.shape[0]).reshape(-1, SEQ), -1, axis=0).ravel()]


def test_best_successors_match_numpy_argmax(setup):
    _, acts, _, _, result = setup
    for a, b in ((6, 7), (7, 8), (8, 9)):
        for m, (has, match, score) in dense_best(acts[a], acts[b], 2).items():
            got = result.best_successors.filter(
                (pl.col("layer_a") == a) & (pl.col("method") == m)
            ).sort("feature")
            np.testing.assert_array_equal(got["feature"], has)
            np.testing.assert_array_equal(got["match"], match)
            np.testing.assert_allclose(got["score"], score, rtol=1e-9)


def test_decoder_and_causal_methods(setup):
    _, _, decoders, _, result = setup
    unit = {k: w / np.linalg.norm(w, axis=1, keepdims=True) for k, w in decoders.items()}
    cos = unit[6] @ unit[7].T
    got = result.best_successors.filter(
        (pl.col("layer_a") == 6) & (pl.col("method") == "decoder_cosine")
    ).sort("feature")
    np.testing.assert_array_equal(got["match"], cos.argmax(1))
    causal = result.best_successors.filter(pl.col("method") == "causal").sort("layer_a", "feature")
    assert causal.select("layer_a", "feature", "match", "score").rows() == [
        (6, 0, 3, 0.5), (6, 1, 4, 0.2), (7, 2, 5, 0.9)
    ]  # fmt: skip
    assert result.notes == []


def test_agreement_share_and_spearman(setup):
    _, _, _, _, result = setup
    best = result.best_successors.filter(pl.col("layer_a") == 7)
    row = result.agreement.filter(
        (pl.col("layer_a") == 7) & (pl.col("method_1") == "pearson")
        & (pl.col("method_2") == "sufficiency")
    ).row(0, named=True)  # fmt: skip
    p = dict(best.filter(pl.col("method") == "pearson").select("feature", "match").rows())
    s = dict(best.filter(pl.col("method") == "sufficiency").select("feature", "match").rows())
    common = sorted(set(p) & set(s))
    assert row["features"] == len(common)
    assert row["share_same"] == pytest.approx(np.mean([p[f] == s[f] for f in common]))
    # Spearman over every method's best pairs, scored by both measures.
    acts = setup[1]
    dense = table_measures(acts[7], acts[8])
    pairs = set(best.select("feature", "match").rows())  # every method's best pairs
    x, y = zip(*[(dense["pearson"][i, j], dense["sufficiency"][i, j]) for i, j in pairs
                 if dense["n_both"][i, j] >= 2], strict=True)  # fmt: skip
    assert row["scored_pairs"] == len(x)
    assert row["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic)


def test_null_counts_and_from_nowhere(setup):
    _, acts, _, cfg, result = setup
    for m, t in THRESHOLDS.items():
        row = result.null_counts.filter((pl.col("layer_a") == 8) & (pl.col("measure") == m))
        for column, y in (("data", acts[9]), ("null", deranged(acts[9]))):
            ref = table_measures(acts[8], y)
            with np.errstate(invalid="ignore"):
                want = int(((ref[m] >= t) & (ref["n_both"] >= 2)).sum())
            assert row[column][0] == want, (m, column)
    m, t = "pearson", THRESHOLDS["pearson"]
    row = result.from_nowhere.filter((pl.col("layer") == 7) & (pl.col("measure") == m)).row(
        0, named=True
    )
    live = np.flatnonzero((acts[7] > 0).any(0))
    scores = {}
    for name, x in (("data", acts[6]), ("null", None)):
        ref = table_measures(acts[6], acts[7] if x is not None else deranged(acts[7]))
        with np.errstate(invalid="ignore"):
            s = np.where((ref["n_both"] >= 2) & np.isfinite(ref[m]), ref[m], -np.inf)
        scores[name] = s.max(0)[live]
    corrected = max(t, np.quantile(scores["null"], cfg.null_quantile, method="higher"))
    assert row["live"] == live.size == 11
    assert row["from_nowhere"] == pytest.approx(np.mean(scores["data"] < t))
    assert row["null_from_nowhere"] == pytest.approx(np.mean(scores["null"] < t))
    assert row["corrected_threshold"] == pytest.approx(corrected)
    assert row["from_nowhere_corrected"] == pytest.approx(np.mean(scores["data"] < corrected))


def test_distances_cover_each_layer_gap(setup):
    _, acts, _, _, result = setup
    scores = result.distance_scores
    assert sorted(set(scores.select("layer_a", "distance").rows())) == [
        (6, 1), (6, 2), (6, 3), (7, 1), (7, 2), (8, 1)
    ]  # fmt: skip
    _, _, want = dense_best(acts[6], acts[9], 2)["pearson"]
    got = scores.filter((pl.col("distance") == 3) & (pl.col("method") == "pearson"))
    np.testing.assert_allclose(np.sort(got["score"]), np.sort(want), rtol=1e-9)
    table = result.tables()["distances"]
    row = table.filter(
        (pl.col("layer_a") == 6) & (pl.col("distance") == 3) & (pl.col("method") == "pearson")
    )
    assert row["p50"][0] == pytest.approx(np.quantile(want, 0.5))


def test_communities_equal_louvain_on_the_dense_graph(setup):
    _, acts, _, cfg, result = setup
    graph = nx.Graph()
    for a, b in ((6, 7), (7, 8), (8, 9)):
        ref = table_measures(acts[a], acts[b])
        with np.errstate(invalid="ignore"):
            keep = (ref["pearson"] >= 0.2) & (ref["n_both"] >= 2)
        for i, j in zip(*np.nonzero(keep), strict=True):
            graph.add_edge(f"L{a}:{i}", f"L{b}:{j}", pearson=ref["pearson"][i, j])
    want = nx.community.louvain_communities(graph, weight="pearson", seed=cfg.seed)
    got = result.communities
    assert {frozenset(m) for m in got["members"]} == {frozenset(c) for c in want}
    assert got["size"].to_list() == sorted(got["size"].to_list(), reverse=True)
    assert got["size"].sum() == graph.number_of_nodes()


def test_run_comparison_writes_tables_and_figures(setup, tmp_path):
    store, _, decoders, cfg, result = setup
    _, paths = run_comparison(store, cfg, tmp_path / "out", decoders)
    for name, frame in result.tables().items():
        assert pl.read_parquet(paths[name]).equals(frame), name
    for name in ("agreement_png", "distances_png", "null_counts_png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"


def test_without_sae_the_decoder_method_is_left_out_with_a_note(setup):
    store, _, _, _, _ = setup
    cfg = CompareConfig(layers=(6, 7), thresholds={"jaccard": 0.1}, distances=(1,))
    result = compare_methods(store, cfg)
    assert "decoder_cosine" not in set(result.best_successors["method"])
    assert any("no decoder_cosine" in note for note in result.notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"thresholds": {"decoder_cosine": 0.5}}, "data-free"),
        ({"thresholds": {"lift": 1.0}}, "unknown metric"),
        ({"community_threshold": 0.0}, "community_threshold"),
        ({"community_metric": "decoder_cosine"}, "community_metric takes a data measure"),
        ({"layers": (6,)}, "at least two layers"),
        ({"null_quantile": 1.0}, "null_quantile"),
    ],
)
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(FeatstoreError, match=message):
        CompareConfig(**kwargs)


def test_dagster_assets_write_the_comparison_and_the_cards(setup):
    import dagster as dg

    from featstore.analysis.graph import export_graph
    from pipelines.assets.comparison import comparison_assets
    from pipelines.resources import FeatstoreResource

    store = setup[0]
    export_graph(store, store.home / "graph", layers=LAYERS)
    resource = FeatstoreResource(home=str(store.home), layers=list(LAYERS))
    run_config = {"ops": {"method_comparison": {"config": {"thresholds": THRESHOLDS}}}}
    result = dg.materialize(  # logit_effects needs a model: test_logits covers it
        comparison_assets,
        selection=["method_comparison", "feature_cards"],
        resources={"featstore": resource},
        run_config=run_config,
    )
    assert result.success
    meta = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert meta["method_comparison"]["agreement_png"].value.startswith("![agreement.png]")
    assert (store.home / "comparison" / "null_counts.parquet").exists()
    assert meta["feature_cards"]["pages"].value == len(list((store.home / "cards").glob("L*.html")))
    # the Dagster UI links each card to its page in the explorer (`featstore serve`)
    urls = meta["feature_cards"]["urls"].value.splitlines()
    keys = [k.removeprefix("L").split(":") for k in meta["feature_cards"]["features"].value]
    assert urls == [f"- [L{x}:{f}](http://127.0.0.1:8765/features/{x}/{f})" for x, f in keys]
    assert len(keys) == meta["feature_cards"]["pages"].value
