"""Causal assets: patching effects vs the correlation graph, concept traces, erasure."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.
from pathlib import Path

import dagster as dg
import polars as pl

from featstore import settings
from featstore.analysis.asked import EdgeChoice
from featstore.analysis.cards import parse_key
from featstore.analysis.causal import CausalConfig, causal_dir, run_causal
from featstore.analysis.concepts import default_set, run_concepts
from featstore.analysis.erasure import run_erasure
from featstore.analysis.graph import graph_settings, read_edges
from featstore.analysis.steering import SteerConfig, run_steering
from featstore.errors import FeatstoreError
from featstore.sources.extract import load_model_and_saes
from featstore.store.spec import CONCEPTS_DIR, ERASURE_DIR
from pipelines.assets.extraction import activations
from pipelines.assets.statistics import GRAPH_DIR, feature_graph, inline_png, markdown, pair_stats
from pipelines.execution import MODEL_STEP
from pipelines.resources import FeatstoreResource

CAUSAL_VERSION = "2"


# The library's defaults, named once (EdgeChoice, CausalConfig); the asset only exposes them.
_EDGES = settings.defaults(EdgeChoice)
_CAUSAL = settings.defaults(CausalConfig)


class CausalEdgesConfig(dg.Config):
    max_sequences: int = _CAUSAL["max_sequences"]  # per shard
    sample: str = _EDGES["sample"]  # graph: the correlation graph's edges; bins: by bins
    max_edges: int | None = _EDGES["max_edges"]  # graph: at most this many per layer pair
    measure: str = _EDGES["measure"]  # bins: the binned measure
    bins: list[float] | None = None  # bins: the bin edges; None: EdgeChoice's
    per_bin: int = _EDGES["per_bin"]  # bins: pairs per bin
    random_pairs: int = _EDGES["random_pairs"]  # random control pairs per layer pair
    attribution: bool = _CAUSAL["attribution"]  # also the first-order estimate of each edge
    value: float = _CAUSAL["value"]  # 0 ablates; another value clamps
    min_effect: float = _CAUSAL["min_effect"]  # |relative effect| of a causal edge
    min_tokens: int = _CAUSAL["min_tokens"]


class ConceptTracesConfig(dg.Config):
    concept_set: str | None = None  # a set in concepts/ or a YAML path; None: the source's
    max_sequences: int | None = None  # per shard
    top: int = 5
    beam: int = 3


class ErasureConfig(dg.Config):
    max_sequences: int = 32  # per shard


def read_graph(featstore: FeatstoreResource) -> pl.LazyFrame:
    """The feature graph's edge table, lazily (its consumers filter it before reading)."""
    folder = featstore.home_path() / GRAPH_DIR
    try:
        return read_edges(folder)
    except FeatstoreError:
        raise FeatstoreError(f"no feature graph in {folder}: materialise feature_graph") from None


def files_metadata(paths: dict[str, Path]) -> dict:
    """PNGs inline, everything else as a path."""
    return {
        name: inline_png(p) if p.suffix == ".png" else dg.MetadataValue.path(str(p))
        for name, p in paths.items()
    }


@dg.asset(
    deps=[pair_stats, feature_graph],
    code_version=CAUSAL_VERSION,
    group_name="causal",
    kinds={"pytorch", "parquet"},
    **MODEL_STEP,  # loads the model, as extraction
)
def causal_edges(
    context: dg.AssetExecutionContext, config: CausalEdgesConfig, featstore: FeatstoreResource
) -> dg.MaterializeResult:
    """Effect of ablating the source feature of each asked edge on its target (exact patching,
    and its attribution-patching estimate): every correlation-graph edge (`sample: graph`) or
    pairs stratified by a measure's bins (`sample: bins`, with the ablation effect per bin),
    plus random control pairs, compared with the correlation graph.

    `featstore.causal.run_causal`: `{home}/causal/causal_edges.parquet` (the `causal_edges` table
    of `featstore sql`), `comparison.parquet` and two PNGs.
    """
    store = featstore.open()
    read_graph(featstore)  # a missing graph is one line
    threshold = graph_settings(featstore.home_path() / GRAPH_DIR)["threshold"]
    choice = settings.of(EdgeChoice, config, min_pearson=float(threshold))
    cfg = settings.of(CausalConfig, config, layers=tuple(featstore.layers), edges=choice)
    model, saes = load_model_and_saes(featstore.extract_config())
    paths = run_causal(store, model, saes, cfg, progress=context.log.info)
    comparison = pl.read_parquet(paths["comparison"])
    tables = {"comparison": dg.MetadataValue.md(markdown(comparison))}
    if "ablation_by_bin" in paths:
        bins = pl.read_parquet(paths["ablation_by_bin"])
        tables["ablation_by_bin"] = dg.MetadataValue.md(markdown(bins))
    return dg.MaterializeResult(
        metadata={
            **tables,
            "folder": dg.MetadataValue.path(str(causal_dir(store))),
            **files_metadata(paths),
        }
    )


