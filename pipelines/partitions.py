"""How the pipeline cuts its work: text shards (dynamic), layers and layer pairs (static)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import dagster as dg

from featstore.sources.registry import registry
from pipelines import beta

# Every layer some source of sources.yaml has SAEs for: the space layer partitions live in. Which
# of them a run extracts is configuration (FeatstoreResource.layers).
LAYERS = tuple(
    str(n) for n in sorted({n for source in registry().values() for n in source["layers"]})
)
PAIRS = tuple(f"{a}-{b}" for a, b in itertools.pairwise(LAYERS))

SHARD = "shard"
LAYER = "layer"
PAIR = "pair"

shard_partitions = dg.DynamicPartitionsDefinition(name="text_shards")
layer_partitions = dg.StaticPartitionsDefinition(list(LAYERS))
pair_partitions = dg.StaticPartitionsDefinition(list(PAIRS))
shard_layer_partitions = dg.MultiPartitionsDefinition(
    {SHARD: shard_partitions, LAYER: layer_partitions}
)
shard_pair_partitions = dg.MultiPartitionsDefinition(
    {SHARD: shard_partitions, PAIR: pair_partitions}
)


def parse_pair(key: str) -> tuple[int, int]:
    """'6-7' -> (6, 7)."""
    a, b = key.split("-")
    return int(a), int(b)


def group_by_shard(
    partitions_def: dg.MultiPartitionsDefinition, keys: Sequence[str], dimension: str
) -> dict[str, list[str]]:
    """Multi-partition keys of one run grouped by shard: {shard: [layer or pair key, ...]}."""
    grouped: dict[str, list[str]] = {}
    for key in keys:
        dims = partitions_def.get_partition_key_from_str(key).keys_by_dimension
        grouped.setdefault(dims[SHARD], []).append(dims[dimension])
    return grouped


def multi_key(shard: str, **other: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({SHARD: shard, **other})


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags asking for one run over the partition range [first, last] (a box for multi keys).

    These are the tags Dagster's own single-run backfills set; it exports no public name for them.
    """
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }


def layers_to_pairs() -> dg.MultiPartitionMapping:
    """(shard, layer) -> (shard, pair): a shard's pair a-b reads layers a and b of that shard."""
    pairs_of = {layer: [p for p in PAIRS if layer in p.split("-")] for layer in LAYERS}
    return beta.multi_partition_mapping(
        {
            SHARD: dg.DimensionPartitionMapping(SHARD, dg.IdentityPartitionMapping()),
            LAYER: dg.DimensionPartitionMapping(PAIR, dg.StaticPartitionMapping(pairs_of)),
        }
    )
