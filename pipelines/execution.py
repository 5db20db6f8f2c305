"""How runs execute: on one machine, steps in parallel processes, model steps in a pool; on
several, steps as tasks of a Dask cluster ($FEATSTORE_EXECUTOR=dask, docs/SCALING.md).

Per-shard runs (one per new text file from the sensor, or a backfill split per shard) run side
by side up to the run queue's limit; inside a run, independent steps run in up to
`max_concurrent` processes. Steps that load the model (`pool="featstore_model"`) are limited
across all runs by the pool's limit, set in the instance's dagster.yaml (`INSTANCE_CONFIG`).
"""

from __future__ import annotations

import json
import os

import dagster as dg

from featstore.errors import FeatstoreError

EXECUTORS = ("multiprocess", "dask")
MODEL_POOL = "featstore_model"
# Dask ignores Dagster pools; a model step asks Dask for one unit of this worker resource
# instead, so a worker runs one at a time. Workers of an existing cluster that may run model
# steps are started with `--resources featstore_model=1` (one per GPU); others never get them.
DASK_MODEL_TAGS = {"dagster-dask/resource_requirements": json.dumps({MODEL_POOL: 1})}
# What an asset that loads the model declares: one at a time per GPU, under either executor.
MODEL_STEP = {"pool": MODEL_POOL, "op_tags": DASK_MODEL_TAGS}


def max_concurrent() -> int:
    """$FEATSTORE_MAX_CONCURRENT, else half the CPUs (at least 1): model steps use many threads."""
    value = os.environ.get("FEATSTORE_MAX_CONCURRENT")
    return int(value) if value else max(1, (os.cpu_count() or 2) // 2)


def executor() -> dg.ExecutorDefinition:
    """$FEATSTORE_EXECUTOR: "multiprocess" (default; bounded concurrent steps per run) or "dask"."""
    kind = os.environ.get("FEATSTORE_EXECUTOR") or "multiprocess"
    if kind == "multiprocess":
        return dg.multiprocess_executor.configured({"max_concurrent": max_concurrent()})
    if kind == "dask":
        return dask_executor(os.environ.get("FEATSTORE_DASK_SCHEDULER") or None)
    raise FeatstoreError(f"FEATSTORE_EXECUTOR={kind!r}: expected one of {', '.join(EXECUTORS)}")


def dask_executor(scheduler: str | None = None) -> dg.ExecutorDefinition:
    """Steps as Dask tasks: on the cluster whose scheduler is at `scheduler` (tcp://host:port),
    else on a local cluster of `max_concurrent()` single-threaded workers started per run."""
    try:
        from dagster_dask import dask_executor as dask  # optional: pip install featstore[dask]
    except ImportError as e:
        raise FeatstoreError(
            "FEATSTORE_EXECUTOR=dask needs dagster-dask: pip install 'featstore[dask]'"
        ) from e
    if scheduler:
        cluster = {"existing": {"address": scheduler}}
    else:
        # Dagster steps are not thread-safe: one thread per worker (dagster-dask sets it too).
        cluster = {
            "local": {
                "n_workers": max_concurrent(),
                "threads_per_worker": 1,
                "resources": {MODEL_POOL: 1},
            }
        }
    return dask.configured({"cluster": cluster})


def instance_config(model_steps: int = 1, runs: int | None = None) -> str:
    """dagster.yaml: no telemetry; at most `runs` runs and `model_steps` model steps at once."""
    return (
        "telemetry:\n  enabled: false\n"
        "concurrency:\n"
        f"  runs:\n    max_concurrent_runs: {runs or max_concurrent()}\n"
        f"  pools:\n    default_limit: {model_steps}\n"
    )
