"""Sensors: new or changed text files become shards to tokenise, vanished ones are removed;
eager conditions carry the rest along."""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations
# at definition time and needs the real classes, not strings.

import json

import dagster as dg

from featstore.errors import FeatstoreError
from featstore.sources.extract import list_shards
from featstore.store import spec
from pipelines.assets.extraction import tokens
from pipelines.partitions import shard_partitions
from pipelines.removal import removal_request, remove_shards
from pipelines.resources import FeatstoreResource
from pipelines.versions import file_digest

tokenize_shards = dg.define_asset_job("tokenize_shards", selection=[tokens])  # by text shard


@dg.sensor(
    jobs=[tokenize_shards, remove_shards],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def new_text_shards(
    context: dg.SensorEvaluationContext, featstore: FeatstoreResource
) -> dg.SensorResult:
    """Keeps the shard partitions in step with the *.txt files of the text folder.

    A new file becomes a shard and is tokenised; a changed one (its bytes' hash, kept in the
    cursor) is tokenised again; a vanished one loses its partition and `remove_shards` deletes
    its data. Activations and everything downstream follow through their eager automation
    conditions (after a removal: `merge_after_removal`).
    """
    try:
        shards = list_shards(featstore.extract_config())
    except FeatstoreError as exc:  # a streaming source, or no text folder: nothing to watch
        return dg.SensorResult(skip_reason=str(exc))
    known = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    valid = [s for s in shards if spec.name_ok(s)]
    for bad in sorted(set(shards) - set(valid)):
        context.log.warning(f"ignoring {bad}.txt: shard names use letters, digits, '_', '.', '-'")
    folder = featstore.text_folder()
    digests = {s: file_digest(folder / f"{s}.txt") for s in valid}
    seen = json.loads(context.cursor) if context.cursor else {}
    new = [s for s in valid if s not in known]
    changed = [s for s in valid if s in known and seen.get(s, digests[s]) != digests[s]]
    gone = sorted(known - set(valid))
    requests = [
        dg.RunRequest(job_name=tokenize_shards.name, partition_key=s, run_key=f"{s}@{digests[s]}")
        for s in new + changed
    ]
    partition_requests = [shard_partitions.build_add_request(new)] if new else []
    if gone:
        partition_requests.append(shard_partitions.build_delete_request(gone))
        requests.append(removal_request(gone))
    cursor = json.dumps(digests, sort_keys=True)
    if not requests:
        return dg.SensorResult(
            skip_reason=f"no new, changed or removed text files in {folder}", cursor=cursor
        )
    return dg.SensorResult(
        run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=cursor
    )


# Evaluates the assets' eager automation conditions whenever the UI's daemon runs (`make ui`); on
# by default, unlike Dagster's implicit one, so a new text file flows through to the plots.
automation = dg.AutomationConditionSensorDefinition(
    "featstore_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
