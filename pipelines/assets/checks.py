"""Checks on stored activations: finite and non-negative, sparse but alive, the source's shape."""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations
# at definition time and needs the real classes, not strings.

import dagster as dg
import numpy as np

from featstore.errors import FeatstoreError
from featstore.sources.registry import get_source
from featstore.store import spec
from featstore.store.local import Store
from pipelines.assets.extraction import activations
from pipelines.partitions import LAYER, group_by_shard, shard_layer_partitions
from pipelines.resources import FeatstoreResource

# Mean active features per token outside this range means a dead or a non-sparse SAE: a wrong
# hook, layer or SAE rather than an unusual text.
L0_RANGE = (1.0, 1000.0)


def checked_groups(
    context: dg.AssetCheckExecutionContext, featstore: FeatstoreResource, store: Store
) -> list[tuple[int, str]]:
    """(layer, shard) of the run's partitions; unpartitioned: all shards of configured layers."""
    if context.has_partition_key or context.has_partition_key_range:
        by_shard = group_by_shard(shard_layer_partitions, context.partition_keys, LAYER)
        return [(int(layer), shard) for shard, layers in by_shard.items() for layer in layers]
    stored = set(store.layers())
    return [
        (layer, shard)
        for layer in featstore.layers
        if layer in stored
        for shard in store.shards(layer)
    ]


def bad_values(store: Store, layer: int, shard: str) -> dict[str, int]:
    """Counts of NaN/infinite and of negative stored values, read block by block."""
    counts = {"not_finite": 0, "negative": 0}
    for _, block in store.iter_blocks(layer, shard):
        counts["not_finite"] += int(np.count_nonzero(~np.isfinite(block.data)))
        counts["negative"] += int(np.count_nonzero(block.data < 0))
    return counts


def mean_l0(store: Store, layer: int, shard: str) -> float:
    """Mean number of active features per token, from the stored nonzero count."""
    info = store.info(layer, shard)
    return info["nnz"] / max(info[spec.SHAPE][0], 1)


def shape_problems(store: Store, layer: int, shard: str, source: str) -> list[str]:
    """Mismatches of the stored shape against the source's d_sae and the shard's token table."""
    info = store.info(layer, shard)
    n_rows, d_sae = info[spec.SHAPE]
    expected_d = get_source(info.get("source", source)).d_sae
    n_tokens = store.tokens(shard).height
    problems = []
    if d_sae != expected_d:
        problems.append(f"layer {layer} shard {shard}: d_sae {d_sae}, source has {expected_d}")
    if n_rows != n_tokens:
        problems.append(f"layer {layer} shard {shard}: {n_rows} rows, token table has {n_tokens}")
    return problems


def _result(failures: list[str], checked: int, **metadata: object) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=checked > 0 and not failures,
        description=None if checked else "no stored activations to check",
        metadata={"checked": checked, "failures": dg.MetadataValue.json(failures), **metadata},
    )


@dg.asset_check(asset=activations, blocking=True)
def values_finite_nonnegative(
    context: dg.AssetCheckExecutionContext, featstore: FeatstoreResource
) -> dg.AssetCheckResult:
    """No NaN, infinite or negative activation (SAE codes pass through a ReLU)."""
    store = featstore.open()
    groups = checked_groups(context, featstore, store)
    failures = []
    for layer, shard in groups:
        try:
            counts = bad_values(store, layer, shard)
        except FeatstoreError as exc:  # the store refuses a damaged group where it is read
            failures.append(f"layer {layer} shard {shard}: {exc}")
            continue
        if any(counts.values()):
            failures.append(f"layer {layer} shard {shard}: {counts}")
    return _result(failures, len(groups))


@dg.asset_check(asset=activations, blocking=True)
def l0_in_range(
    context: dg.AssetCheckExecutionContext, featstore: FeatstoreResource
) -> dg.AssetCheckResult:
    """Mean active features per token lies within L0_RANGE (1 to 1000)."""
    store = featstore.open()
    groups = checked_groups(context, featstore, store)
    l0 = {f"{layer}|{shard}": round(mean_l0(store, layer, shard), 3) for layer, shard in groups}
    lo, hi = L0_RANGE
    failures = [f"{key}: L0 {v}" for key, v in l0.items() if not lo <= v <= hi]
    return _result(failures, len(groups), l0=dg.MetadataValue.json(l0))


@dg.asset_check(asset=activations, blocking=True)
def shape_matches_source(
    context: dg.AssetCheckExecutionContext, featstore: FeatstoreResource
) -> dg.AssetCheckResult:
    """Width equals the source's d_sae; one row per row of the shard's token table."""
    store = featstore.open()
    groups = checked_groups(context, featstore, store)
    failures = [
        problem
        for layer, shard in groups
        for problem in shape_problems(store, layer, shard, featstore.source)
    ]
    return _result(failures, len(groups))


activation_checks = [values_finite_nonnegative, l0_in_range, shape_matches_source]
