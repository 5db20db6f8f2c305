"""The Dagster code location: it loads, its checks catch bad data, its sensor finds new shards,
and a run on the tiny source stores what its metadata says."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import networkx as nx
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import zarr
from helpers import correlated_layers, dense_pair_frame

from featstore.analysis.graph import EDGES, GRAPHML
from featstore.sources.extract import list_shards, token_table
from featstore.sources.registry import get_source
from featstore.stats.query import pair_stats_path
from featstore.store import spec
from featstore.store.home import open_store
from featstore.store.local import Store
from pipelines.assets.checks import activation_checks
from pipelines.assets.extraction import activations, tokens
from pipelines.assets.statistics import feature_graph, pair_stats, plots, shard_pair_stats
from pipelines.definitions import build_defs, defs
from pipelines.demo import materialize
from pipelines.partitions import LAYER, PAIR, multi_key, range_tags, shard_partitions
from pipelines.resources import FeatstoreResource
from pipelines.sensors import new_text_shards

TINY_D_SAE = get_source("tiny").d_sae


def test_definitions_load_with_every_asset_and_check():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "tokenizer_config",  # observable sources: the configuration's data versions
        "encoder_config",
        "tokens",
        "activations",
        "shard_pair_stats",
        "pair_stats",
        "feature_graph",
        "plots",
        "causal_edges",
        "concept_traces",
        "erasure",
        "steering",
        "method_comparison",
        "logit_effects",
        "feature_cards",
        "findings",
    }
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == {
        ("activations", "values_finite_nonnegative"),
        ("activations", "l0_in_range"),
        ("activations", "shape_matches_source"),
    }
    assert defs.resolve_sensor_def("new_text_shards") is not None
    assert defs.resolve_sensor_def("featstore_automation") is not None


def test_every_asset_declares_a_code_version_and_a_description():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version or node.is_observable, key  # a source has no code to version
        assert node.description, key


# -- checks on a hand-built store ----------------------------------------------------------------


def fake_shard(
    store: Store,
    shard: str,
    layers=(6, 7),
    n_seq: int = 3,
    seq_len: int = 16,
    d_sae: int = TINY_D_SAE,
    density: float = 0.05,
) -> None:
    """Random nonnegative activations and a matching token table, as extraction would store."""
    n_tokens = n_seq * seq_len
    rng = np.random.default_rng(0)
    store.write_tokens(shard, token_table(rng.integers(0, 100, (n_seq, seq_len))), {})
    for layer in layers:
        m = sp.random(n_tokens, d_sae, density=density, format="csr", random_state=rng)
        m.data += 0.1
        store.write_activations(layer, shard, m, {"source": "tiny"})


def run_checks(home: Path) -> dict[str, bool]:
    """Runs only the activation checks (unpartitioned: every stored shard); name -> passed."""
    job = dg.define_asset_job("checks", selection=dg.AssetSelection.checks(*activation_checks))
    location = dg.Definitions.merge(
        build_defs(FeatstoreResource(home=str(home))), dg.Definitions(jobs=[job])
    )
    result = location.resolve_job_def("checks").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def corrupt_value(store: Store, layer: int, shard: str, value: float) -> None:
    """Overwrites one stored activation behind the store's back (what validation forbids)."""
    data = zarr.open_array(store.root_path / spec.activation_path(layer, shard) / "data", mode="r+")
    data[0] = value


ALL_PASS = {"values_finite_nonnegative": True, "l0_in_range": True, "shape_matches_source": True}


def test_checks_pass_on_sound_activations(tmp_path):
    store = open_store(tmp_path, create=True)
    fake_shard(store, "a")
    fake_shard(store, "b")
    assert run_checks(tmp_path) == ALL_PASS


@pytest.mark.parametrize(
    ("damage", "failing"),
    [
        pytest.param(
            lambda s: corrupt_value(s, 7, "a", -1.0), "values_finite_nonnegative", id="neg"
        ),
        pytest.param(
            lambda s: corrupt_value(s, 6, "a", np.nan), "values_finite_nonnegative", id="nan"
        ),
        pytest.param(lambda s: fake_shard(s, "b", density=0.001), "l0_in_range", id="dead-sae"),
        pytest.param(lambda s: fake_shard(s, "b", d_sae=300), "shape_matches_source", id="d_sae"),
    ],
)
def test_checks_fail_on_damaged_activations(tmp_path, damage, failing):
    store = open_store(tmp_path, create=True)
    fake_shard(store, "a")
    fake_shard(store, "b")
    damage(store)
    assert run_checks(tmp_path) == {**ALL_PASS, failing: False}


