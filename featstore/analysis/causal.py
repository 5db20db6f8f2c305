"""The `causal_edges` table of a store and its comparison with the correlation graph.

For each source layer L and later layer L' with pair statistics (the whole pair table, or for the
graph sample the correlation graph's edges), the asked edges
(`featstore.analysis.asked`: the correlation graph's, or a sample stratified by a measure's bins,
plus random control pairs) are patched exactly (`featstore.analysis.patching`) and, optionally,
estimated by attribution patching, over the first `max_sequences` sequences of each shard. Cost
and memory grow with the asked edges, never with features x features.

Columns (one row per asked edge): `asked_by` (graph, bin, random), `pearson` of the pair (null:
never co-active; asked from the graph: not a graph edge), `bin` and `bin_value` (bins sample);
`n_tokens` = tokens where i is active (and patched); `mean_effect` = mean over them of
f_j(patched) - f_j(clean); `relative_effect` = that / the mean activation of j where j is active
(clean, whole shards); `share_off` = n_off / n_clean_on (tokens where j was on); `share_on` =
n_on / (n_tokens - n_clean_on) (tokens where j was off); `total_effect` = change of f_j summed over
every position of the patched sequences, per patched token; `attribution` = its first-order
estimate (null when not computed). A pair is a causal edge when |relative_effect| >= min_effect
over at least `min_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from featstore.analysis.asked import PAIR, EdgeChoice, asked_edges, pair_table
from featstore.analysis.attribution import edge_attribution
from featstore.analysis.patching import Edges, EdgeSums, PatchConfig, edge_effects
from featstore.defaults import CAUSAL_SEQUENCES, MIN_EFFECT
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.progress import Progress, say
from featstore.sequences import stacked_codes, store_sequences
from featstore.sources.registry import default_layers
from featstore.stats.shardsums import merged_feature_stats
from featstore.store import spec
from featstore.store.local import Store
from featstore.store.sql import CAUSAL_EDGES_SCHEMA

COMPARISON_FILE = "comparison.parquet"
BINS_FILE = "ablation_by_bin.parquet"
SCHEMA = pl.from_arrow(CAUSAL_EDGES_SCHEMA.empty_table()).schema


@dataclass(frozen=True)
class CausalConfig:
    """What to patch and when a patching effect counts as a causal edge."""

    layers: tuple[int, ...] = field(default_factory=default_layers)
    shards: tuple[str, ...] | None = None  # default: every shard of the first layer
    max_sequences: int | None = CAUSAL_SEQUENCES  # per shard; None: all
    features: tuple[int, ...] | None = None  # source features considered; None: all asked
    edges: EdgeChoice = field(default_factory=EdgeChoice)
    attribution: bool = True  # also the first-order estimate of each asked edge
    value: float = 0.0  # 0 ablates; else clamp
    batch_rows: int = 64
    min_effect: float = MIN_EFFECT  # |relative_effect| of a causal edge
    min_tokens: int = 5

    def __post_init__(self) -> None:
        if len(set(self.layers)) < 2:
            raise FeatstoreError(f"causal edges need at least two layers, got {list(self.layers)}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise FeatstoreError(f"max_sequences must be positive, got {self.max_sequences}")
        if self.min_tokens < 1:
            raise FeatstoreError(f"min_tokens must be positive, got {self.min_tokens}")


def causal_dir(store: Store) -> Path:
    return store.home / spec.CAUSAL_DIR


# -- computing ------------------------------------------------------------------------------------


def mean_active(store: Store, layers, shards: list[str]) -> dict[int, np.ndarray]:
    """Per layer: each feature's mean activation over the tokens where it is active."""
    out = {}
    for layer in layers:
        stats = merged_feature_stats(store, layer, shards)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[layer] = stats.total / stats.count
    return out


