"""The `causal_edges` table of a store and its comparison with the correlation graph.

For each source layer L: attribution estimates for every (active feature, later feature) pair,
then exact patching (`featstore.patching`) of the `n_exact` source features with the strongest
estimates (all active ones by default), over the first `max_sequences` sequences of each shard.

Columns (one row per tested pair with `n_tokens > 0`): `mean_effect` = mean over the `n_tokens`
tokens where i is active of f_j(patched) - f_j(clean); `relative_effect` = that / the mean
activation of j where j is active (clean, whole shards); `share_off` = n_off / n_clean_on (tokens
where j was on); `share_on` = n_on / (n_tokens - n_clean_on) (tokens where j was off);
`total_effect` = change of f_j summed over every position of the patched sequences, per patched
token; `attribution` = its first-order estimate (null where i was not patched exactly: then
only attribution is known and `mean_effect` is null). A pair is a causal edge when
|relative_effect| >= min_effect over at least `min_tokens` tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from featstore.analysis.patching import (
    AttributionSums,
    EffectSums,
    PatchConfig,
    attribution_sums,
    effect_sums,
)
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.sequences import stacked_codes, store_sequences
from featstore.stats.measures import above
from featstore.stats.query import pair_stats_path
from featstore.stats.shardsums import merged_feature_stats
from featstore.store import spec
from featstore.store.local import Store
from featstore.store.sql import CAUSAL_EDGES_SCHEMA

COMPARISON_FILE = "comparison.parquet"
SCHEMA = pl.from_arrow(CAUSAL_EDGES_SCHEMA.empty_table()).schema


@dataclass(frozen=True)
class CausalConfig:
    """What to patch and when a patching effect counts as a causal edge."""

    layers: tuple[int, ...] = (6, 7, 8, 9)
    shards: tuple[str, ...] | None = None  # default: every shard of the first layer
    max_sequences: int | None = 16  # per shard; None: all
    features: tuple[int, ...] | None = None  # source features considered; None: all active
    n_exact: int | None = None  # per source layer, patched exactly; None: all considered
    value: float = 0.0  # 0 ablates; else clamp
    batch_rows: int = 64
    min_effect: float = 0.1  # |relative_effect| of a causal edge
    min_tokens: int = 5
    min_pearson: float = 0.2  # a correlation-graph edge
    keep_effect: float = 0.05  # rows saved: |relative effect or attribution| >= this, or a switch

    def __post_init__(self) -> None:
        if len(set(self.layers)) < 2:
            raise FeatstoreError(f"causal edges need at least two layers, got {list(self.layers)}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise FeatstoreError(f"max_sequences must be positive, got {self.max_sequences}")
        if self.n_exact is not None and self.n_exact < 0:
            raise FeatstoreError(f"n_exact must be >= 0, got {self.n_exact}")


def causal_dir(store: Store) -> Path:
    return store.home / spec.CAUSAL_DIR


# -- computing ------------------------------------------------------------------------------------


def layer_effects(
    store: Store, model, saes: dict, cfg: CausalConfig, layer: int, shards: list[str]
) -> tuple[dict[int, EffectSums], dict[int, AttributionSums]]:
    """Attribution sums for the considered features of `layer`, exact sums for the strongest."""
    targets = tuple(t for t in sorted(cfg.layers) if t > layer)
    alive = np.flatnonzero(merged_feature_stats(store, layer, shards).count > 0)
    if cfg.features is not None:
        alive = np.intersect1d(alive, cfg.features)
    base = PatchConfig(layer, targets, tuple(alive.tolist()), cfg.value, cfg.batch_rows)
    sequences = store_sequences(store, shards, cfg.max_sequences)
    codes = stacked_codes(store, layer, shards, sequences)
    tokens = np.concatenate(sequences)
    attr = attribution_sums(model, saes, tokens, codes, base)
    chosen = strongest_sources(attr, mean_active(store, targets, shards), cfg.n_exact)
    exact_cfg = PatchConfig(layer, targets, tuple(chosen.tolist()), cfg.value, cfg.batch_rows)
    return effect_sums(model, saes, tokens, codes, exact_cfg), attr


def mean_active(store: Store, layers, shards: list[str]) -> dict[int, np.ndarray]:
    """Per layer: each feature's mean activation over the tokens where it is active."""
    out = {}
    for layer in layers:
        stats = merged_feature_stats(store, layer, shards)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[layer] = stats.total / stats.count
    return out


