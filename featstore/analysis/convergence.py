"""Convergence with tokens: how the statistics, and the number of pairs above a threshold,
change as shards are added (1/8, 1/4, 1/2, all of the tokens).

The statistics are sums over tokens added shard by shard in name order (the canonical order,
docs/STORE_FORMAT.md), so the running sums after the first k shards are the statistics of those
k shards: one compiled pass over all the shards (`featstore.stats.best.prefix_counts`) tests
every threshold at each prefix as it goes, with no pass per fraction and no pair state (neither
saved per-shard sums, which grow with pairs x shards, nor a table per fraction). A fraction is a
prefix of the shards in name order, so it is as fine as the shards are: with fewer than 8 shards
the smallest fractions merge (the table gives each point's actual share of the tokens).
Measures: pearson, cosine, jaccard, necessity, sufficiency (`featstore.stats.best.FORMS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from featstore.errors import FeatstoreError
from featstore.figures import no_data, pair_label, save
from featstore.files import output_folder, write_parquet_atomic
from featstore.stats.best import FORMS, prefix_counts
from featstore.stats.measures import check_measure
from featstore.stats.shardsums import shards_of_pair
from featstore.store.local import Store

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
THRESHOLDS = {"pearson": 0.5, "jaccard": 0.5, "necessity": 0.9}
MIN_BOTH = 2


def prefixes(shards: Sequence[str], fractions: Sequence[float]) -> list[list[str]]:
    """The distinct shard prefixes covering each fraction (at least one shard), smallest first."""
    ordered = sorted(shards)
    sizes = sorted({max(1, math.ceil(f * len(ordered) - 1e-9)) for f in fractions})
    return [ordered[:n] for n in sizes]


def convergence(
    store: Store, a: int, b: int, *, fractions: Sequence[float] = FRACTIONS,
    thresholds: Mapping[str, float] | None = None, min_both: int = MIN_BOTH,
    shards: Sequence[str] | None = None,
) -> pl.DataFrame:  # fmt: skip
    """Per fraction and measure: shards, tokens, pairs above the threshold (co-active on
    >= `min_both` tokens), the share of them still above it with all tokens (`stable`), the
    share of all-token pairs already found (`recovered`), and the mean |change| of the measure
    on the pairs found in both."""
    thresholds = dict(thresholds or THRESHOLDS)
    for measure, threshold in thresholds.items():
        check_measure(measure, threshold)
        if measure not in FORMS:
            raise FeatstoreError(
                f"convergence counts {', '.join(FORMS)}, not {measure!r}"
            )
    if min_both < 0:
        raise FeatstoreError(f"min_both must be non-negative, got {min_both}")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise FeatstoreError(f"fractions must be in (0, 1], got {list(fractions)}")
    chosen = sorted(shards_of_pair(store, a, b, shards))
    ends = [len(p) for p in prefixes(chosen, [*fractions, 1.0])]
    got = prefix_counts(store, a, b, chosen, ends, thresholds, min_both)
    rows = []
    for m, (measure, threshold) in enumerate(thresholds.items()):
        full = int(got["above"][-1, m])
        for p, n_shards in enumerate(ends):
            above, stable = int(got["above"][p, m]), int(got["stable"][p, m])
            rows.append((
                a, b, measure, threshold, n_shards, int(got["n_tokens"][p]), above,
                stable / above if above else math.nan, stable / full if full else math.nan,
                float(got["change"][p, m]) / stable if stable else math.nan,
            ))  # fmt: skip
    cols = ["layer_a", "layer_b", "measure", "threshold", "shards", "n_tokens", "pairs_above",
            "stable", "recovered", "mean_abs_change"]  # fmt: skip
    frame = pl.DataFrame(rows, schema=cols, orient="row")
    return frame.with_columns(token_share=pl.col("n_tokens") / pl.col("n_tokens").max())


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
    if len(layers) < 2:
        raise FeatstoreError(f"convergence needs two or more layers, got {layers}")
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
    frame = pl.concat(parts)
    output_folder(out)
    return {
        "convergence": write_parquet_atomic(frame, out / "convergence.parquet"),
        "convergence_plot": convergence_figure(frame, out / "convergence.png"),
    }
