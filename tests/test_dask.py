"""The same definitions on Dask distributed ($FEATSTORE_EXECUTOR=dask through `dagster-dask`):
runs on a local `distributed` cluster store exactly what in-process runs store, with the workers
sharing the store in a folder or on S3 (moto's server on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import correlated_layers

from featstore.analysis.graph import EDGES
from featstore.errors import FeatstoreError
from featstore.sources.extract import token_table
from featstore.stats.query import pair_stats_path
from featstore.store.home import open_store
from pipelines.assets.statistics import feature_graph, pair_stats, plots, shard_pair_stats
from pipelines.definitions import build_defs
from pipelines.demo import RUN_CONFIG, materialize
from pipelines.execution import executor
from pipelines.partitions import (
    PAIR,
    PAIRS,
    multi_key,
    parse_pair,
    range_tags,
    shard_partitions,
)
from pipelines.resources import FeatstoreResource

pytest.importorskip("dagster_dask", reason="needs the dask extra: pip install '.[dask]'")
distributed = pytest.importorskip("distributed")

SHARDS = ("s0", "s1")
# One job per partitioning (an asset job's assets share one); in order, each reads the one before.
# On the cluster the shard sums are kept (a cache, off by default), so that workers exchange
# them through the store; the in-process run keeps none: both give the same tables.
KEEP_SUMS = {"ops": {"shard_pair_stats": {"config": {"keep_sums": True}}}}
JOBS = {"shard_pairs": [shard_pair_stats], "pairs": [pair_stats], "graph": [feature_graph, plots]}


def statistics_job(name: str) -> dg.JobDefinition:
    """Job `name` of JOBS in the location the environment configures.

    Module-level so that a Dask worker can rebuild it (`build_reconstructable_job`); the store
    comes from $FEATSTORE_HOME and the executor from $FEATSTORE_EXECUTOR, as in a deployment.
    """
    job = dg.define_asset_job(name, selection=JOBS[name])
    location = dg.Definitions.merge(build_defs(FeatstoreResource()), dg.Definitions(jobs=[job]))
    return location.resolve_job_def(name)


def folder_url(home: Path) -> str:
    """The folder store of `home`, named so that $FEATSTORE_STORE_URL does not apply."""
    return f"file://{home / 'store.zarr'}"


def write_store(home: Path, url: str | None = None) -> None:
    """Two shards of correlated activations at layers 6-9."""
    store = open_store(home, create=True, url=url)
    for i, shard in enumerate(SHARDS):
        store.write_tokens(shard, token_table(np.zeros((3, 100), np.int32)), {})
        for layer, x in correlated_layers(n_tokens=300, d=24, seed=i).items():
            store.write_activations(layer, shard, sp.csr_matrix(x.astype(np.float32)), {})


def runs() -> list[tuple[str, dict[str, str]]]:
    """(job, tags) of each run: each shard's pairs, their merge, then graph and plots."""
    first, last = PAIRS[0], PAIRS[-1]
    per_shard = [
        ("shard_pairs", range_tags(multi_key(s, **{PAIR: first}), multi_key(s, **{PAIR: last})))
        for s in SHARDS
    ]
    return [*per_shard, ("pairs", range_tags(first, last)), ("graph", {})]


@pytest.fixture(params=["folder", "s3"])
def dask_home(request, tmp_path, monkeypatch) -> Path:
    """The store of the Dask runs, named in the environment before workers start (they copy it):
    a folder in the home, or a bucket of the local S3 server ($FEATSTORE_STORE_URL)."""
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "dask"))
    monkeypatch.setenv("FEATSTORE_EXECUTOR", "dask")
    if request.param == "s3":
        monkeypatch.setenv("FEATSTORE_STORE_URL", request.getfixturevalue("s3").url())
    return tmp_path / "dask"


@pytest.fixture
def cluster(dask_home):
    """One single-threaded worker process, talking TCP on loopback as a remote one would."""
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
    ) as local:
        yield local


