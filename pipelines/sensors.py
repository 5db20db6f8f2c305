"""Sensors: new text files become shards to tokenise; eager conditions carry the rest along."""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations
# at definition time and needs the real classes, not strings.

import dagster as dg

from featstore import spec
from featstore.errors import FeatstoreError
from featstore.extract import list_shards
from pipelines.assets.extraction import tokens
from pipelines.partitions import shard_partitions
from pipelines.resources import FeatstoreResource


@dg.sensor(
    target=[tokens],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def new_text_shards(
    context: dg.SensorEvaluationContext, featstore: FeatstoreResource
) -> dg.SensorResult:
    """Registers each new *.txt of the text folder as a shard and tokenises it.

    Activations and everything downstream follow through their eager automation conditions.
    """
    try:
        shards = list_shards(featstore.extract_config())
    except FeatstoreError as exc:  # a streaming source, or no text folder: nothing to watch
        return dg.SensorResult(skip_reason=str(exc))
    known = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    new = [s for s in shards if s not in known and spec.SHARD_NAME.match(s)]
    for bad in sorted(set(shards) - known - set(new)):
        context.log.warning(f"ignoring {bad}.txt: shard names use letters, digits, '_', '.', '-'")
    if not new:
        return dg.SensorResult(skip_reason=f"no new text files in {featstore.text_folder()}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=shard, run_key=shard) for shard in new],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new)],
    )


# Evaluates the assets' eager automation conditions whenever the UI's daemon runs (`make ui`); on
# by default, unlike Dagster's implicit one, so a new text file flows through to the plots.
automation = dg.AutomationConditionSensorDefinition(
    "featstore_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
