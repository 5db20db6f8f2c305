"""Causal edges from a store: the asked edges, the comparison with the correlation graph and the
ablation effect by similarity bin, against set arithmetic, numpy and plain hook computations."""

from __future__ import annotations

import re
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import model_store, one_torch_thread, random_model, random_saes, random_tokens
from test_patching import DeviceWatch, reference

from featstore.analysis.asked import EdgeChoice, asked_edges, pair_table
from featstore.analysis.causal import (
    CausalConfig,
    ablation_by_bin,
    causal_edge_frame,
    compare,
    run_causal,
)
from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.stats.query import PairQuery, pair_stats
from featstore.store import spec
from featstore.store.home import open_store

PAIRS = ((6, 7), (7, 8), (8, 9))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def store_run(tmp_path_factory):
    model = random_model()
    saes = random_saes(model, random_tokens(n_seq=6, seq_len=12))
    store = model_store(tmp_path_factory.mktemp("causal"), model, saes, random_tokens(8, 12, 1))
    for a, b in PAIRS:
        pair_stats(store, PairQuery(a, b))  # writes pair_stats/{a}-{b}.parquet: correlation edges
    choice = EdgeChoice(min_pearson=0.1, random_pairs=30)
    cfg = CausalConfig(max_sequences=4, min_effect=0.2, min_tokens=3, edges=choice)
    return store, model, saes, cfg


@pytest.fixture(scope="module")
def graph_frame(store_run):
    store, model, saes, cfg = store_run
    return causal_edge_frame(store, model, saes, cfg)


def stats(store, a: int, b: int) -> pl.DataFrame:
    return pl.read_parquet(store.home / "pair_stats" / f"{a}-{b}.parquet")


def test_graph_sample_asks_every_correlation_edge_and_random_controls(store_run):
    store, _, _, cfg = store_run
    for a, b in PAIRS:
        asked = asked_edges(store, a, b, 64, cfg.edges)
        expect = stats(store, a, b).filter(pl.col("pearson") >= 0.1)
        graph = asked.filter(pl.col("asked_by") == "graph")
        assert set(graph.select("feature_a", "feature_b").iter_rows()) == set(
            expect.select("feature_a", "feature_b").iter_rows()
        )
        control = asked.filter(pl.col("asked_by") == "random")
        assert 0 < control.height <= 30
        assert set(control["feature_a"]) <= set(graph["feature_a"])
        assert asked.select("feature_a", "feature_b").is_unique().all()
    assert asked_edges(store, 6, 8, 64, cfg.edges) is None  # no statistics of 6-8
    some = np.array(sorted(set(graph["feature_a"]))[:2])
    only = asked_edges(store, a, b, 64, cfg.edges, sources=some)
    assert set(only["feature_a"]) == set(some.tolist())


@pytest.fixture(scope="module")
def graph_only(store_run, tmp_path_factory):
    """A store with the correlation graph (Pearson >= 0.1) and no pair table: what the statistics
    stage leaves when it only computes the pairs reaching a threshold (a 10^5-token store)."""
    from featstore.analysis.graph import export_graph

    _, model, saes, cfg = store_run
    store = model_store(tmp_path_factory.mktemp("graph_only"), model, saes, random_tokens(8, 12, 1))
    export_graph(store, store.home / spec.GRAPH_DIR, layers=[6, 7, 8, 9], threshold=0.1)
    assert not (store.home / spec.PAIR_STATS_DIR).exists()
    return store


def test_graph_sample_without_pair_tables_asks_the_graphs_edges(store_run, graph_only):
    _, model, saes, cfg = store_run
    frame = causal_edge_frame(graph_only, model, saes, cfg)
    edges = pl.read_parquet(graph_only.home / spec.GRAPH_DIR / "edges.parquet")
    for a, b in PAIRS:
        mine = frame.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))
        expect = edges.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)
                              & (pl.col("pearson") >= 0.1))  # fmt: skip
        assert expect.height > 0
        graph = mine.filter(pl.col("asked_by") == "graph")
        pairs = ["feature_a", "feature_b"]
        assert set(graph.select(pairs).iter_rows()) == set(expect.select(pairs).iter_rows())
        random = mine.filter(pl.col("asked_by") == "random")
        looked_up = random.join(expect, on=pairs, how="left", suffix="_graph")
        assert looked_up["pearson"].equals(looked_up["pearson_graph"], null_equal=True)
    assert frame.filter(pl.col("n_tokens") >= cfg.min_tokens).height > 0
    assert frame.filter((pl.col("layer_b") - pl.col("layer_a")) > 1).height == 0


