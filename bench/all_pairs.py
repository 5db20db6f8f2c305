"""Every layer pair of layers 6-9 (6 pairs): each pair alone against all of them in one pass.

    python bench/all_pairs.py --tokens 100000 --shards 2   # 200,000 synthetic tokens
    python bench/all_pairs.py --tokens 100000 --shards 10  # 10^6 (under the heavy lock)

Data: a `featstore.sources.synth` store of layers 6-9, 24,576 features (L0 ~49), `--shards`
shards of `--tokens` tokens, cached under `bench/out/`. Each measurement runs in a fresh process
(peak RSS its own): `alone` runs `pair_stats(store, PairQuery(a, b, min_pearson=0.2))` for the 6
pairs one after the other (what a caller did before `featstore.stats.allpairs`); `one pass` runs
`allpairs.pair_reports(store, (6, 7, 8, 9), partial(PairQuery, min_pearson=0.2))` (where the code
under test has it). Rates are tokens per core-minute per pair: tokens x pairs over the process's
CPU time (all its threads), which a shared machine's load inflates less than wall time. Run it
once with `PYTHONPATH` at a worktree of the baseline commit and once at this one; bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from featstore.sources.synth import SynthConfig, generate_all, planted_path
from featstore.store.home import open_store

LAYERS = (6, 7, 8, 9)
PAIRS = list(itertools.combinations(LAYERS, 2))
MIN_PEARSON = 0.2
OUT = Path(__file__).resolve().parent / "out"


def synthetic_home(n_tokens: int, n_shards: int) -> Path:
    home = OUT / f"synth4-{n_tokens}x{n_shards}"
    if not planted_path(home).exists():
        print(f"generating {n_shards} x {n_tokens} synthetic tokens in {home} ...", flush=True)
        cfg = SynthConfig(layers=LAYERS, n_tokens=n_tokens, seed=0)
        generate_all(open_store(home, create=True), cfg, n_shards)
    return home


def measure(home: str, how: str) -> dict:
    """One measurement, in this process."""
    from featstore.stats import query
    from featstore.stats.query import PairQuery

    store = open_store(Path(home))
    start, cpu = time.perf_counter(), time.process_time()
    if how == "alone":
        rows = sum(
            query.pair_stats(store, PairQuery(a, b, min_pearson=MIN_PEARSON)).height
            for a, b in PAIRS
        )
    else:
        from featstore.stats import allpairs

        found = allpairs.pair_reports(
            store, LAYERS, functools.partial(PairQuery, min_pearson=MIN_PEARSON)
        )
        rows = sum(frame.height for frame, _ in found.values())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "cpu": cpu, "rows": rows, "rss": rss}


def in_subprocess(home: Path, how: str) -> dict | None:
    run = [sys.executable, __file__, "--measure", str(home), how]
    done = subprocess.run(run, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode:
        print(f"{how}: failed: {done.stderr.strip().splitlines()[-1]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per shard")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    home = synthetic_home(args.tokens, args.shards)
    n = args.tokens * args.shards
    try:
        import featstore.stats.allpairs  # noqa: F401

        hows = ["alone", "one pass"]
    except ImportError:
        hows = ["alone"]
    for how in hows:
        got = in_subprocess(home, how)
        if got is None:
            continue
        rate = n * len(PAIRS) / (got["cpu"] / 60)
        print(
            f"{how:<9} {n:>10,} tokens x {len(PAIRS)} pairs: {got['cpu']:7.1f} CPU-s "
            f"({got['seconds']:.1f} s wall), {rate / 1e6:5.2f} M tokens/core-minute/pair, peak "
            f"{got['rss'] / 1e9:4.1f} GB, "
            f"{got['rows']:,} pairs with pearson >= {MIN_PEARSON}"
        )


if __name__ == "__main__":
    main()