def test_a_token_table_of_other_rows_drops_the_layers_it_no_longer_fits(tmp_path):
    # Layers out of line with their token table cannot be written any more (spec 3): the new
    # table's commit drops them, and the checks see only shards whose rows agree.
    store = open_store(tmp_path, create=True)
    fake_shard(store, "a")
    fake_shard(store, "b")
    store.write_tokens("b", token_table(np.zeros((2, 16), np.int32)), {})
    assert "b" not in store.shards(6) and "b" not in store.shards(7)
    assert store.tokens("b").height == 2 * 16
    assert run_checks(tmp_path) == ALL_PASS


def test_checks_fail_on_an_empty_store(tmp_path):
    open_store(tmp_path, create=True)
    assert not any(run_checks(tmp_path).values())


# -- sensor ----------------------------------------------------------------------------------------


def evaluate_sensor(instance: dg.DagsterInstance, resource: FeatstoreResource) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, resources={"featstore": resource}) as context:
        return new_text_shards(context)


def test_sensor_registers_only_new_text_files(tmp_path):
    # "evil\n" passed `re.match` (its `$` matches before a final newline); zarr.json is reserved
    for name in ("old", "new1", "new2", "bad name", "evil\n", "zarr.json"):
        (tmp_path / f"{name}.txt").write_text("some text\n")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shard_partitions.name, ["old"])
    resource = FeatstoreResource(home=str(tmp_path / "store"), text_dir=str(tmp_path))

    result = evaluate_sensor(instance, resource)
    assert [r.partition_key for r in result.run_requests] == ["new1", "new2"]
    (request,) = result.dynamic_partitions_requests
    assert request.partitions_def_name == shard_partitions.name
    assert list(request.partition_keys) == ["new1", "new2"]

    instance.add_dynamic_partitions(shard_partitions.name, ["new1", "new2"])
    assert not evaluate_sensor(instance, resource).run_requests


def test_sensor_skips_when_the_text_folder_is_missing(tmp_path):
    resource = FeatstoreResource(home=str(tmp_path), text_dir=str(tmp_path / "missing"))
    result = evaluate_sensor(dg.DagsterInstance.ephemeral(), resource)
    assert not result.run_requests
    assert "does not exist" in result.skip_reason.skip_message


# -- statistics on hand-built activations --------------------------------------------------------


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    """Two shards of correlated activations at layers 6-9 through every statistics asset."""
    home = tmp_path_factory.mktemp("stats")
    store = open_store(home, create=True)
    dense = {}
    for i, shard in enumerate(("s0", "s1")):
        acts = correlated_layers(n_tokens=300, d=24, seed=i)
        store.write_tokens(shard, token_table(np.zeros((3, 100), np.int32)), {})
        for layer, x in acts.items():
            store.write_activations(layer, shard, sp.csr_matrix(x.astype(np.float32)), {})
            dense.setdefault(layer, []).append(x.astype(np.float32).astype(np.float64))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shard_partitions.name, ["s0", "s1"])
    location = build_defs(FeatstoreResource(home=str(home)))
    runs = {}
    for shard in ("s0", "s1"):
        first, last = multi_key(shard, **{PAIR: "6-7"}), multi_key(shard, **{PAIR: "8-9"})
        runs[shard] = materialize(
            instance, [shard_pair_stats], tags=range_tags(first, last), location=location
        )
    runs["pairs"] = materialize(
        instance, [pair_stats], tags=range_tags("6-7", "8-9"), location=location
    )
    runs["graph"] = materialize(instance, [feature_graph, plots], location=location)
    return store, {layer: np.vstack(xs) for layer, xs in dense.items()}, runs


