"""Pass-through features: a feature of layer L and one of L+1 that are each other's best match
with Pearson >= 0.95 (spar-2024), linked into chains across the layers and drawn as a flow.

Each feature's best partner on both sides comes from one compiled pass per layer pair
(`featstore.stats.best.best_both`: two arrays per layer, no pair written out, never features x
features); a link is a pair that is each side's best (ties: the lower feature), with Pearson
>= the threshold, co-active on >= `MIN_BOTH` tokens (a single shared token gives two rare
features Pearson near 1 by chance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from featstore.defaults import MIN_BOTH
from featstore.figures import no_data, save
from featstore.files import write_parquet_atomic
from featstore.stats.best import best_both
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store.local import Store

MIN_PEARSON = 0.95  # spar-2024's pass-through threshold
LINK_SCHEMA = {
    "layer_a": pl.Int32,
    "feature_a": pl.Int32,
    "layer_b": pl.Int32,
    "feature_b": pl.Int32,
    "pearson": pl.Float64,
}


def mutual_links(a: int, b: int, sides: dict, min_pearson: float) -> pl.DataFrame:
    """The pairs of layers a, b that are each other's best (`best_both`'s `sides`) with
    Pearson >= `min_pearson`, as rows of `LINK_SCHEMA`."""
    (value_a, part_a), (_, part_b) = sides["a"], sides["b"]
    fa = np.flatnonzero((part_a >= 0) & (value_a >= min_pearson))
    fa = fa[part_b[part_a[fa]] == fa]
    return pl.DataFrame(
        {"layer_a": np.full(fa.size, a), "feature_a": fa, "layer_b": np.full(fa.size, b),
         "feature_b": part_a[fa], "pearson": value_a[fa]},
        schema=LINK_SCHEMA,
    )  # fmt: skip


def pass_through_links(
    store: Store,
    layers: Sequence[int],
    *,
    min_pearson: float = MIN_PEARSON,
    shards: Sequence[str] | None = None,
    variant: Variant | None = None,
    min_both: int = MIN_BOTH,
    best: Mapping[tuple[int, int], dict] | None = None,
) -> pl.DataFrame:
    """Per pair of successive layers: the mutual best matches with Pearson >= `min_pearson`;
    `best`: `best_both(..., "pearson", min_both=...)` of some layer pairs, already computed."""
    layers = sorted(layers)
    parts = [pl.DataFrame(schema=LINK_SCHEMA)]
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        sides = (best or {}).get((a, b)) or best_both(
            store, a, b, "pearson", min_both=min_both, shards=shards, variant=variant
        )
        parts.append(mutual_links(a, b, sides, min_pearson))
    return pl.concat(parts).sort("layer_a", "feature_a")


def chains(links: pl.DataFrame) -> pl.DataFrame:
    """Links joined into chains: chain id, its first layer and feature, length in layers, and
    one row per member (layer, feature)."""
    nxt = {(la, fa): (lb, fb) for la, fa, lb, fb in
           links.select("layer_a", "feature_a", "layer_b", "feature_b").iter_rows()}  # fmt: skip
    heads = sorted(set(nxt) - set(nxt.values()))
    rows = []
    for chain, node in enumerate(heads):
        members = [node]
        while members[-1] in nxt:
            members.append(nxt[members[-1]])
        rows += [(chain, *node, len(members), layer, f) for layer, f in members]
    cols = ["chain", "first_layer", "first_feature", "length", "layer", "feature"]
    return pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.Int64), orient="row")


def flow_counts(store: Store, layers: Sequence[int], links: pl.DataFrame, shards) -> pl.DataFrame:
    """Per layer: alive features, those passing through to the next layer and those arriving."""
    rows = []
    for layer in sorted(layers):
        chosen = list(shards or store.shards(layer))
        alive = int((merged_feature_stats(store, layer, chosen).count > 0).sum())
        out = links.filter(pl.col("layer_a") == layer).height
        into = links.filter(pl.col("layer_b") == layer).height
        rows.append((layer, alive, out, into))
    return pl.DataFrame(rows, schema=["layer", "alive", "passes_on", "arrives"], orient="row")


def flow_figure(counts: pl.DataFrame, links: pl.DataFrame, path: Path) -> Path:
    """A flow (Sankey-style) drawing: one bar per layer (alive features), bands for the
    pass-through links to the next layer, the rest of each bar grey."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    if counts.is_empty():
        no_data(fig, "no layers")
        return save(fig, path)
    ax = fig.add_subplot()
    layers = counts["layer"].to_list()
    top = max(counts["alive"].max(), 1)
    width = 0.18
    for x, row in enumerate(counts.iter_rows(named=True)):
        share = row["alive"] / top
        ax.bar(x, share, width, color="lightgrey", edgecolor="grey")
        ax.bar(x, row["arrives"] / top, width, color="tab:blue")
        ax.text(x, share + 0.02, f"{row['alive']} alive", ha="center", fontsize=8)
    for x, n_links in enumerate(counts["passes_on"][:-1]):
        h = n_links / top
        xs = np.linspace(x + width / 2, x + 1 - width / 2, 30)
        ax.fill_between(xs, 0, h, color="tab:blue", alpha=0.35, lw=0)
        ax.text(x + 0.5, h + 0.01, f"{n_links}", ha="center", fontsize=8, color="tab:blue")
    ax.set_xticks(range(len(layers)), [f"L{layer}" for layer in layers])
    ax.set_ylabel("share of the most alive layer's features")
    ax.set_title(f"pass-through features (mutual best match, Pearson >= {MIN_PEARSON}): "
                 f"{links.height} links")  # fmt: skip
    return save(fig, path)


def run_pass_through(
    store: Store, layers: Sequence[int], out: Path, *, shards: Sequence[str] | None = None,
    min_pearson: float = MIN_PEARSON, links: pl.DataFrame | None = None,
) -> dict[str, Path]:  # fmt: skip
    """Links (`pass_through_links`, unless given), chains, per-layer flow counts and the flow
    figure, written under `out`."""
    if links is None:
        links = pass_through_links(store, layers, min_pearson=min_pearson, shards=shards)
    counts = flow_counts(store, layers, links, shards)
    return {
        "pass_through": write_parquet_atomic(links, out / "pass_through.parquet"),
        "pass_through_chains": write_parquet_atomic(chains(links), out / "chains.parquet"),
        "pass_through_flow": write_parquet_atomic(counts, out / "flow.parquet"),
        "pass_through_plot": flow_figure(counts, links, out / "pass_through.png"),
    }
