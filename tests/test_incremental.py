"""Incremental recomputation: adding, replacing or removing one text shard re-runs only that
shard's partitions and the merged assets, and the merged statistics equal a from-scratch
computation over the shards present (a dense numpy reference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from helpers import dense_pair_frame

from featstore.cli import main as featstore_cli
from featstore.stats.query import pair_stats_path
from featstore.store import spec
from featstore.store.local import Store
from pipelines.assets.extraction import activations, encoder_config, tokenizer_config, tokens
from pipelines.assets.statistics import pair_stats, shard_pair_stats
from pipelines.definitions import build_defs, defs
from pipelines.demo import box_tags, materialize, pair_range, shard_spans
from pipelines.execution import instance_config
from pipelines.partitions import LAYER, PAIR, range_tags, shard_partitions
from pipelines.removal import merge_request, remove_shards
from pipelines.resources import FeatstoreResource
from pipelines.sensors import new_text_shards

EMBEDDED_TEXT = Path(__file__).resolve().parents[1] / "featstore" / "embedded" / "text"
LAYERS = [6, 7, 8]
PAIRS = [(6, 7), (7, 8)]
CHARS = 5000  # text for 4 sequences of 128 tokens, with room to spare
DATA_VERSION = "dagster/data_version"


def text_slice(index: int) -> str:
    """A distinct piece of embedded text (shards cycle; each index its own offset)."""
    files = sorted(EMBEDDED_TEXT.glob("*.txt"))
    text = files[index % len(files)].read_text()
    start = (index // len(files)) * CHARS
    return text[start : start + CHARS]


@dataclass
class Pipeline:
    """An ephemeral instance, a text folder and the location over them; runs as the daemon would."""

    text_dir: Path
    resource: FeatstoreResource
    instance: dg.DagsterInstance = field(default_factory=dg.DagsterInstance.ephemeral)
    cursor: str | None = None

    @property
    def location(self) -> dg.Definitions:
        return build_defs(self.resource)

    @property
    def store(self) -> Store:
        return self.resource.open()

    def tick(self) -> dg.SensorResult:
        """One sensor evaluation; its partition requests applied, its cursor kept."""
        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"featstore": self.resource}
        ) as context:
            result = new_text_shards(context)
        self.cursor = result.cursor
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(shard_partitions.name, request.partition_keys)
            else:
                for key in request.partition_keys:
                    self.instance.delete_dynamic_partition(shard_partitions.name, key)
        return result

    def run(self, assets, **kwargs) -> dg.ExecuteInProcessResult:
        return materialize(self.instance, assets, location=self.location, **kwargs)

    def shard_runs(self, shards: list[str], pair_sums: bool = True) -> list:
        """Tokens and activations (and pair sums) of `shards`, one run per stage and span."""
        layers, pairs = (str(LAYERS[0]), str(LAYERS[-1])), pair_range(LAYERS)
        results = []
        for span in shard_spans(self.instance, shards):
            results.append(self.run([tokens], tags=range_tags(*span)))
            results.append(self.run([activations], tags=box_tags(span, LAYER, layers)))
            if pair_sums:
                results.append(
                    self.run([shard_pair_stats], tags=box_tags(span, PAIR, pairs), ops=KEEP_SUMS)
                )
        return results

    def merge(self) -> dg.ExecuteInProcessResult:
        request = merge_request(LAYERS)
        return self.run([pair_stats], tags=request.tags)



# The story keeps the shard sums (a cache, off by default), so that stale sums of replaced or
# removed shards are there to be ignored; tests/test_pipelines.py runs without them.
KEEP_SUMS = {"shard_pair_stats": {"config": {"keep_sums": True}}}

def materialized(results: list) -> dict[str, set]:
    """Asset name -> the partitions (shard, or (shard, layer/pair), or pair) materialised."""
    out: dict[str, set] = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            key = event.materialization.partition
            dims = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else None
            part = (dims["shard"], dims.get(LAYER) or dims.get(PAIR)) if dims else key
            out.setdefault(event.materialization.asset_key.to_user_string(), set()).add(part)
    return out


def data_versions(result: dg.ExecuteInProcessResult) -> dict:
    return {
        e.materialization.partition: e.materialization.tags[DATA_VERSION]
        for e in result.get_asset_materialization_events()
    }


def dense(store: Store, layer: int, shards: list[str]) -> np.ndarray:
    """The activations of `shards` stacked, as float64 (the reference's precision)."""
    return np.vstack([store.read(layer, s).toarray() for s in shards]).astype(np.float64)


def assert_matches_reference(frame: pl.DataFrame, store: Store, a: int, b: int, shards) -> None:
    """Every co-active pair's counts and Pearson equal brute force over exactly `shards`."""
    want = dense_pair_frame(dense(store, a, shards), dense(store, b, shards))
    assert frame.height == want.height
    joined = want.join(frame, on=["feature_a", "feature_b"], how="left", suffix="_got")
    np.testing.assert_array_equal(joined["n_tokens_got"], joined["n_tokens"])
    np.testing.assert_array_equal(joined["n_both_got"], joined["n_both"])
    np.testing.assert_allclose(joined["pearson_got"], joined["pearson"], rtol=1e-5, atol=1e-9)


def assert_merged_match(store: Store, shards: list[str]) -> None:
    for a, b in PAIRS:
        assert_matches_reference(pl.read_parquet(pair_stats_path(store, a, b)), store, a, b, shards)


def cli_stats(store: Store, a: int, b: int, out: Path) -> pl.DataFrame:
    assert featstore_cli(["--home", str(store.home), "stats", "--layer-a", str(a),
                          "--layer-b", str(b), "--out", str(out)]) == 0  # fmt: skip
    return pl.read_parquet(out)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Three shards in full; then a fourth added, one replaced, one removed, step by step."""
    text_dir, home = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("store")
    for i, name in enumerate(("a", "b", "c")):
        (text_dir / f"{name}.txt").write_text(text_slice(i))
    resource = FeatstoreResource(
        home=str(home), text_dir=str(text_dir), layers=LAYERS, max_sequences=4, batch_size=4
    )
    p = Pipeline(text_dir, resource)
    steps: dict = {}

    p.tick()
    steps["initial"] = [*p.shard_runs(["a", "b", "c"]), p.merge()]
    steps["initial_merged_ok"] = _merged_ok(p.store, ["a", "b", "c"])

    (text_dir / "d.txt").write_text(text_slice(3))
    steps["add_tick"] = p.tick()
    steps["add"] = [*p.shard_runs(["d"]), p.merge()]
    steps["add_merged_ok"] = _merged_ok(p.store, ["a", "b", "c", "d"])

    old_b = {layer: p.store.read(layer, "b") for layer in LAYERS}
    (text_dir / "b.txt").write_text(text_slice(4))
    steps["replace_tick"] = p.tick()
    steps["replace"] = p.shard_runs(["b"], pair_sums=False)  # new activations, old pair sums
    out = tmp_path_factory.mktemp("cli") / "stats.parquet"
    current = ["a", "b", "c", "d"]
    steps["cli_before_pair_sums"] = (
        cli_stats(p.store, 6, 7, out),
        dense_pair_frame(dense(p.store, 6, current), dense(p.store, 7, current)),
    )
    steps["replace"] += [*p.shard_runs(["b"])[2:], p.merge()]
    steps["replace_merged_ok"] = _merged_ok(p.store, ["a", "b", "c", "d"])
    steps["old_b"] = old_b

    (text_dir / "c.txt").unlink()
    steps["remove_tick"] = p.tick()
    (request,) = [r for r in steps["remove_tick"].run_requests if r.job_name == remove_shards.name]
    p.location.resolve_job_def(remove_shards.name).execute_in_process(
        run_config=request.run_config, instance=p.instance
    )
    steps["remove"] = [p.merge()]
    return p, steps


def _merged_ok(store: Store, shards: list[str]) -> bool:
    assert_merged_match(store, shards)
    return True


def test_initial_run_materialises_every_partition(story):
    _, steps = story
    done = materialized(steps["initial"])
    assert done["activations"] == {(s, str(n)) for s in "abc" for n in LAYERS}
    assert done["pair_stats"] == {f"{a}-{b}" for a, b in PAIRS}


def test_adding_a_shard_runs_only_its_partitions_and_the_merge(story):
    p, steps = story
    (add,) = [r.partition_key for r in steps["add_tick"].run_requests]
    assert add == "d"
    done = materialized(steps["add"])
    assert done["tokens"] == {"d"}
    assert done["activations"] == {("d", str(n)) for n in LAYERS}
    assert done["shard_pair_stats"] == {("d", f"{a}-{b}") for a, b in PAIRS}
    assert done["pair_stats"] == {f"{a}-{b}" for a, b in PAIRS}
    assert steps["add_merged_ok"]  # merged table == brute force over a, b, c, d (at that time)


def test_a_changed_file_is_tokenised_again_and_replaces_its_data(story):
    p, steps = story
    assert [r.partition_key for r in steps["replace_tick"].run_requests] == ["b"]
    done = materialized(steps["replace"])
    assert done["tokens"] == {"b"}
    assert {s for s, _ in done["activations"]} == {s for s, _ in done["shard_pair_stats"]} == {"b"}
    for layer in LAYERS:  # new text, new activations
        assert (p.store.read(layer, "b") != steps["old_b"][layer]).nnz > 0
    assert steps["replace_merged_ok"]


def test_the_cli_never_reads_pair_sums_of_replaced_activations(story):
    # Run while pairs/6-7/b still held the old text's sums: the CLI saw them stale and
    # recomputed, matching brute force over the activations of that moment.
    _, steps = story
    got, want = steps["cli_before_pair_sums"]
    assert got.height == want.height
    joined = want.join(got, on=["feature_a", "feature_b"], how="left", suffix="_got")
    np.testing.assert_array_equal(joined["n_both_got"], joined["n_both"])
    np.testing.assert_allclose(joined["pearson_got"], joined["pearson"], rtol=1e-5, atol=1e-9)


def test_removing_a_shard_deletes_its_data_and_its_contribution(story):
    p, steps = story
    tick = steps["remove_tick"]
    deletes = [r for r in tick.dynamic_partitions_requests
               if isinstance(r, dg.DeleteDynamicPartitionsRequest)]  # fmt: skip
    assert [list(r.partition_keys) for r in deletes] == [["c"]]
    assert p.instance.get_dynamic_partitions(shard_partitions.name) == ["a", "b", "d"]
    assert "c" not in p.store.token_shards()
    assert all("c" not in p.store.shards(layer) for layer in LAYERS)
    assert all("c" not in p.store.children(f"{spec.PAIRS}/{a}-{b}") for a, b in PAIRS)
    assert materialized(steps["remove"]) == {"pair_stats": {f"{a}-{b}" for a, b in PAIRS}}
    assert_merged_match(p.store, ["a", "b", "d"])
    out = p.text_dir / "cli.parquet"
    assert_matches_reference(cli_stats(p.store, 7, 8, out), p.store, 7, 8, ["a", "b", "d"])


def test_data_versions_follow_text_and_configuration(story, tmp_path):
    p, _ = story
    first = data_versions(p.run([tokens], partition_key="a"))["a"]
    assert data_versions(p.run([tokens], partition_key="a"))["a"] == first
    other = FeatstoreResource(**{**p.resource.model_dump(), "seq_len": 64, "home": str(tmp_path)})
    resized = Pipeline(p.text_dir, other, dg.DagsterInstance.ephemeral())
    resized.instance.add_dynamic_partitions(shard_partitions.name, ["a"])
    assert data_versions(resized.run([tokens], partition_key="a"))["a"] != first


def test_definitions_carry_versions_removal_and_bounded_parallelism(tmp_path):
    graph = defs.resolve_asset_graph()
    assert all(graph.get(key).code_version for key in graph.materializable_asset_keys)
    assert defs.resolve_job_def(remove_shards.name) is not None
    assert defs.resolve_sensor_def("merge_after_removal") is not None
    config = yaml.safe_load(instance_config(model_steps=1, runs=3))
    assert config["concurrency"] == {"runs": {"max_concurrent_runs": 3},
                                     "pools": {"default_limit": 1}}  # fmt: skip
    (tmp_path / "dagster.yaml").write_text(instance_config(model_steps=1, runs=3))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def stale_status(p: Pipeline, asset, partition) -> StaleStatus:
    """What the UI shows for a partition (its resolver; Dagster has no public API for it)."""
    graph, loading = p.location.resolve_asset_graph(), LoadingContextForTest(p.instance)
    resolver = CachingStaleStatusResolver(p.instance, graph, loading)
    return resolver.get_status(asset.key, partition)


def test_a_configuration_change_marks_exactly_the_assets_it_touches_stale(story):
    """Observing the configuration sources after a change of the SAE side (layers) makes the
    activations stale and leaves the tokens fresh; a change of the sequence shape makes both."""
    p, _ = story
    p.run([tokenizer_config, encoder_config])
    p.run([tokens], partition_key="a")
    layers = (str(LAYERS[0]), str(LAYERS[-1]))
    p.run([activations], tags=box_tags(("a", "a"), LAYER, layers))
    cell = dg.MultiPartitionKey({"shard": "a", LAYER: "6"})
    assert stale_status(p, tokens, "a") == StaleStatus.FRESH
    assert stale_status(p, activations, cell) == StaleStatus.FRESH

    more_layers = {**p.resource.model_dump(), "layers": [*LAYERS, 9]}
    changed = Pipeline(p.text_dir, FeatstoreResource(**more_layers), p.instance)
    changed.run([tokenizer_config, encoder_config])
    assert stale_status(changed, tokens, "a") == StaleStatus.FRESH
    assert stale_status(changed, activations, cell) == StaleStatus.STALE

    shorter = Pipeline(p.text_dir, FeatstoreResource(**{**more_layers, "seq_len": 64}), p.instance)
    shorter.run([tokenizer_config, encoder_config])
    assert stale_status(shorter, tokens, "a") == StaleStatus.STALE
    assert stale_status(shorter, activations, cell) == StaleStatus.STALE