def test_the_stage_makes_every_tensor_on_the_models_device(store_run, graph_only):
    """The whole causal computation (asked from the graph, patched, attributed) under
    `test_patching.DeviceWatch`: no tensor made without a device, no `.numpy()` of a tensor
    that did not pass through `.cpu()`, either of which breaks (or silently mixes) on cuda."""
    _, model, saes, cfg = store_run
    small = CausalConfig(max_sequences=2, min_tokens=1,
                         edges=EdgeChoice(min_pearson=0.1, max_edges=5, random_pairs=3))
    watch = DeviceWatch()
    with watch:
        frame = causal_edge_frame(graph_only, model, saes, small)
    assert frame.filter(pl.col("n_tokens") > 0).height > 0
    assert frame["attribution"].is_not_null().any()
    assert watch.problems == []


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param(EdgeChoice(min_pearson=0.05), id="graph-above-the-ask"),
        pytest.param(EdgeChoice(sample="bins"), id="bins-need-the-table"),
    ],
)
def test_nothing_to_ask_from_is_refused(store_run, graph_only, choice):
    _, model, saes, _ = store_run
    cfg = CausalConfig(max_sequences=2, edges=choice, attribution=False)
    with pytest.raises(FeatstoreError, match="no edge to ask"):
        causal_edge_frame(graph_only, model, saes, cfg)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda g: (g / "summary.json").write_text("{not json"), id="summary-not-json"),
        pytest.param(lambda g: (g / "summary.json").write_text('{"layers": "6-9"}'),
                     id="summary-layers-not-a-list"),
        pytest.param(lambda g: (g / "summary.json").write_text("[6, 7]"), id="summary-a-list"),
        pytest.param(lambda g: pq.write_table(
            pq.read_table(g / "edges.parquet").replace_schema_metadata(
                {"featstore.graph": "{oops"}), g / "edges.parquet"), id="settings-not-json"),
        pytest.param(lambda g: pq.write_table(
            pq.read_table(g / "edges.parquet").replace_schema_metadata(
                {"featstore.graph": '{"metric": "dot", "threshold": 0.1}'}), g / "edges.parquet"),
            id="settings-unknown-metric"),
    ],
)
def test_a_damaged_graph_is_one_line_not_a_crash(graph_only, tmp_path, damage):
    """Edges asked from a graph someone else built: a crafted or damaged summary or edge-table
    metadata is reported, never read (nor a traceback)."""
    home = tmp_path / "home"
    shutil.copytree(graph_only.home, home)
    damage(home / spec.GRAPH_DIR)
    with pytest.raises(FeatstoreError, match="damaged"):
        pair_table(open_store(home), 6, 7, EdgeChoice(min_pearson=0.1))


def test_bins_sample_is_stratified(store_run):
    store, *_ = store_run
    bins = (0.0, 0.05, 0.1, 0.2, 1.0)
    choice = EdgeChoice(sample="bins", bins=bins, per_bin=4, random_pairs=0)
    asked = asked_edges(store, 6, 7, 64, choice)
    jaccard = stats(store, 6, 7)["jaccard"].to_numpy()
    for k, (lo, hi) in enumerate(zip(bins, bins[1:], strict=False)):
        inside = (jaccard >= lo) & ((jaccard < hi) | ((hi == 1.0) & (jaccard <= hi)))
        got = asked.filter(pl.col("bin") == k)
        assert got.height == min(4, int(inside.sum()))
        assert got["bin_value"].is_between(lo, hi).all()
    assert asked.height > 4


def test_measured_effects_equal_a_plain_hook_computation(store_run, graph_frame):
    store, model, saes, cfg = store_run
    tokens = store.sequences(store.shards(6)[0])[: cfg.max_sequences]
    rows = graph_frame.filter((pl.col("layer_a") == 7) & (pl.col("layer_b") == 8))
    for feature in rows["feature_a"].unique().sort()[:3]:
        mean, off, on, n = reference(model, saes, tokens, 7, 8, int(feature))
        mine = rows.filter(pl.col("feature_a") == feature)
        j = mine["feature_b"].to_numpy()
        assert (mine["n_tokens"] == n).all()
        if n:
            np.testing.assert_allclose(mine["mean_effect"], mean[j], atol=1e-5)
            np.testing.assert_array_equal(mine["n_off"], off[j])


