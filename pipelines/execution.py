"""How runs execute on one machine: steps in parallel processes, model steps in a pool.

Per-shard runs (one per new text file from the sensor, or a backfill split per shard) run side
by side up to the run queue's limit; inside a run, independent steps run in up to
`max_concurrent` processes. Steps that load the model (`pool="featstore_model"`) are limited
across all runs by the pool's limit, set in the instance's dagster.yaml (`INSTANCE_CONFIG`).
"""

from __future__ import annotations

import os

import dagster as dg


def max_concurrent() -> int:
    """$FEATSTORE_MAX_CONCURRENT, else half the CPUs (at least 1): model steps use many threads."""
    value = os.environ.get("FEATSTORE_MAX_CONCURRENT")
    return int(value) if value else max(1, (os.cpu_count() or 2) // 2)


def executor() -> dg.ExecutorDefinition:
    """Multiprocess execution with a bounded number of concurrent steps per run."""
    return dg.multiprocess_executor.configured({"max_concurrent": max_concurrent()})


def instance_config(model_steps: int = 1, runs: int | None = None) -> str:
    """dagster.yaml: no telemetry; at most `runs` runs and `model_steps` model steps at once."""
    return (
        "telemetry:\n  enabled: false\n"
        "concurrency:\n"
        f"  runs:\n    max_concurrent_runs: {runs or max_concurrent()}\n"
        f"  pools:\n    default_limit: {model_steps}\n"
    )