def strongest_sources(
    attr: dict[int, AttributionSums], scale: dict[int, np.ndarray], n: int | None
) -> np.ndarray:
    """The `n` source features with the largest relative attribution on any later feature."""
    first = next(iter(attr.values()))
    if n is None or n >= len(first.features):
        return first.features
    with np.errstate(invalid="ignore", divide="ignore"):
        best = np.max(
            [
                np.nanmax(np.abs(a.total / a.n_tokens[:, None] / scale[t]), axis=1, initial=0.0)
                for t, a in attr.items()
            ],
            axis=0,
        )
    order = np.argsort(-np.nan_to_num(best, nan=-1.0), kind="stable")
    return np.sort(first.features[order[:n]])


def edge_frame(
    layer: int, target: int, exact: EffectSums, attr: AttributionSums, scale: np.ndarray
) -> pl.DataFrame:
    """Every pair of a tested or attributed source feature with `n_tokens > 0` (see module doc)."""
    n_f, d = attr.total.shape
    where = np.searchsorted(exact.features, attr.features)
    tested = np.isin(attr.features, exact.features)
    pick = np.where(tested, np.minimum(where, max(len(exact.features) - 1, 0)), 0)

    def exact_col(values: np.ndarray) -> np.ndarray:
        if not len(exact.features):
            return np.full((n_f, d), np.nan)
        return np.where(tested[:, None], values[pick].astype(np.float64), np.nan)

    n = attr.n_tokens[:, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = exact_col(exact.effect) / n
        on, off = exact_col(exact.n_on), exact_col(exact.n_off)
        n_on_before = exact_col(exact.n_clean_on)
        cols = {
            "layer_a": np.full(n_f * d, layer),
            "feature_a": np.repeat(attr.features, d),
            "layer_b": np.full(n_f * d, target),
            "feature_b": np.tile(np.arange(d), n_f),
            "n_tokens": np.repeat(attr.n_tokens, d),
            "exact": np.repeat(tested, d),
            "mean_effect": mean,
            "relative_effect": mean / scale[None, :],
            "n_clean_on": n_on_before,
            "n_off": off,
            "share_off": off / n_on_before,
            "n_on": on,
            "share_on": on / (n - n_on_before),
            "total_effect": exact_col(exact.total) / n,
            "attribution": attr.total / n,
            "relative_attribution": attr.total / n / scale[None, :],
        }
    frame = pl.DataFrame({k: np.ravel(v) for k, v in cols.items()}, nan_to_null=True)
    return frame.filter(pl.col("n_tokens") > 0).cast(SCHEMA)


def causal_edge_frame(store: Store, model, saes: dict, cfg: CausalConfig) -> pl.DataFrame:
    """All layer pairs' rows (unfiltered) for the configured layers and shards."""
    layers = sorted(set(cfg.layers))
    shards = list(cfg.shards or store.shards(layers[0]))
    if not shards:
        raise FeatstoreError(f"layer {layers[0]} has no activations in store {store.home}")
    scale = mean_active(store, layers, shards)
    parts = []
    for layer in layers[:-1]:
        exact, attr = layer_effects(store, model, saes, cfg, layer, shards)
        parts += [edge_frame(layer, t, exact[t], attr[t], scale[t]) for t in exact]
    return pl.concat(parts)


def is_causal(cfg: CausalConfig) -> pl.Expr:
    return (pl.col("relative_effect").abs() >= cfg.min_effect) & (
        pl.col("n_tokens") >= cfg.min_tokens
    )


def kept_rows(frame: pl.DataFrame, keep_effect: float) -> pl.DataFrame:
    """The rows worth saving: a noticeable effect or estimate, or a switch."""
    return frame.filter(
        (pl.col("relative_effect").abs() >= keep_effect)
        | (pl.col("relative_attribution").abs() >= keep_effect)
        | (pl.col("n_off") > 0)
        | (pl.col("n_on") > 0)
    )


# -- comparison with the correlation graph -------------------------------------------------------


def correlation_edges(store: Store, a: int, b: int, min_pearson: float) -> pl.DataFrame | None:
    """`feature_a, feature_b, pearson` of the pairs reaching `min_pearson`; None without stats."""
    path = pair_stats_path(store, a, b)
    if not path.exists():
        return None
    frame = pl.read_parquet(path, columns=["feature_a", "feature_b", "pearson"])
    return frame.filter(above("pearson", min_pearson)).cast(
        {"feature_a": pl.Int64, "feature_b": pl.Int64}
    )


def compare(
    frame: pl.DataFrame, corr: dict[tuple[int, int], pl.DataFrame | None], cfg: CausalConfig
) -> pl.DataFrame:
    """Per layer pair: correlation edges that are causal, causal edges the graph misses, and the
    agreement of attribution with exact patching (Pearson r of total effects)."""
    rows = []
    for (a, b), part in frame.group_by("layer_a", "layer_b", maintain_order=True):
        tested = part.filter(pl.col("exact"))
        causal = tested.filter(is_causal(cfg))
        row = {
            "layer_a": a,
            "layer_b": b,
            "tested_sources": tested["feature_a"].n_unique(),
            "tested_pairs": tested.height,
            "causal_edges": causal.height,
        }
        edges = corr.get((a, b))
        if edges is not None:
            sources = tested["feature_a"].unique()
            testable = edges.filter(pl.col("feature_a").is_in(sources.implode()))
            hit = testable.join(causal, on=["feature_a", "feature_b"], how="semi")
            missed = causal.join(edges, on=["feature_a", "feature_b"], how="anti")
            row |= {
                "correlation_edges": edges.height,
                "correlation_edges_tested": testable.height,
                "correlation_edges_causal": hit.height,
                "causal_edges_missed": missed.height,
            }
        pairs = tested.drop_nulls(["attribution", "total_effect"])
        row["attribution_r"] = (
            float(np.corrcoef(pairs["attribution"], pairs["total_effect"])[0, 1])
            if pairs.height > 2
            else None
        )
        rows.append(row)
    counts = [
        "correlation_edges",
        "correlation_edges_tested",
        "correlation_edges_causal",
        "causal_edges_missed",
    ]
    out = pl.DataFrame(rows, infer_schema_length=None)
    out = out.with_columns(*[pl.lit(None, pl.Int64).alias(c) for c in counts if c not in out])
    return out.with_columns(
        share_of_correlation_causal=pl.col("correlation_edges_causal")
        / pl.col("correlation_edges_tested"),
        share_of_causal_missed=pl.col("causal_edges_missed") / pl.col("causal_edges"),
    ).sort("layer_a", "layer_b")


def run_causal(store: Store, model, saes: dict, cfg: CausalConfig) -> dict[str, Path]:
    """Compute, save (`causal/`: edges, comparison, two PNGs) and return the paths."""
    from featstore.analysis.causal_plots import plot_attribution, plot_comparison

    frame = causal_edge_frame(store, model, saes, cfg)
    pairs = itertools.combinations(sorted(set(cfg.layers)), 2)
    corr = {(a, b): correlation_edges(store, a, b, cfg.min_pearson) for a, b in pairs}
    comparison = compare(frame, corr, cfg)
    folder = causal_dir(store)
    return {
        "edges": write_parquet_atomic(
            kept_rows(frame, cfg.keep_effect), folder / spec.CAUSAL_EDGES_FILE
        ),
        "comparison": write_parquet_atomic(comparison, folder / COMPARISON_FILE),
        "comparison_plot": plot_comparison(
            frame, comparison, corr, cfg, folder / "causal_vs_correlation.png"
        ),
        "attribution_plot": plot_attribution(frame, folder / "attribution_vs_exact.png"),
    }