def test_pair_stats_match_a_dense_reference(stats_run):
    store, dense, runs = stats_run
    for a, b in ((6, 7), (7, 8), (8, 9)):
        got = pl.read_parquet(pair_stats_path(store, a, b))
        want = dense_pair_frame(dense[a], dense[b])
        joined = want.join(got, on=["feature_a", "feature_b"], how="left", suffix="_got")
        assert got.height == want.height
        np.testing.assert_array_equal(joined["n_both_got"], joined["n_both"])
        np.testing.assert_allclose(joined["pearson_got"], joined["pearson"], rtol=1e-6)
        meta = materializations(runs["pairs"], "pair_stats")[f"{a}-{b}"]
        assert meta["co_active_pairs"].value == want.height


def test_graph_has_an_edge_per_pair_above_threshold(stats_run):
    store, dense, runs = stats_run
    meta = materializations(runs["graph"], "feature_graph")[None]
    expected = {
        f"{a}-{b}": dense_pair_frame(dense[a], dense[b]).filter(pl.col("pearson") >= 0.2).height
        for a, b in ((6, 7), (7, 8), (8, 9))
    }
    assert meta["edges_per_pair"].value == {k: v for k, v in expected.items() if v}
    edges = pl.read_parquet(store.home / "graph" / EDGES)
    assert edges.height == sum(expected.values()) == meta["edges"].value
    assert nx.read_graphml(store.home / "graph" / GRAPHML).number_of_edges() == edges.height


def test_plots_are_written_and_shown_inline(stats_run):
    store, _, runs = stats_run
    meta = materializations(runs["graph"], "plots")[None]
    for name in ("heatmap", "cooccurrence", "threshold_counts", "graph"):
        png = store.home / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert meta[name].value.startswith(f"![{name}.png](data:image/png;base64,")


# -- end to end on the tiny source ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tokens and all four layers of one tiny shard (8 sequences), each stage one run."""
    home = tmp_path_factory.mktemp("store")
    resource = FeatstoreResource(home=str(home), max_sequences=8, batch_size=4)
    shard = list_shards(resource.extract_config())[0]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shard_partitions.name, [shard])
    location = build_defs(resource)
    runs = {
        "tokens": materialize(instance, [tokens], partition_key=shard, location=location),
        "activations": materialize(
            instance,
            [activations],
            tags=range_tags(multi_key(shard, **{LAYER: "6"}), multi_key(shard, **{LAYER: "9"})),
            location=location,
        ),
    }
    return open_store(home), shard, runs


def materializations(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, dict]:
    return {
        e.materialization.partition: e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key.to_user_string() == asset
    }


@pytest.mark.slow
def test_tokens_metadata_counts_the_stored_rows(tiny_run):
    store, shard, runs = tiny_run
    meta = materializations(runs["tokens"], "tokens")[shard]
    assert meta["tokens"].value == store.tokens(shard).height == 8 * 128


@pytest.mark.slow
def test_one_run_extracts_every_layer_and_its_checks_pass(tiny_run):
    store, shard, runs = tiny_run
    meta = materializations(runs["activations"], "activations")
    assert set(meta) == {multi_key(shard, **{LAYER: str(layer)}) for layer in (6, 7, 8, 9)}
    checks = runs["activations"].get_asset_check_evaluations()
    assert sorted(e.check_name for e in checks if e.passed) == sorted(ALL_PASS)
    for key, m in meta.items():
        layer = int(key.keys_by_dimension[LAYER])
        stored = store.read(layer, shard)
        assert stored.shape == (8 * 128, TINY_D_SAE)
        assert m["tokens"].value == stored.shape[0]
        assert m["nonzeros"].value == stored.nnz
        assert m["l0"].value == pytest.approx(np.diff(stored.indptr).mean(), abs=1e-3)
        assert m["layers_in_forward_pass"].value == 4
        assert m["tokens_per_second"].value > 0


@pytest.mark.slow
def test_a_single_layer_partition_reproduces_the_shared_pass(tiny_run):
    store, shard, _ = tiny_run
    before = store.read(8, shard)
    location = build_defs(FeatstoreResource(home=str(store.home), max_sequences=8))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shard_partitions.name, [shard])
    result = materialize(
        instance, [activations], partition_key=multi_key(shard, **{LAYER: "8"}), location=location
    )
    (meta,) = materializations(result, "activations").values()
    assert meta["layers_in_forward_pass"].value == 1
    after = store.read(8, shard)
    np.testing.assert_allclose(after.toarray(), before.toarray(), atol=1e-5)