def test_comparison_counts_equal_set_arithmetic(store_run, graph_frame):
    store, _, _, cfg = store_run
    table = compare(graph_frame, cfg)
    assert table.height == 3  # the adjacent pairs: the only ones with statistics
    assert table.schema["attribution_r"] == pl.Float64
    for a, b in PAIRS:
        rows = graph_frame.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).to_dicts()
        measured = {(r["feature_a"], r["feature_b"]) for r in rows if r["n_tokens"] >= 3}
        causal = {(r["feature_a"], r["feature_b"]) for r in rows if r["n_tokens"] >= 3
                  and abs(r["relative_effect"]) >= cfg.min_effect}
        random = {(r["feature_a"], r["feature_b"]) for r in rows if r["asked_by"] == "random"}
        edges = set(stats(store, a, b).filter(pl.col("pearson") >= 0.1)
                    .select("feature_a", "feature_b").iter_rows())
        got = table.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).row(0, named=True)
        assert got["causal_edges"] == len(causal) and got["tested_pairs"] == len(measured)
        assert got["correlation_edges_tested"] == len(edges & measured)
        assert got["correlation_edges_causal"] == len(edges & causal)
        assert got["causal_edges_missed"] == len(causal - edges)
        assert got["random_pairs_causal"] == len(causal & random)
        measured_rows = [r for r in rows if r["n_tokens"] >= 3]
        x = np.array([r["attribution"] for r in measured_rows])
        y = np.array([r["total_effect"] for r in measured_rows])
        assert len(x) > 2 and got["attribution_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert table["correlation_edges_tested"].sum() > 0 and table["causal_edges"].sum() > 0


def test_ablation_by_bin_equals_numpy(store_run):
    store, model, saes, cfg = store_run
    choice = EdgeChoice(sample="bins", bins=(0.0, 0.1, 0.3, 1.0), per_bin=6, random_pairs=0)
    binned = CausalConfig(layers=(6, 7), max_sequences=4, min_effect=0.2, min_tokens=3,
                          edges=choice, attribution=False)
    frame = causal_edge_frame(store, model, saes, binned)
    assert frame["attribution"].is_null().all()
    table = ablation_by_bin(frame, binned)
    for row in table.iter_rows(named=True):
        part = frame.filter((pl.col("bin") == row["bin"]) & (pl.col("n_tokens") >= 3))
        effect = np.abs(part["relative_effect"].to_numpy())
        assert row["pairs"] == len(effect) and row["lo"] == choice.bins[row["bin"]]
        assert row["mean_abs_effect"] == pytest.approx(effect.mean())
        if len(effect) > 1:
            sem = effect.std(ddof=1) / np.sqrt(len(effect))
            assert row["sem_abs_effect"] == pytest.approx(sem)
        assert row["share_causal"] == pytest.approx((effect >= 0.2).mean())
    assert table.height >= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"sample": "all"}, id="sample"),
        pytest.param({"bins": (0.5, 0.2)}, id="bins-order"),
        pytest.param({"bins": (0.0, 2.0)}, id="bins-range"),
        pytest.param({"per_bin": -1}, id="per-bin"),
        pytest.param({"measure": "nope"}, id="measure"),
    ],
)
def test_bad_edge_choices_are_refused(kwargs):
    with pytest.raises(FeatstoreError):
        EdgeChoice(**kwargs)


