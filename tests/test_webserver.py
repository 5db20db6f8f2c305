"""The Dagster UI as a user meets it: `dagster-webserver` on workspace.yaml loads the code location,
lists every asset and check with its partitions, launches runs through its GraphQL API, and shows
what they made: counts, images (not file paths) and progress lines in the run's log."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import build_store, sparse_acts

from featstore.sources.registry import EMBEDDED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
LAYERS, SHARD, N_TOKENS, D_SAE = (6, 7, 8, 9), "s0", 300, 64
TINY_MODEL = EMBEDDED / "tiny" / "model" / "config.json"
DAGSTER_YAML = """\
telemetry:
  enabled: false
run_coordinator:  # launch at once: no daemon runs in this test
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
"""
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}  # one process per run, not per step


@dataclass
class UI:
    """A running webserver: its GraphQL endpoint, the code location and the store behind it."""

    url: str
    location: str
    repository: str
    home: Path
    acts: dict

    def query(self, text: str, **variables) -> dict:
        body = json.dumps({"query": text, "variables": variables}).encode()
        request = urllib.request.Request(
            self.url, body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # GraphQL refuses a query with status 400
            answer = json.loads(exc.read())
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def selector(self) -> dict:
        return {"repositoryLocationName": self.location, "repositoryName": self.repository}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCATIONS = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename
      ... on RepositoryLocation { repositories { name } }
      ... on PythonError { message } } } } } }
"""


def wait_for_location(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240):
    """(location, repository) once the webserver has loaded the code location."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"webserver exited:\n{log.read_text()[-3000:]}"
        try:
            entries = UI(url, "", "", Path(), {}).query(LOCATIONS)["workspaceOrError"]
        except OSError:  # not listening yet
            time.sleep(1)
            continue
        for entry in entries.get("locationEntries", []):
            loaded = entry["locationOrLoadError"]
            if entry["loadStatus"] == "LOADED" and loaded:
                assert loaded["__typename"] == "RepositoryLocation", loaded.get("message")
                return entry["name"], loaded["repositories"][0]["name"]
        time.sleep(1)
    raise AssertionError(f"code location not loaded in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[UI]:
    """The webserver over a store of synthetic activations (layers 6-9, one shard)."""
    base = tmp_path_factory.mktemp("ui")
    (base / "dagster").mkdir()
    (base / "dagster" / "dagster.yaml").write_text(DAGSTER_YAML)
    acts = {layer: {SHARD: sparse_acts(N_TOKENS, D_SAE, 0.08, seed=layer)} for layer in LAYERS}
    build_store(base / "store", acts)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(base / "dagster"),
        "FEATSTORE_HOME": str(base / "store"),
        "OMP_NUM_THREADS": "1",
    }
    port, log = free_port(), base / "webserver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/graphql"
        location, repository = wait_for_location(url, proc, log)
        yield UI(url, location, repository, base / "store", acts)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the webserver and the code server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the code location as listed ------------------------------------------------------------------

ASSET_NODES = """
{ assetNodes { assetKey { path } isPartitioned
    partitionDefinition { type dimensionTypes { name } }
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }
"""


def defined() -> tuple[dict[str, list[str] | None], set[tuple[str, str]]]:
    """Assets (with their partition dimensions) and checks as the definitions hold them."""
    import dagster as dg

    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    assets = {}
    for key in graph.get_all_asset_keys():
        part = graph.get(key).partitions_def
        if isinstance(part, dg.MultiPartitionsDefinition):
            assets[key.to_user_string()] = sorted(d.name for d in part.partitions_defs)
        else:
            assets[key.to_user_string()] = None if part is None else ["default"]
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    return assets, checks


def test_the_code_location_lists_every_asset_with_its_partitions_and_every_check(ui):
    want_assets, want_checks = defined()
    nodes = {"/".join(n["assetKey"]["path"]): n for n in ui.query(ASSET_NODES)["assetNodes"]}
    listed = {
        key: sorted(d["name"] for d in n["partitionDefinition"]["dimensionTypes"])
        if n["isPartitioned"]
        else None
        for key, n in nodes.items()
    }
    assert listed == want_assets
    assert listed["activations"] == ["layer", "shard"]
    assert listed["shard_pair_stats"] == ["pair", "shard"]
    listed_checks = set()
    for key, node in nodes.items():
        found = node["assetChecksOrError"]
        assert found["__typename"] == "AssetChecks", found
        listed_checks |= {(key, check["name"]) for check in found["checks"]}
    assert listed_checks == want_checks


# -- runs launched through the API ----------------------------------------------------------------

ADD_PARTITION = """
mutation($selector: RepositorySelector!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: "text_shards",
                      partitionKey: $key) { __typename } }
"""
LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }
"""
STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
LOGS = """
query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { __typename
  ... on MessageEvent { message level } } } } }
"""
MATERIALIZATIONS = """
query($key: AssetKeyInput!) { assetNodes(assetKeys: [$key]) {
  assetMaterializations(limit: 20) { partition runId metadataEntries { label __typename
    ... on MarkdownMetadataEntry { mdStr } ... on IntMetadataEntry { intValue }
    ... on FloatMetadataEntry { floatValue } ... on PathMetadataEntry { path } } } } }
"""


