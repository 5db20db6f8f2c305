"""The Dagster side of featstore: assets, checks and sensors over `featstore`'s functions."""

from __future__ import annotations

import warnings

import dagster as dg

# Two beta APIs are used on purpose: single-run backfills (one forward pass per shard for all its
# layers) and the (shard, layer) -> (shard, pair) mapping. Their warnings would only repeat that
# on every load of the definitions.
warnings.filterwarnings(
    "ignore",
    message=r"(Parameter `backfill_policy`|Class `MultiPartitionMapping`)",
    category=dg.BetaWarning,
)