def test_run_writes_a_table_sql_can_read(store_run, capsys):
    store, model, saes, cfg = store_run
    choice = EdgeChoice(sample="bins", bins=(0.0, 0.2, 1.0), per_bin=3, random_pairs=5)
    small = CausalConfig(layers=(6, 7), max_sequences=2, edges=choice, min_tokens=1)
    paths = run_causal(store, model, saes, small)
    saved = pl.read_parquet(paths["edges"])
    assert set(saved["asked_by"]) <= {"bin", "random"} and saved.height <= 3 * 2 + 5
    for key in ("comparison_plot", "attribution_plot", "ablation_by_bin_plot"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    query = "SELECT count(*) AS n FROM causal_edges"
    assert main(["--home", str(store.home), "sql", query, "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", str(saved.height)]


def test_cli_patch_reports_a_missing_model_in_one_line(store_run, capsys, monkeypatch):
    monkeypatch.setattr("featstore.sources.registry.EMBEDDED", store_run[0].home / "nowhere")
    rc = main(["--home", str(store_run[0].home), "patch", "--layers", "6", "7"])
    assert rc == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_patch_refuses_bad_bins_in_one_line(store_run, capsys):
    argv = ["--home", str(store_run[0].home), "patch", "--sample", "bins", "--bins", "0.5", "0.2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bins" in err


def test_cli_patch_prints_the_comparison(store_run, capsys, monkeypatch):
    store, model, saes, _ = store_run
    monkeypatch.setattr("featstore.cli.load_model_and_saes", lambda *args: (model, saes))
    monkeypatch.setenv("FEATSTORE_PROGRESS", "1")  # stderr is no terminal here
    argv = ["--home", str(store.home), "patch", "--layers", "6", "7", "--max-sequences", "2"]
    assert main([*argv, "--min-pearson", "0.1", "--sample", "bins", "--per-bin", "2"]) == 0
    captured = capsys.readouterr()
    assert "correlation_edges_causal" in captured.out and "ablation_by_bin.parquet" in captured.out
    # Progress on stderr: the edges asked (as many as the table's rows), then the patched rows
    # and the attributed sequences, each ending at its total.
    edges = pl.read_parquet(store.home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE)
    assert f"causal edges from layer 6: {edges.height} edges asked" in captured.err
    for what in ("patching layer 6 -> 7, rows", "attribution layer 6 -> 7, sequences"):
        done = re.search(re.escape(what) + r": (\d+)/(\d+)", captured.err)
        assert done and done[1] == done[2] and int(done[1]) > 0, captured.err


def test_causal_assets_materialise(store_run, monkeypatch):
    import dagster as dg

    from featstore.analysis.graph import export_graph
    from pipelines.assets import causal as assets
    from pipelines.resources import FeatstoreResource

    store, model, saes, _ = store_run
    export_graph(store, store.home / spec.GRAPH_DIR, layers=[6, 7], threshold=0.1)
    monkeypatch.setattr(assets, "load_model_and_saes", lambda cfg: (model, saes))
    resource = FeatstoreResource(home=str(store.home), layers=[6, 7])
    bins = {"max_sequences": 3, "sample": "bins", "per_bin": 2, "bins": [0.0, 0.2, 1.0]}
    result = dg.materialize(
        assets.causal_assets,
        resources={"featstore": resource},
        run_config={
            "ops": {
                "causal_edges": {"config": bins},
                "concept_traces": {"config": {"max_sequences": 3}},
                "erasure": {"config": {"max_sequences": 3}},
                "steering": {"config": {"features": ["6:3"], "targets": [7], "max_sequences": 2}},
            }
        },
    )
    assert result.success
    for name in ("causal_edges", "concept_traces", "erasure", "steering"):
        (event,) = result.asset_materializations_for_node(name)
        assert event.metadata
    (event,) = result.asset_materializations_for_node("causal_edges")
    assert "ablation_by_bin" in event.metadata and "ablation_by_bin_plot" in event.metadata


# -- steering ------------------------------------------------------------------------------------


def test_steering_equals_a_plain_hook_computation(store_run):
    import scipy.special
    import torch

    from featstore.analysis.steering import SteerConfig, steer

    store, model, saes, _ = store_run
    tokens = store.sequences(store.shards(6)[0])[:3]
    typical = np.full(64, 0.5)
    cfg = SteerConfig(6, (3, 11), k=4.0, targets=(8,), top=5)
    frames = steer(model, saes, tokens, typical, cfg)
    x = torch.as_tensor(np.array(tokens))
    for feature in (3, 11):

        def hook(resid, hook, f=feature):
            a = saes[6].encode(resid)[..., f]
            change = (2.0 - a)[..., None] * saes[6].W_dec[f]
            change[:, 0] = 0
            return resid + change

        with torch.no_grad():
            clean, cache = model.run_with_cache(x, names_filter=name8)
            seen = {}
            steered = model.run_with_hooks(
                x, fwd_hooks=[(name6, hook), (name8, lambda r, hook, s=seen: s.update(r=r))]
            )
            p = torch.softmax(clean[:, 1:].double(), -1).numpy()
            q = torch.softmax(steered[:, 1:].double(), -1).numpy()
            delta = (saes[8].encode(seen["r"]) - saes[8].encode(cache[name8]))[:, 1:].mean((0, 1))
        row = frames["summary"].filter(pl.col("feature") == feature).row(0, named=True)
        assert row["value"] == 2.0
        assert row["kl"] == pytest.approx(scipy.special.rel_entr(p, q).sum(-1).mean(), rel=1e-6)
        gained = frames["tokens"].filter((pl.col("feature") == feature) & (pl.col("kind") ==
                                                                           "gained"))
        change = (q - p).mean((0, 1))
        assert gained["token"].to_list() == np.argsort(-change, kind="stable")[:5].tolist()
        lost = frames["features"].filter((pl.col("feature") == feature) & (pl.col("kind") ==
                                                                           "lost"))
        np.testing.assert_allclose(lost["change"], np.sort(delta.numpy())[:5], atol=1e-6)


name6, name8 = "blocks.6.hook_resid_pre", "blocks.8.hook_resid_pre"


def test_cli_steer_writes_tables(store_run, capsys, monkeypatch):
    store, model, saes, _ = store_run
    monkeypatch.setattr("featstore.cli.load_model_and_saes", lambda *args: (model, saes))
    argv = ["--home", str(store.home), "steer", "6:3", "--targets", "7", "--max-sequences", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kl" in out and "steering/tokens.parquet" in out
    assert main(["--home", str(store.home), "steer", "6:3", "7:1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
