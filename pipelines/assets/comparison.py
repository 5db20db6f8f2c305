"""Comparison assets: every measure and method compared on the same tokens, and feature cards."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.
from typing import Any

import dagster as dg
import polars as pl

from featstore import settings
from featstore.analysis.cards import busiest_features, write_cards
from featstore.analysis.compare import CompareConfig, run_comparison
from featstore.analysis.graph import EDGES
from featstore.analysis.logits import store_logit_effects, write_logit_effects
from featstore.defaults import (
    DECODER_K,
    DEFAULT_ENGINE,
    EDGE_THRESHOLD,
    EXPLORER_URL,
    MEASURE_THRESHOLDS,
    MIN_BOTH,
)
from featstore.errors import FeatstoreError
from featstore.store.spec import CARDS_DIR, COMPARISON_DIR
from pipelines.assets.extraction import activations, encoder_config
from pipelines.assets.statistics import GRAPH_DIR, feature_graph, inline_png, markdown, pair_stats
from pipelines.resources import FeatstoreResource

COMPARISON_VERSION = "1"


class MethodComparisonConfig(dg.Config):
    thresholds: dict[str, float] = dict(MEASURE_THRESHOLDS)  # data measure -> its threshold
    min_both: int = MIN_BOTH  # pairs co-active on fewer tokens are no candidates
    distances: list[int] = [1, 2, 3]  # layer gaps of the best-match score distributions
    null_quantile: float = 0.95  # null-corrected threshold: this quantile of null best scores
    decoder_k: int = DECODER_K  # decoder cosines kept per feature (0: no decoder_cosine method)
    community_metric: str = "pearson"
    community_threshold: float = EDGE_THRESHOLD
    seed: int = 0  # Louvain's
    engine: str = DEFAULT_ENGINE


class FeatureCardsConfig(dg.Config):
    n_features: int = 50  # the graph's busiest features (most edges) get a page
    top: int = 10  # top-activating contexts per page
    partners: int = 10  # predecessors and successors per page
    sort_by: str = "pearson"
    min_both: int = MIN_BOTH
    explorer_url: str = EXPLORER_URL  # where `featstore serve` runs: cards link there


class LogitEffectsConfig(dg.Config):
    k: int = 10  # promoted and suppressed tokens kept per feature


@dg.asset(
    deps=[pair_stats, feature_graph],
    code_version=COMPARISON_VERSION,
    group_name="comparison",
    kinds={"polars", "networkx", "matplotlib"},
)
def method_comparison(
    context: dg.AssetExecutionContext, config: MethodComparisonConfig, featstore: FeatstoreResource
) -> dg.MaterializeResult:
    """Cross-layer measures and methods compared on the same tokens and SAEs.

    `featstore.compare.run_comparison`: each feature's best successor under every measure, the
    decoder cosine and (when `{home}/causal/` holds patching effects) the causal effect; their
    agreement and Spearman correlation; pairs above threshold in the data and in the null model
    (later layer's sequences deranged); features "from nowhere" with and without the null
    correction; best-match scores by layer distance; Louvain communities. Files under
    `{home}/comparison/`.
    """
    cfg = settings.of(
        CompareConfig, config, layers=tuple(featstore.layers), distances=tuple(config.distances)
    )
    out = featstore.home_path() / COMPARISON_DIR
    result, paths = run_comparison(featstore.open(), cfg, out, progress=context.log.info)
    metadata: dict[str, Any] = {
        name: inline_png(path) for name, path in paths.items() if path.suffix == ".png"
    }
    for name in ("agreement", "null_counts", "from_nowhere"):
        metadata[name] = dg.MetadataValue.md(markdown(getattr(result, name)))
    sizes = result.communities.select("community", "size", "layers", "per_layer").head(20)
    metadata["communities"] = dg.MetadataValue.md(markdown(sizes))
    metadata["notes"] = dg.MetadataValue.json(result.notes)
    metadata["folder"] = dg.MetadataValue.path(str(out))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[encoder_config, activations],
    code_version=COMPARISON_VERSION,
    group_name="comparison",
    kinds={"torch", "parquet"},
)
def logit_effects(config: LogitEffectsConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """What each feature's decoder direction does to the next-token logits, directly.

    `featstore.analysis.logits`: W_dec through the final LayerNorm's centring and scale and the
    unembedding, the k most promoted and most suppressed tokens of every feature of every
    layer; `{home}/logits/logit_effects.parquet`, the `logit_effects` SQL table, shown in the
    cards and in `featstore serve`.
    """
    store = featstore.open()
    frame = store_logit_effects(store, store.layers(), k=config.k)
    path = write_logit_effects(store, frame)
    first = frame.filter((pl.col("layer") == frame["layer"].min()) & (pl.col("feature") == 0))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "path": dg.MetadataValue.path(str(path)),
            "first_feature": dg.MetadataValue.md(markdown(first)),
        }
    )


@dg.asset(
    deps=[feature_graph, logit_effects],
    code_version=COMPARISON_VERSION,
    group_name="comparison",
    kinds={"html"},
)
def feature_cards(
    context: dg.AssetExecutionContext, config: FeatureCardsConfig, featstore: FeatstoreResource
) -> dg.MaterializeResult:
    """A static HTML page per busiest feature of the graph (most edges), linked to each other.

    `featstore.cards.write_cards`: activation frequency and mean, top-activating contexts, and
    predecessors and successors with every measure and their 95% intervals, logit effects; the
    pages open in a browser without a server. Files under `{home}/cards/`; `urls` gives each
    card's page in the explorer (`featstore serve`, at `explorer_url`).
    """
    edges_path = featstore.home_path() / GRAPH_DIR / EDGES
    if not edges_path.exists():
        raise FeatstoreError(f"no graph edges at {edges_path}: materialise feature_graph")
    keys = busiest_features(pl.scan_parquet(edges_path), config.n_features)
    out = featstore.home_path() / CARDS_DIR
    paths = write_cards(
        featstore.open(),
        keys,
        out,
        top=config.top,
        partners=config.partners,
        sort_by=config.sort_by,
        min_both=config.min_both,
        progress=context.log.info,
    )
    return dg.MaterializeResult(
        metadata={
            "pages": len(keys),
            "features": dg.MetadataValue.json([f"L{layer}:{f}" for layer, f in keys]),
            "index": dg.MetadataValue.path(str(paths[0])),
            "urls": dg.MetadataValue.md(
                "\n".join(
                    f"- [L{layer}:{f}]({config.explorer_url.rstrip('/')}/features/{layer}/{f})"
                    for layer, f in keys
                )
            ),
        }
    )


comparison_assets = [method_comparison, logit_effects, feature_cards]
