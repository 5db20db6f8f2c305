"""Statistics assets: per-shard pair sums -> merged pair statistics -> feature graph -> plots."""

# No `from __future__ import annotations`: Dagster reads the context, config and resource
# annotations at definition time and needs the real classes, not strings.
import base64
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from featstore.analysis import graph as fgraph
from featstore.analysis import plots as fplots
from featstore.defaults import (
    AGREEMENT_THRESHOLD,
    DEFAULT_ENGINE,
    EDGE_THRESHOLD,
    GRAPHML_MAX_EDGES,
)
from featstore.stats.allpairs import in_one_pass
from featstore.stats.query import PairQuery, save_pair_table
from featstore.stats.shardsums import check_shard, update_shard_pairs
from featstore.store.spec import GRAPH_DIR, PLOTS_DIR
from pipelines import beta
from pipelines.assets.extraction import activations
from pipelines.partitions import (
    PAIR,
    group_by_shard,
    layers_to_pairs,
    multi_key,
    pair_partitions,
    parse_pair,
    shard_pair_partitions,
)
from pipelines.resources import FeatstoreResource

STATISTICS_VERSION = "1"
EAGER = dg.AutomationCondition.eager()


class PairSumsConfig(dg.Config):
    engine: str = DEFAULT_ENGINE  # featstore.defaults.ENGINES: the same sums, computed apart


class GraphConfig(PairSumsConfig):
    metric: str = "pearson"  # an edge needs metric >= threshold
    threshold: float = EDGE_THRESHOLD
    graphml_max_edges: int = GRAPHML_MAX_EDGES  # GraphML: the strongest edges (Parquet: all)


class PlotsConfig(PairSumsConfig):
    threshold: float = EDGE_THRESHOLD  # Pearson's and Jaccard's bar (the graph's default)
    agreement_threshold: float = AGREEMENT_THRESHOLD
    first_feature: int = 0  # the heatmap shows features [first, first + n_features)
    n_features: int = 100
    n_edges: int = 60  # strongest edges in the layered drawing


class ShardPairsConfig(PairSumsConfig):
    # Keep each shard's pair sums, so pair_stats skips that shard later: a cache that costs tens
    # of times the activations' size (docs/SCALING.md). Off: the shard is only checked.
    keep_sums: bool = False


@beta.single_run_asset(
    partitions_def=shard_pair_partitions,
    deps=[dg.AssetDep(activations, partition_mapping=layers_to_pairs())],
    automation_condition=EAGER,
    code_version=STATISTICS_VERSION,
    group_name="statistics",
    kinds={"scipy", "zarr"},
)
def shard_pair_stats(
    context: dg.AssetExecutionContext, config: ShardPairsConfig, featstore: FeatstoreResource
) -> None:
    """One shard's layer pair, the unit of incremental recomputation: both layers checked to
    hold the shard on the same tokens; with `keep_sums`, its pair sums (co-activation counts and
    sums of products of every co-active pair) saved at `pairs/{a}-{b}/{shard}`
    (`featstore.stats.shardsums.update_shard_pairs`), so pair_stats reads them instead.

    Off by default: no pair state grows with the shards; pair_stats computes every shard's sums
    in memory, with the same result bit for bit.
    """
    store = featstore.open()
    by_shard = group_by_shard(shard_pair_partitions, context.partition_keys, PAIR)
    for shard, pairs in by_shard.items():
        for pair in pairs:
            a, b = parse_pair(pair)
            start = time.perf_counter()
            if config.keep_sums:
                counts = update_shard_pairs(store, a, b, shard, config.engine)
                metadata = {"tokens": counts.n_tokens, "co_active_pairs": counts.nnz}
            else:
                metadata = {"tokens": check_shard(store, a, b, shard)[0]}
            context.log.info(
                f"pair {pair} of {shard}: {metadata} ({time.perf_counter() - start:.0f}s)"
            )
            context.add_asset_metadata(
                {**metadata, "sums_kept": config.keep_sums},
                partition_key=multi_key(shard, **{PAIR: pair}),
            )