def launch(ui: UI, asset: str, partition: str | None = None, config: dict | None = None) -> str:
    """Launch one asset's run (one partition of it) and wait for it; returns the run id."""
    tags = [{"key": "dagster/partition", "value": partition}] if partition else []
    params = {
        "selector": {**ui.selector(), "jobName": "__ASSET_JOB", "assetSelection": [
            {"path": [asset]}]},
        "runConfigData": {**IN_PROCESS, **(config or {})},
        "executionMetadata": {"tags": tags},
    }  # fmt: skip
    launched = ui.query(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 300
    while (status := ui.query(STATUS, id=run_id)["runOrError"]["status"]) not in (
        "SUCCESS", "FAILURE", "CANCELED",
    ):  # fmt: skip
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(0.25)
    assert status == "SUCCESS", "\n".join(log_lines(ui, run_id)[-30:])
    return run_id


def log_lines(ui: UI, run_id: str) -> list[str]:
    events = ui.query(LOGS, id=run_id)["logsForRun"]["events"]
    return [e["message"] for e in events if e.get("message")]


def metadata(ui: UI, asset: str, run_id: str) -> dict[str | None, dict[str, dict]]:
    """partition -> label -> entry of the asset's materialisations in that run."""
    (node,) = ui.query(MATERIALIZATIONS, key={"path": [asset]})["assetNodes"]
    return {
        m["partition"]: {e["label"]: e for e in m["metadataEntries"]}
        for m in node["assetMaterializations"]
        if m["runId"] == run_id
    }


def multi_key(**dims: str) -> str:
    """A multi-partition key as Dagster spells it: dimension keys by dimension name, '|'."""
    return "|".join(dims[name] for name in sorted(dims))


def test_a_partition_launched_through_the_api_stores_what_its_metadata_says(ui):
    added = ui.query(ADD_PARTITION, selector=ui.selector(), key=SHARD)["addDynamicPartition"]
    assert added["__typename"] in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError")
    partition = multi_key(shard=SHARD, pair="6-7")
    keep = {"ops": {"shard_pair_stats": {"config": {"keep_sums": True}}}}
    run_id = launch(ui, "shard_pair_stats", partition, keep)

    entries = metadata(ui, "shard_pair_stats", run_id)[partition]
    a, b = (ui.acts[layer][SHARD] for layer in (6, 7))
    co_active = ((a > 0).T.astype(np.int64) @ (b > 0).astype(np.int64)).nnz  # scipy reference
    assert entries["tokens"]["intValue"] == N_TOKENS
    assert entries["co_active_pairs"]["intValue"] == co_active


def test_plots_show_as_images_on_the_materialisation(ui):
    run_id = launch(ui, "plots")
    (entries,) = metadata(ui, "plots", run_id).values()
    for name in ("heatmap", "cooccurrence", "threshold_counts", "graph"):
        entry = entries[name]
        assert entry["__typename"] == "MarkdownMetadataEntry", entry
        prefix = f"![{name}.png](data:image/png;base64,"
        assert entry["mdStr"].startswith(prefix) and entry["mdStr"].endswith(")")
        png = base64.b64decode(entry["mdStr"][len(prefix) : -1])
        assert png == (ui.home / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.skipif(
    not TINY_MODEL.exists(), reason=f"the embedded tiny model is not trained yet ({TINY_MODEL})"
)
def test_an_extraction_run_logs_its_progress_and_reports_its_counts(ui):
    from featstore.sources.extract import ExtractConfig, list_shards
    from featstore.store.home import open_store

    shard = list_shards(ExtractConfig())[0]
    ui.query(ADD_PARTITION, selector=ui.selector(), key=shard)
    partition = multi_key(shard=shard, layer="6")
    config = {"max_sequences": 4, "batch_size": 2, "layers": [6]}
    run_id = launch(ui, "activations", partition, {"resources": {"featstore": {"config": config}}})

    stored = open_store(ui.home).read(6, shard)
    entries = metadata(ui, "activations", run_id)[partition]
    assert entries["tokens"]["intValue"] == stored.shape[0] == 4 * 128
    assert entries["nonzeros"]["intValue"] == stored.nnz
    assert entries["l0"]["floatValue"] == pytest.approx(stored.nnz / stored.shape[0], abs=1e-3)
    assert entries["tokens_per_second"]["floatValue"] > 0
    assert entries["seconds"]["__typename"] == "FloatMetadataEntry"
    lines = log_lines(ui, run_id)
    progress = [line for line in lines if "batch" in line and "tok/s" in line and "left" in line]
    assert progress, lines  # each batch step: batches done, tokens per second, time left
    assert any(f"shard {shard}: {4 * 128} tokens in" in line for line in lines)  # shard done