def layer_frames(
    store: Store,
    model,
    saes: dict,
    cfg: CausalConfig,
    layer: int,
    shards: list[str],
    scale: dict,
    progress: Progress | None = None,
) -> list[pl.DataFrame]:
    """The rows of every asked edge from `layer` to each later layer with pair statistics."""
    sources = None if cfg.features is None else np.asarray(cfg.features, np.int64)
    asked = {}
    for t in (t for t in sorted(set(cfg.layers)) if t > layer):
        frame = asked_edges(store, layer, t, saes[t].cfg.d_sae, cfg.edges, sources)
        if frame is not None and frame.height:
            asked[t] = frame.sort(PAIR)
    if not asked:
        return []
    edges = [Edges.of(t, f["feature_a"].to_numpy(), f["feature_b"].to_numpy()) for t, f in
             asked.items()]
    sequences = store_sequences(store, shards, cfg.max_sequences)
    codes = stacked_codes(store, layer, shards, sequences)
    tokens = np.concatenate(sequences)
    patch = PatchConfig(layer, cfg.value, cfg.batch_rows)
    say(progress, f"causal edges from layer {layer}: {sum(map(len, edges))} edges asked, "
        f"{len(sequences)} sequences")  # fmt: skip
    sums = edge_effects(model, saes, tokens, codes, patch, edges, progress)
    attr = (edge_attribution(model, saes, tokens, codes, patch, edges, progress=progress)
            if cfg.attribution else [None] * len(edges))
    return [
        edge_frame(layer, e.target, asked[e.target], s, at, scale[e.target][e.feature_b])
        for e, s, at in zip(edges, sums, attr, strict=True)
    ]


def edge_frame(
    layer: int,
    target: int,
    asked: pl.DataFrame, s: EdgeSums, attr: np.ndarray | None, scale: np.ndarray
) -> pl.DataFrame:
    """The asked rows (sorted by pair, as `Edges`) with their effects (see the module doc)."""
    n = s.n_tokens.astype(np.float64)
    total = np.full(len(n), np.nan) if attr is None else attr
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s.effect / n
        cols = {
            "layer_a": layer,
            "layer_b": target,
            "n_tokens": s.n_tokens,
            "mean_effect": mean,
            "relative_effect": mean / scale,
            "n_clean_on": s.n_clean_on,
            "n_off": s.n_off,
            "share_off": s.n_off / s.n_clean_on,
            "n_on": s.n_on,
            "share_on": s.n_on / (n - s.n_clean_on),
            "total_effect": s.total / n,
            "attribution": total / n,
            "relative_attribution": total / n / scale,
        }
    frame = asked.with_columns(
        pl.Series(k, v, nan_to_null=True) if isinstance(v, np.ndarray) else pl.lit(v).alias(k)
        for k, v in cols.items()
    )
    return frame.select(SCHEMA.names()).cast(SCHEMA)


def causal_edge_frame(
    store: Store, model, saes: dict, cfg: CausalConfig, progress: Progress | None = None
) -> pl.DataFrame:
    """All layer pairs' rows for the configured layers and shards (`progress` hears each
    source layer and the patched rows)."""
    layers = sorted(set(cfg.layers))
    shards = list(cfg.shards or store.shards(layers[0]))
    if not shards:
        raise FeatstoreError(f"layer {layers[0]} has no activations in store {store.home}")
    if not any(pair_table(store, a, b, cfg.edges) is not None
               for a in layers for b in layers if b > a):  # fmt: skip
        raise FeatstoreError(
            f"no layer pair of layers {layers} has a pair table (featstore stats, no threshold)"
            + (" or a Pearson graph at <= the asked Pearson (featstore graph)"
               if cfg.edges.sample == "graph" else "") + ": no edge to ask"  # fmt: skip
        )
    scale = mean_active(store, layers, shards)
    parts = [
        f
        for layer in layers[:-1]
        for f in layer_frames(store, model, saes, cfg, layer, shards, scale, progress)
    ]
    return pl.concat(parts) if parts else SCHEMA.to_frame()


def tested(cfg: CausalConfig) -> pl.Expr:
    return pl.col("n_tokens") >= cfg.min_tokens


def is_causal(cfg: CausalConfig) -> pl.Expr:
    return tested(cfg) & (pl.col("relative_effect").abs() >= cfg.min_effect)


# -- comparison with the correlation graph -------------------------------------------------------


