"""Removing shards: their data leaves the store, then the merged statistics are rebuilt."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.

import dagster as dg

from pipelines.assets.statistics import pair_stats
from pipelines.partitions import PAIRS, parse_pair, range_tags
from pipelines.resources import FeatstoreResource


class RemoveShardsConfig(dg.Config):
    shards: list[str]


@dg.op
def delete_shards(
    context: dg.OpExecutionContext, config: RemoveShardsConfig, featstore: FeatstoreResource
) -> None:
    """`Store.delete_shard` for each shard: tokens, activations and per-shard pair sums."""
    store = featstore.open()
    for shard in config.shards:
        removed = store.delete_shard(shard)
        context.log.info(f"shard {shard}: removed {', '.join(removed) or 'nothing (not stored)'}")


@dg.job(description="Delete removed text shards from the store (the sensor starts it).")
def remove_shards() -> None:
    delete_shards()


def removal_request(shards: list[str]) -> dg.RunRequest:
    return dg.RunRequest(
        job_name=remove_shards.name,
        run_config={"ops": {"delete_shards": {"config": {"shards": shards}}}},
        tags={"featstore/removed_shards": ",".join(shards)},
    )


# The graph and the plots follow pair_stats through their eager automation conditions.
merged_statistics = dg.define_asset_job(
    "merged_statistics",
    selection=[pair_stats],  # partitioned as pair_stats (Dagster infers it)
    description="Pair statistics merged over the stored shards.",
)


def merge_request(layers: list[int], run_key: str | None = None) -> dg.SkipReason | dg.RunRequest:
    """One run of pair_stats over every pair of configured layers."""
    keys = [k for k in PAIRS if set(parse_pair(k)) <= set(layers)]
    if not keys:
        return dg.SkipReason("fewer than two adjacent layers configured")
    return dg.RunRequest(run_key=run_key, tags=range_tags(keys[0], keys[-1]))


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[remove_shards],
    request_job=merged_statistics,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def merge_after_removal(
    context: dg.RunStatusSensorContext, featstore: FeatstoreResource
) -> dg.SkipReason | dg.RunRequest:
    """A removal changes the merged results without any upstream materialisation: rebuild them."""
    return merge_request(featstore.layers, run_key=context.dagster_run.run_id)
