"""Extraction assets: text shards -> token tables -> sparse SAE activations per layer."""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations
# at definition time and needs the real classes, not strings.

from typing import Any

import dagster as dg

from featstore.sources.extract import ExtractReport, extract_shard, tokenize_shard
from featstore.store import spec
from featstore.store.local import Store
from pipelines import beta
from pipelines.execution import MODEL_STEP
from pipelines.partitions import (
    LAYER,
    group_by_shard,
    multi_key,
    shard_layer_partitions,
    shard_partitions,
)
from pipelines.resources import FeatstoreResource
from pipelines.versions import (
    activations_version,
    digest,
    encoder_settings,
    tokens_config,
    tokens_version,
)

# Bump a code version when the asset's output would change for the same input.
EXTRACTION_VERSION = "1"


OBSERVE = dg.AutomationCondition.on_cron("* * * * *")


# The configuration as observable sources: observing them ("Observe sources" in the UI, or the
# automation sensor every minute) gives a new data version when the resource's configuration or
# sources.yaml changed, and Dagster marks what reads it stale. The tokenizer's part feeds
# `tokens`, the encoder's part only `activations`, so swapping an SAE leaves the tokens fresh.
@beta.observable_source_asset(
    group_name="extraction",
    automation_condition=OBSERVE,
    description="What tokenisation depends on: source, model (its tokenizer), sequence shape.",
)
def tokenizer_config(featstore: FeatstoreResource) -> dg.DataVersion:
    return dg.DataVersion(digest(tokens_config(featstore)))


@beta.observable_source_asset(
    group_name="extraction",
    automation_condition=OBSERVE,
    description="What encoding depends on besides the tokens: model, SAE release and ids, "
    "hooks, layers.",
)
def encoder_config(featstore: FeatstoreResource) -> dg.DataVersion:
    return dg.DataVersion(digest(encoder_settings(featstore)))


@beta.single_run_asset(
    partitions_def=shard_partitions,
    deps=[tokenizer_config],
    code_version=EXTRACTION_VERSION,
    group_name="extraction",
    kinds={"zarr"},
)
def tokens(context: dg.AssetExecutionContext, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """Each text shard tokenised into [BOS] + (seq_len - 1) token sequences.

    `featstore.extract.tokenize_shard`: one row per (sequence, position), the rows every layer's
    activations of the shard share. Data version: code, source, sequence shape and the bytes
    of the text files (`pipelines.versions`).
    """
    store, cfg = featstore.open(), featstore.extract_config()
    for shard in context.partition_keys:
        n_tokens = tokenize_shard(store, cfg, shard)
        context.add_asset_metadata(
            {
                "tokens": n_tokens,
                "sequences": n_tokens // cfg.seq_len,
                "dagster/row_count": n_tokens,
                "path": dg.MetadataValue.path(store.location(spec.tokens_path(shard))),
            },
            partition_key=shard,
        )
    return dg.MaterializeResult(
        data_version=tokens_version(featstore, context.partition_keys, EXTRACTION_VERSION)
    )


@beta.single_run_asset(
    partitions_def=shard_layer_partitions,
    deps=[tokens, encoder_config],  # Dagster maps (shard, layer) to the shard's tokens
    automation_condition=dg.AutomationCondition.eager(),
    code_version=EXTRACTION_VERSION,
    group_name="extraction",
    kinds={"pytorch", "zarr"},
    **MODEL_STEP,
)
def activations(
    context: dg.AssetExecutionContext, featstore: FeatstoreResource
) -> dg.MaterializeResult:
    """Sparse SAE feature activations (tokens x d_sae, CSR) of one shard at one layer.

    `featstore.extract.extract_shard`: a run over several layers of a shard does one forward pass
    and encodes every layer from it. Data version: code, model, SAE release and ids, layers and
    the stored token tables (`pipelines.versions`).
    """
    store, cfg = featstore.open(), featstore.extract_config()
    by_shard = group_by_shard(shard_layer_partitions, context.partition_keys, LAYER)
    for shard, layer_keys in by_shard.items():
        layers = tuple(int(k) for k in layer_keys)
        report = extract_shard(store, cfg, shard, layers=layers, progress=context.log.info)
        context.log.info(report.summary())
        for layer in layers:
            context.add_asset_metadata(
                layer_metadata(store, report, layer),
                partition_key=multi_key(shard, **{LAYER: str(layer)}),
            )
    version = activations_version(featstore, store, by_shard, EXTRACTION_VERSION)
    return dg.MaterializeResult(data_version=version)


def layer_metadata(store: Store, report: ExtractReport, layer: int) -> dict[str, Any]:
    """One layer's slice of a shard's extraction report, for its partition in the UI."""
    meta = report.metadata()
    return {
        "tokens": meta["tokens"],
        "nonzeros": meta[f"nnz_layer_{layer}"],
        "l0": meta[f"l0_layer_{layer}"],
        "tokens_per_second": meta["tokens_per_second"],
        "seconds": meta["seconds"],
        "layers_in_forward_pass": len(report.nnz),
        "dagster/row_count": meta["tokens"],
        "path": dg.MetadataValue.path(store.location(spec.activation_path(layer, report.shard))),
    }