def test_executor_follows_the_environment(monkeypatch):
    monkeypatch.delenv("FEATSTORE_EXECUTOR", raising=False)
    assert executor().name == "multiprocess"

    monkeypatch.setenv("FEATSTORE_EXECUTOR", "dask")
    monkeypatch.setenv("FEATSTORE_DASK_SCHEDULER", "tcp://10.0.0.1:8786")
    config = executor().apply_config_mapping({}).value["config"]
    assert executor().name == "dask"
    assert config == {"cluster": {"existing": {"address": "tcp://10.0.0.1:8786"}}}

    monkeypatch.delenv("FEATSTORE_DASK_SCHEDULER")
    config = executor().apply_config_mapping({}).value["config"]
    assert config["cluster"]["local"]["threads_per_worker"] == 1

    monkeypatch.setenv("FEATSTORE_EXECUTOR", "kubernetes")
    with pytest.raises(FeatstoreError, match="FEATSTORE_EXECUTOR='kubernetes'"):
        executor()


def test_model_steps_ask_dask_for_one_model_slot_of_a_worker(monkeypatch):
    """Dask ignores Dagster pools: steps that load the model ask for the worker resource
    `featstore_model` instead, which the local cluster gives each worker once."""
    from dagster_dask.executor import get_dask_resource_requirements

    from pipelines.assets.causal import causal_edges, erasure
    from pipelines.assets.extraction import activations

    for model_step in (activations, causal_edges, erasure):
        assert get_dask_resource_requirements(model_step.op.tags) == {"featstore_model": 1}
    for other in (shard_pair_stats, pair_stats, feature_graph, plots):
        assert get_dask_resource_requirements(other.op.tags) == {}
    monkeypatch.setenv("FEATSTORE_EXECUTOR", "dask")
    monkeypatch.delenv("FEATSTORE_DASK_SCHEDULER", raising=False)
    local = executor().apply_config_mapping({}).value["config"]["cluster"]["local"]
    assert local["resources"] == {"featstore_model": 1}


@pytest.mark.slow
def test_statistics_on_dask_equal_an_in_process_run(
    request, tmp_path, monkeypatch, dask_home, cluster
):
    local_home = tmp_path / "local"
    write_store(dask_home)
    write_store(local_home, folder_url(local_home))

    local = dg.DagsterInstance.ephemeral()
    local.add_dynamic_partitions(shard_partitions.name, list(SHARDS))
    location = build_defs(FeatstoreResource(home=str(local_home), store_url=folder_url(local_home)))
    for job, tags in runs():
        materialize(local, JOBS[job], tags=tags, location=location)

    monkeypatch.setenv("FEATSTORE_DASK_SCHEDULER", cluster.scheduler_address)
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    with (
        dg.instance_for_test(temp_dir=str(dagster_home)) as instance,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as tasks,
    ):
        assert instance.is_persistent  # dagster-dask hands workers a reference to it
        instance.add_dynamic_partitions(shard_partitions.name, list(SHARDS))
        for job, tags in runs():
            result = dg.execute_job(
                dg.build_reconstructable_job(__name__, statistics_job.__name__, (job,)),
                instance,
                run_config={**RUN_CONFIG, **KEEP_SUMS} if job == "shard_pairs" else RUN_CONFIG,
                tags=tags,
            )
            assert result.success, [e.message for e in result.get_step_failure_events()]
    # Every step ran as a task of the cluster, named "{job}.{step}" by dagster-dask.
    want = {f"{job}.{a.node_def.name}" for job, assets in JOBS.items() for a in assets}
    assert {task["key"] for task in tasks.data} == want

    dask_store = open_store(dask_home)
    local_store = open_store(local_home, url=folder_url(local_home))
    assert dask_store.local == ("FEATSTORE_STORE_URL" not in os.environ)
    if not dask_store.local:  # the workers exchanged the per-shard pair sums through S3
        keys = request.getfixturevalue("s3").keys("store.zarr/pairs/6-7/")
        assert {k.split("/")[3] for k in keys} >= set(SHARDS)
    for pair in PAIRS:
        a, b = parse_pair(pair)
        dask_frame = pl.read_parquet(pair_stats_path(dask_store, a, b))
        assert dask_frame.height > 0
        assert dask_frame.equals(pl.read_parquet(pair_stats_path(local_store, a, b)))
    assert pl.read_parquet(dask_home / "graph" / EDGES).equals(
        pl.read_parquet(local_home / "graph" / EDGES)
    )
