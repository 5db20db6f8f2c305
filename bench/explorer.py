"""Feature pages at GPT-2 size: `featstore serve`'s per-feature reads on a synthetic store with
24,576 features a layer and 10^6 tokens.

    flock /tmp/featstore-heavy.lock .venv/bin/python bench/explorer.py [--tokens 250000]
        [--shards 4] [--features 20] [--layers 6,7,8,9] [--home DIR] [--build-only] [--card]

Builds (once, kept in --home) a `featstore synth` store of --layers, the merged pair statistics
of successive layers above --min-pearson (the explorer reads whatever `pair_stats/` holds; the
whole co-active table at 10^6 tokens would be ~3 x 10^8 rows a layer pair; --wide A-B keeps
every pair co-active on >= --min-both tokens instead), the SQL index and the pair index.
Then, in one process: the first feature page after start (opening the store and the index
included), the feature page (every read plus the HTML: histogram, contexts, label, partners in
every layer with intervals and the null model, causal, logits) of --features random active
features of --layer and of its 5 densest features, pages ordered by other measures, graph pages,
a token search, and with --card the feature card of one feature (from the activations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def build(
    home: Path, tokens: int, shards: int, min_pearson: float, layers: tuple[int, ...],
    wide: str | None = None, min_both: int = 30,
) -> None:  # fmt: skip
    from featstore.sources.synth import SynthConfig, generate_all
    from featstore.store import sql
    from featstore.store.home import open_store

    store = open_store(home, create=True)
    if not store.layers():
        start = time.perf_counter()
        generate_all(store, SynthConfig(layers=layers, n_tokens=tokens), shards, log=print)
        seconds = time.perf_counter() - start
        print(f"synth: {shards} x {tokens} tokens, layers {layers} in {seconds:.0f}s", flush=True)
    import polars as pl

    from featstore.files import write_parquet_atomic
    from featstore.stats.query import PairQuery, pair_stats, pair_stats_path
    from featstore.store.sql import PAIR_STATS_SCHEMA

    for a, b in zip(layers, layers[1:], strict=False):
        path = pair_stats_path(store, a, b)
        if not path.exists():
            start = time.perf_counter()
            screen = ({"min_both": min_both} if f"{a}-{b}" == wide else
                      {"min_pearson": min_pearson})  # fmt: skip
            frame = pair_stats(store, PairQuery(a, b, save=False, **screen))
            layers = [pl.lit(a, pl.Int32).alias("layer_a"), pl.lit(b, pl.Int32).alias("layer_b")]
            frame = frame.sort("feature_a", "feature_b")
            write_parquet_atomic(frame.select(*layers, *PAIR_STATS_SCHEMA.names[2:]), path)
            print(f"pair_stats {a}-{b}: {frame.height} pairs with {screen} "
                  f"in {time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    start = time.perf_counter()
    sql.connect(store).close()  # builds the SQL index (what the first query after a change pays)
    print(f"SQL index: {time.perf_counter() - start:.0f}s", flush=True)
    from featstore.explorer.reads import Explorer

    start = time.perf_counter()
    Explorer(store).warm()  # and the pair tables' copies by feature_b (`serve` does both)
    print(f"SQL index checked, pair index: {time.perf_counter() - start:.0f}s", flush=True)


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
    parser.add_argument("--layers", default="6,7,8", help="layers of the synthetic store")
    parser.add_argument("--layer", type=int, default=7, help="layer whose pages are timed")
    parser.add_argument("--wide", default=None, metavar="A-B",
                        help="this layer pair's table keeps every pair co-active on >= "
                        "--min-both tokens instead of the Pearson screen")  # fmt: skip
    parser.add_argument("--min-both", type=int, default=30)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--card", action="store_true", help="also time the feature card")
    args = parser.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))
    build(Path(args.home), args.tokens, args.shards, args.min_pearson, layers, args.wide,
          args.min_both)  # fmt: skip
    if args.build_only:
        return

    from featstore.analysis.cards import feature_card
    from featstore.explorer import pages
    from featstore.explorer.graphview import neighbourhood
    from featstore.explorer.reads import TOKEN_QUERY, Explorer, Search, labeller
    from featstore.store import pairindex
    from featstore.store.home import open_store

    start = time.perf_counter()
    store = open_store(args.home)
    ex = Explorer(store)
    site = pages.Site(labels=labeller(ex))
    x = args.layer

    cpu: list[float] = []

    def page(f: int, measure: str = "pearson") -> float:
        """Wall seconds of a whole page; its CPU seconds (every thread) go to `cpu`."""
        start = time.process_time()
        seconds, view = timed(ex.feature, x, f, measure)
        seconds += timed(pages.feature_page, view, measure, site)[0]
        cpu.append(time.process_time() - start)
        return seconds

    count = ex.stats(x).count
    rng = np.random.default_rng(0)
    active = np.flatnonzero(count > 0)
    chosen = rng.choice(active, args.features + 1, replace=False).tolist()
    first = page(chosen[0])
    print(f"first page after start (open, index check, stats, token tables, page): "
          f"{time.perf_counter() - start:.3f}s (the page alone {first:.3f}s)", flush=True)
    page_s = [page(f) for f in chosen[1:]]
    page_cpu = cpu[1:]
    densest = np.argsort(-count, kind="stable")[:5].tolist()
    dense_s = [page(f) for f in densest]
    measure_s = [page(f, m) for f, m in zip(chosen[1:6], ("jaccard", "sufficiency", "pmi",
                                                          "cosine", "necessity"), strict=True)]
    graph_s = []
    for f in chosen[1:6]:
        seconds, nb = timed(neighbourhood, ex, x, f)
        graph_s.append(seconds + timed(pages.graph_page, nb, site)[0])
    token = int(ex.hits(x, chosen[1]).token[0])
    if store.vocab() is not None:
        search_s, found = timed(Search(ex), ex.text(token))
    else:  # synthetic stores have no vocabulary: the query a token search runs
        search_s, found = timed(ex._run, ex.index().duckdb, TOKEN_QUERY,
                                {"ids": [token], "limit": 50})  # fmt: skip
        found = found["n"]
    below = [y for y in ex.layers if y < x]
    scan_s, index_s = [], []
    if below:  # a feature's predecessor sums: scanning the table vs its copy by feature_b
        y = below[-1]
        db = ex.pair_index(y, x)
        for f in chosen[1:]:
            params = {"layer_a": y, "layer_b": x, "feature": f, "min_both": 2}
            scan_s.append(timed(ex.sql, "feature_predecessor_sums", params)[0])
            if db is not None:
                query = pairindex.PREDECESSORS.format(db=db)
                index_s.append(timed(lambda q=query, f=f: ex._files.cursor().sql(
                    q, params={"feature": f, "min_both": 2}).pl())[0])  # fmt: skip
    hits = [int(count[f]) for f in chosen[1:]]
    print(f"\nlayer {x}: {count.size} features, {ex.stats(x).n_tokens} tokens; timed features "
          f"active on {min(hits)}-{max(hits)} tokens (median {int(np.median(hits))}), the densest "
          f"on {int(count[densest[-1]])}-{int(count[densest[0]])}")  # fmt: skip
    print("\n| what | seconds |\n|---|---|")
    print(f"| feature page, median of {len(page_s)} random active features | "
          f"{statistics.median(page_s):.3f} |")
    print(f"| feature page, slowest of those | {max(page_s):.3f} |")
    print(f"| CPU seconds of those pages (all threads): median / largest | "
          f"{statistics.median(page_cpu):.3f} / {max(page_cpu):.3f} |")
    if scan_s and index_s:
        print(f"| predecessor sums of {len(scan_s)} features from layer {y}: scanning the table, "
              f"median | {statistics.median(scan_s):.3f} |")
        ratio = statistics.median(scan_s) / statistics.median(index_s)
        print(f"| the same from the pair index (by feature_b), median | "
              f"{statistics.median(index_s):.4f} ({ratio:.0f}x less) |")  # fmt: skip
    print(f"| feature page, the 5 densest features: median / slowest | "
          f"{statistics.median(dense_s):.3f} / {max(dense_s):.3f} |")
    print(f"| feature page by another measure, median of 5 | {statistics.median(measure_s):.3f} |")
    print(f"| graph page, median of {len(graph_s)} | {statistics.median(graph_s):.3f} |")
    print(f"| token search ({len(found)} features) | {search_s:.3f} |")
    if args.card:
        card_s, _ = timed(feature_card, store, x, int(chosen[1]))
        print(f"| feature card of one feature (from the activations) | {card_s:.2f} |")


if __name__ == "__main__":
    main()
