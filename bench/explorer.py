"""Feature pages at GPT-2 size: `featstore serve`'s per-feature reads on a synthetic store with
24,576 features a layer and 10^6 tokens, against the feature card's way (partners and contexts
straight from the activations, `featstore.analysis.cards.feature_card`) measured in the same run.

    flock /tmp/featstore-heavy.lock .venv/bin/python bench/explorer.py [--tokens 250000]
        [--shards 4] [--features 20] [--home DIR]

Builds (once, kept in --home) a `featstore synth` store of layers 6-8 and the merged pair
statistics of 6-7 and 7-8 above --min-pearson (the explorer reads whatever `pair_stats/` holds;
the whole co-active table at 10^6 tokens would be ~10^8 rows). Then times: the one-pass layer
summary (once per layer per server), a feature page (every read plus the HTML) for --features
random active features of layer 7, a graph page, and the card of one feature as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def build(home: Path, tokens: int, shards: int, min_pearson: float) -> None:
    from featstore.sources.synth import SynthConfig, generate_all
    from featstore.store.home import open_store

    store = open_store(home, create=True)
    if not store.layers():
        start = time.perf_counter()
        generate_all(store, SynthConfig(layers=(6, 7, 8), n_tokens=tokens), shards)
        seconds = time.perf_counter() - start
        print(f"synth: {shards} x {tokens} tokens, layers 6-8 in {seconds:.0f}s")
    import polars as pl

    from featstore.files import write_parquet_atomic
    from featstore.stats.query import PairQuery, pair_stats, pair_stats_path
    from featstore.store.sql import PAIR_STATS_SCHEMA

    for a, b in ((6, 7), (7, 8)):
        path = pair_stats_path(store, a, b)
        if not path.exists():
            start = time.perf_counter()
            frame = pair_stats(store, PairQuery(a, b, min_pearson=min_pearson, save=False))
            layers = [pl.lit(a, pl.Int32).alias("layer_a"), pl.lit(b, pl.Int32).alias("layer_b")]
            frame = frame.sort("feature_a", "feature_b")
            write_parquet_atomic(frame.select(*layers, *PAIR_STATS_SCHEMA.names[2:]), path)
            print(f"pair_stats {a}-{b}: {frame.height} pairs with Pearson >= {min_pearson} "
                  f"in {time.perf_counter() - start:.0f}s")  # fmt: skip


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default="/tmp/featstore-bench-explorer")
    parser.add_argument("--tokens", type=int, default=250_000, help="tokens per shard")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--features", type=int, default=20, help="feature pages timed")
    parser.add_argument("--min-pearson", type=float, default=0.05)
    args = parser.parse_args()
    build(Path(args.home), args.tokens, args.shards, args.min_pearson)

    from featstore.analysis.cards import feature_card
    from featstore.explorer import pages
    from featstore.explorer.graphview import neighbourhood
    from featstore.explorer.reads import Explorer, labeller
    from featstore.store.home import open_store

    store = open_store(args.home)
    ex = Explorer(store)
    for layer in (6, 7, 8):
        seconds, s = timed(ex.summary, layer)
        print(f"summary of layer {layer} ({s.d_sae} features, {ex.stats(layer).n_tokens} tokens):"
              f" {seconds:.2f}s, once per layer per server")  # fmt: skip
    site = pages.Site(labels=labeller(ex))
    rng = np.random.default_rng(0)
    active = np.flatnonzero(ex.stats(7).count > 0)
    chosen = rng.choice(active, args.features, replace=False)
    page_s, graph_s = [], []
    for f in chosen.tolist():
        seconds, view = timed(ex.feature, 7, f)
        page_s.append(seconds + timed(pages.feature_page, view, "pearson", site)[0])
    for f in chosen[:5].tolist():
        seconds, nb = timed(neighbourhood, ex, 7, f)
        graph_s.append(seconds + timed(pages.graph_page, nb, site)[0])
    card_s, _ = timed(feature_card, store, 7, int(chosen[0]))
    median = statistics.median(page_s)
    print("\n| what | seconds | vs the card |\n|---|---|---|")
    print(f"| card of one feature (baseline: from the activations) | {card_s:.2f} | 1.00 |")
    print(f"| feature page, median of {len(page_s)} | {median:.3f} | {card_s / median:.1f}x |")
    print(f"| feature page, slowest | {max(page_s):.3f} | {card_s / max(page_s):.1f}x |")
    print(f"| graph page, median of {len(graph_s)} | {statistics.median(graph_s):.3f} | "
          f"{card_s / statistics.median(graph_s):.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
