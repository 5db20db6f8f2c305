"""Dagster's beta APIs that the pipeline uses on purpose, called without their warnings.

The warnings are filtered around featstore's own calls only (a user's code calling the same APIs
still warns), since a user cannot act on them:
- single-run backfills (`backfill_policy`): one forward pass per shard for all its layers;
- `MultiPartitionMapping`: the (shard, layer) -> (shard, pair) partition mapping;
- `observable_source_asset`: the configuration's data versions, observed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg


@contextlib.contextmanager
def on_purpose() -> Iterator[None]:
    """Dagster's beta warnings off, for the calls inside only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        yield


def single_run_asset(**kwargs: Any) -> Callable[..., dg.AssetsDefinition]:
    """`dg.asset(..., backfill_policy=single_run())`: a backfill of many partitions is one run."""
    with on_purpose():
        return dg.asset(backfill_policy=dg.BackfillPolicy.single_run(), **kwargs)


def observable_source_asset(**kwargs: Any) -> Callable[..., dg.SourceAsset]:
    """`dg.observable_source_asset(**kwargs)`."""
    with on_purpose():
        return dg.observable_source_asset(**kwargs)


def multi_partition_mapping(
    mappings: dict[str, dg.DimensionPartitionMapping],
) -> dg.MultiPartitionMapping:
    """`dg.MultiPartitionMapping(mappings)`."""
    with on_purpose():
        return dg.MultiPartitionMapping(mappings)