def compare(frame: pl.DataFrame, cfg: CausalConfig) -> pl.DataFrame:
    """Per layer pair, among the measured pairs (source active on >= min_tokens tokens): graph
    edges that are causal, causal edges the graph misses, the rate of causal edges among random
    pairs, and the agreement of attribution with exact patching (Pearson r of total effects)."""
    in_graph = pl.col("pearson").fill_null(-1.0) >= cfg.edges.min_pearson
    random = pl.col("asked_by") == "random"
    both = tested(cfg) & pl.col("attribution").is_not_null()
    r = pl.corr(pl.col("attribution").filter(both), pl.col("total_effect").filter(both))
    out = frame.group_by("layer_a", "layer_b").agg(
        asked_pairs=pl.len(),
        correlation_edges_asked=(pl.col("asked_by") == "graph").sum(),
        tested_sources=pl.col("feature_a").filter(tested(cfg)).n_unique(),
        tested_pairs=tested(cfg).sum(),
        causal_edges=is_causal(cfg).sum(),
        correlation_edges_tested=(tested(cfg) & in_graph).sum(),
        correlation_edges_causal=(is_causal(cfg) & in_graph).sum(),
        causal_edges_missed=(is_causal(cfg) & ~in_graph).sum(),
        random_pairs_tested=(tested(cfg) & random).sum(),
        random_pairs_causal=(is_causal(cfg) & random).sum(),
        attribution_r=pl.when(both.sum() > 2).then(r),
    )
    return out.with_columns(
        share_of_correlation_causal=pl.col("correlation_edges_causal")
        / pl.col("correlation_edges_tested"),
        share_of_causal_missed=pl.col("causal_edges_missed") / pl.col("causal_edges"),
        share_of_random_causal=pl.col("random_pairs_causal") / pl.col("random_pairs_tested"),
    ).fill_nan(None).sort("layer_a", "layer_b")


def ablation_by_bin(frame: pl.DataFrame, cfg: CausalConfig) -> pl.DataFrame:
    """Per layer pair and bin of the binned measure: the measured pairs' mean |relative effect|
    and share of causal edges, each with its standard error."""
    bins = np.asarray(cfg.edges.bins)
    effect = pl.col("relative_effect").abs()
    part = frame.filter((pl.col("asked_by") == "bin") & tested(cfg))
    out = part.group_by("layer_a", "layer_b", "bin").agg(
        pairs=pl.len(),
        mean_abs_effect=effect.mean(),
        sem_abs_effect=effect.std() / pl.len().sqrt(),
        share_causal=is_causal(cfg).mean(),
    )
    edges = pl.DataFrame(
        {"bin": np.arange(len(bins) - 1, dtype=np.int32), "lo": bins[:-1], "hi": bins[1:]}
    )
    share = pl.col("share_causal")
    return out.join(edges, on="bin").with_columns(
        sem_share_causal=(share * (1 - share) / pl.col("pairs")).sqrt(),
        measure=pl.lit(cfg.edges.measure),
    ).sort("layer_a", "layer_b", "bin")


def run_causal(
    store: Store, model, saes: dict, cfg: CausalConfig, progress: Progress | None = None
) -> dict[str, Path]:
    """Compute, save (`causal/`: edges, comparison, ablation by bin, PNGs) and return the paths."""
    from featstore.analysis.causal_plots import plot_attribution, plot_bins, plot_comparison

    frame = causal_edge_frame(store, model, saes, cfg, progress)
    comparison = compare(frame, cfg)
    folder = causal_dir(store)
    paths = {
        "edges": write_parquet_atomic(frame, folder / spec.CAUSAL_EDGES_FILE),
        "comparison": write_parquet_atomic(comparison, folder / COMPARISON_FILE),
        "comparison_plot": plot_comparison(
            frame, comparison, cfg, folder / "causal_vs_correlation.png"
        ),
        "attribution_plot": plot_attribution(frame, folder / "attribution_vs_exact.png"),
    }
    if cfg.edges.sample == "bins":
        bins = ablation_by_bin(frame, cfg)
        paths["ablation_by_bin"] = write_parquet_atomic(bins, folder / BINS_FILE)
        paths["ablation_by_bin_plot"] = plot_bins(bins, cfg, folder / "ablation_by_bin.png")
    return paths
