"""Convergence with tokens: how the statistics, and the number of pairs above a threshold,
change as shards are added (1/8, 1/4, 1/2, all of the tokens).

The statistics state is additive per shard, so each fraction is a sum of saved per-shard sums
(`featstore.stats.shardsums`): the shards' sums are computed and saved once, and every fraction
merges a prefix of them, with no pass over the activations per fraction. A fraction is a prefix
of the shards in name order, so it is as fine as the shards are: with fewer than 8 shards the
smallest fractions merge (the table gives each point's actual share of the tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from featstore.figures import no_data, pair_label, save
from featstore.files import write_parquet_atomic
from featstore.stats.query import PairQuery, pair_stats
from featstore.stats.shardsums import ensure_shard_pairs, shards_of_pair
from featstore.store.local import Store

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
THRESHOLDS = {"pearson": 0.5, "jaccard": 0.5, "necessity": 0.9}
MIN_BOTH = 2


def prefixes(shards: Sequence[str], fractions: Sequence[float]) -> list[list[str]]:
    """The distinct shard prefixes covering each fraction (at least one shard), smallest first."""
    ordered = sorted(shards)
    sizes = sorted({max(1, math.ceil(f * len(ordered) - 1e-9)) for f in fractions})
    return [ordered[:n] for n in sizes]


def _above(store, a, b, shards, measure, threshold, min_both) -> pl.DataFrame:
    frame = pair_stats(
        store,
        PairQuery(
            a, b, shards=shards, thresholds={measure: threshold}, min_both=min_both, save=False
        ),
    )
    return frame.select("feature_a", "feature_b", "n_tokens", measure)


def convergence(
    store: Store, a: int, b: int, *, fractions: Sequence[float] = FRACTIONS,
    thresholds: Mapping[str, float] | None = None, min_both: int = MIN_BOTH,
    shards: Sequence[str] | None = None,
) -> pl.DataFrame:  # fmt: skip
    """Per fraction and measure: shards, tokens, pairs above the threshold, the share of them
    still above it with all tokens (`stable`), the share of all-token pairs already found
    (`recovered`), and the mean |change| of the measure on the pairs found in both."""
    chosen = shards_of_pair(store, a, b, shards)
    ensure_shard_pairs(store, a, b, chosen)  # once: every fraction merges saved sums
    rows = []
    for measure, threshold in (thresholds or THRESHOLDS).items():
        full = _above(store, a, b, chosen, measure, threshold, min_both)
        for part in prefixes(chosen, fractions):
            got = full if len(part) == len(chosen) else _above(
                store, a, b, part, measure, threshold, min_both)  # fmt: skip
            both = got.join(full, on=["feature_a", "feature_b"], suffix="_all")
            change = (both[measure] - both[f"{measure}_all"]).abs()
            n_tokens = int(got["n_tokens"][0]) if got.height else _tokens(store, a, part)
            rows.append((
                a, b, measure, threshold, len(part), n_tokens, got.height,
                both.height / got.height if got.height else math.nan,
                both.height / full.height if full.height else math.nan,
                float(change.mean()) if both.height else math.nan,
            ))  # fmt: skip
    cols = ["layer_a", "layer_b", "measure", "threshold", "shards", "n_tokens", "pairs_above",
            "stable", "recovered", "mean_abs_change"]  # fmt: skip
    frame = pl.DataFrame(rows, schema=cols, orient="row")
    total = frame.group_by("measure").agg(pl.col("n_tokens").max().alias("all_tokens"))
    return (
        frame.join(total, on="measure")
        .with_columns(token_share=pl.col("n_tokens") / pl.col("all_tokens"))
        .drop("all_tokens")
    )


def _tokens(store: Store, layer: int, shards: Sequence[str]) -> int:
    return sum(int(store.info(layer, s)["shape"][0]) for s in shards)


def convergence_figure(frame: pl.DataFrame, path: Path) -> Path:
    """Pairs above threshold and the share of all-token pairs recovered, against tokens."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    if frame.is_empty():
        no_data(fig, "no layer pairs")
        return save(fig, path)
    fig.suptitle("convergence with tokens: pairs above threshold as shards are added")
    left, right = fig.subplots(1, 2)
    for (a, b, measure), part in frame.group_by(
        "layer_a", "layer_b", "measure", maintain_order=True
    ):
        label = f"{pair_label((a, b))} {measure} >= {part['threshold'][0]}"
        x = part["n_tokens"].to_numpy()
        left.plot(x, part["pairs_above"].to_numpy(), marker="o", label=label)
        right.plot(x, part["recovered"].to_numpy(), marker="o", label=label)
    for ax, what in ((left, "pairs above threshold"), (right, "share of all-token pairs found")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel(what)
    right.set_ylim(0, 1.05)
    left.legend(fontsize=7)
    return save(fig, path)


def run_convergence(
    store: Store, layers: Sequence[int], out: Path, *, fractions: Sequence[float] = FRACTIONS,
    thresholds: Mapping[str, float] | None = None, min_both: int = MIN_BOTH,
    shards: Sequence[str] | None = None,
) -> dict[str, Path]:  # fmt: skip
    """`convergence` of every pair of successive layers: table and figure under `out`."""
    layers = sorted(layers)
    parts = [
        convergence(
            store,
            a,
            b,
            fractions=fractions,
            thresholds=thresholds,
            min_both=min_both,
            shards=shards,
        )  # fmt: skip
        for a, b in zip(layers[:-1], layers[1:], strict=True)
    ]
    frame = pl.concat(parts) if parts else pl.DataFrame()
    return {
        "convergence": write_parquet_atomic(frame, out / "convergence.parquet"),
        "convergence_plot": convergence_figure(frame, out / "convergence.png"),
    }