@dg.asset(
    deps=[feature_graph],
    code_version=CAUSAL_VERSION,
    group_name="causal",
    kinds={"polars", "matplotlib"},
)
def concept_traces(
    config: ConceptTracesConfig, featstore: FeatstoreResource
) -> dg.MaterializeResult:
    """The features that detect each concept of a concept set best (AUROC, precision/recall),
    per layer, and the concept's path through the layers along the feature graph.

    `featstore.concepts.run_concepts`: tables and one PNG per concept under `{home}/concepts/`.
    """
    store = featstore.open()
    concept_set = config.concept_set or default_set(featstore.source)
    paths = run_concepts(
        store,
        concept_set,
        featstore.layers,
        read_graph(featstore),
        featstore.home_path() / CONCEPTS_DIR,
        max_sequences=config.max_sequences,
        top=config.top,
        beam=config.beam,
    )
    best = pl.read_parquet(paths["best_features"]).filter(pl.col("rank") == 1)
    return dg.MaterializeResult(
        metadata={
            "concept_set": concept_set,
            "best_feature_per_layer": dg.MetadataValue.md(
                markdown(best.select("concept", "layer", "feature", "auroc", "f1"))
            ),
            **files_metadata(paths),
        }
    )


@dg.asset(
    deps=[feature_graph],
    code_version=CAUSAL_VERSION,
    group_name="causal",
    kinds={"pytorch", "matplotlib"},
    **MODEL_STEP,  # loads the model, as extraction
)
def erasure(config: ErasureConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """Which attention heads and MLP of block L lower the features of L with no successor at
    L+1 and which write the new features of L+1; and each feature's best Pearson and decoder
    cosine 1-3 layers on (the gradual-change conjecture).

    `featstore.erasure.run_erasure`: tables and PNGs under `{home}/erasure/`.
    """
    store = featstore.open()
    model, saes = load_model_and_saes(featstore.extract_config())
    paths = run_erasure(
        store,
        model,
        saes,
        read_graph(featstore),
        featstore.layers,
        featstore.home_path() / ERASURE_DIR,
        max_sequences=config.max_sequences,
    )
    components = pl.read_parquet(paths["erasure_components"])
    return dg.MaterializeResult(
        metadata={"components": dg.MetadataValue.md(markdown(components)), **files_metadata(paths)}
    )


class SteeringConfig(dg.Config):
    features: list[str] = []  # LAYER:ID of one layer, e.g. ["7:123", "7:40"]
    k: float = 5.0  # clamp to k x the feature's mean activation where active
    targets: list[int] = []  # later layers whose features are reported
    top: int = 10
    max_sequences: int = 8  # per shard


@dg.asset(
    deps=[activations],
    code_version=CAUSAL_VERSION,
    group_name="causal",
    kinds={"pytorch", "parquet"},
    **MODEL_STEP,  # loads the model, as extraction
)
def steering(config: SteeringConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """Clamp each chosen feature to k x its typical activation over the sampled sequences: the
    KL divergence of the next-token distribution, the tokens gained and lost, and the later
    features that change most.

    `featstore.analysis.steering.run_steering`: `{home}/steering/{summary,tokens,features}.parquet`.
    """
    keys = [parse_key(k) for k in config.features]
    if len({layer for layer, _ in keys}) != 1:
        raise FeatstoreError(f"steering needs features of one layer, got {config.features}")
    cfg = SteerConfig(keys[0][0], tuple(f for _, f in keys), config.k, tuple(config.targets),
                      config.top)
    model, saes = load_model_and_saes(featstore.extract_config())
    paths = run_steering(featstore.open(), model, saes, cfg, config.max_sequences)
    return dg.MaterializeResult(
        metadata={
            "summary": dg.MetadataValue.md(markdown(pl.read_parquet(paths["summary"]))),
            **files_metadata(paths),
        }
    )


causal_assets = [causal_edges, concept_traces, erasure, steering]