@beta.single_run_asset(
    partitions_def=pair_partitions,
    deps=[shard_pair_stats],  # Dagster maps a pair to that pair of every shard on its own
    automation_condition=EAGER,
    code_version=STATISTICS_VERSION,
    group_name="statistics",
    kinds={"polars", "parquet"},
)
def pair_stats(
    context: dg.AssetExecutionContext, config: PairSumsConfig, featstore: FeatstoreResource
) -> None:
    """Every measure of each co-active feature pair, merged over all shards.

    `featstore.stats.query.save_pair_table` of the whole table (`PairQuery`), every pair of the
    run in one pass over the shards (`featstore.stats.allpairs.in_one_pass`): saved as
    `{home}/pair_stats/{a}-{b}.parquet`, the `pair_stats` table of `featstore sql`.
    """
    store = featstore.open()

    def save(a: int, b: int) -> None:
        # Streamed to disk: the table is never held.
        query = PairQuery.of(config, layer_a=a, layer_b=b)
        saved = save_pair_table(store, query, progress=context.log.info)
        context.add_asset_metadata(
            {
                "tokens": saved.n_tokens,
                "co_active_pairs": saved.rows,
                "bos": "included",  # the stored sums keep each sequence's first position
                "dagster/row_count": saved.rows,
                "top_pairs_by_pearson": dg.MetadataValue.md(markdown(saved.top)),
                "path": dg.MetadataValue.path(str(saved.path)),
            },
            partition_key=f"{a}-{b}",
        )

    in_one_pass(sorted(parse_pair(pair) for pair in context.partition_keys), save)


@dg.asset(
    deps=[pair_stats],
    automation_condition=EAGER,
    code_version=STATISTICS_VERSION,
    group_name="statistics",
    kinds={"parquet"},
)
def feature_graph(config: GraphConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """Directed graph of feature pairs of adjacent layers with metric >= threshold.

    `featstore.analysis.graph.export_graph`: a Parquet edge table (written block by block) and
    node table, summary.json and GraphML (the strongest `graphml_max_edges` edges at most) under
    `{home}/graph/`; metadata: edges per layer pair, degree distributions, share of active
    features with a successor in the next layer, what the GraphML file holds.
    """
    out = featstore.home_path() / GRAPH_DIR
    summary = fgraph.export_graph(
        featstore.open(),
        out,
        layers=featstore.layers,
        metric=config.metric,
        threshold=config.threshold,
        engine=config.engine,
        graphml_max_edges=config.graphml_max_edges,
    )
    return dg.MaterializeResult(
        metadata={
            "nodes": summary["nodes"],
            "edges": summary["edges"],
            "edges_per_pair": dg.MetadataValue.json(summary["edges_per_pair"]),
            "share_with_successor": dg.MetadataValue.json(
                {layer: s["share_of_active"] for layer, s in summary["successors"].items()}
            ),
            "out_degree": dg.MetadataValue.json(summary["out_degree"]),
            "in_degree": dg.MetadataValue.json(summary["in_degree"]),
            "graphml": dg.MetadataValue.path(str(out / fgraph.GRAPHML)),
            "graphml_max_edges": summary["graphml"]["max_edges"],
            "graphml_edges": summary["graphml"]["edges"],
            "edge_list": dg.MetadataValue.path(str(out / fgraph.EDGES)),
            "node_list": dg.MetadataValue.path(str(out / fgraph.NODES)),
        }
    )


@dg.asset(
    deps=[pair_stats, feature_graph],
    automation_condition=EAGER,
    code_version=STATISTICS_VERSION,
    group_name="statistics",
    kinds={"matplotlib"},
)
def plots(config: PlotsConfig, featstore: FeatstoreResource) -> dg.MaterializeResult:
    """PNG figures under `{home}/plots/`, each also shown inline here: a heatmap of a block of
    features per layer pair, co-occurrence histograms, pairs above threshold per layer pair, and
    a layered drawing of the strongest edges.

    `featstore.analysis.plots.plot_store`.
    """
    out = featstore.home_path() / PLOTS_DIR
    paths = fplots.plot_store(
        featstore.open(),
        out,
        layers=featstore.layers,
        threshold=config.threshold,
        agreement_threshold=config.agreement_threshold,
        features=(config.first_feature, config.first_feature + config.n_features),
        n_edges=config.n_edges,
        engine=config.engine,
    )
    metadata: dict[str, Any] = {path.stem: inline_png(path) for path in paths}
    metadata["folder"] = dg.MetadataValue.path(str(out))
    return dg.MaterializeResult(metadata=metadata)


def markdown(frame: pl.DataFrame) -> str:
    with pl.Config(
        tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True
    ):
        return str(frame)


def inline_png(path: Path) -> dg.MetadataValue:
    """A PNG as Markdown with a data URI, so the UI shows the picture itself."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{path.name}](data:image/png;base64,{data})")


statistics_assets = [shard_pair_stats, pair_stats, feature_graph, plots]
