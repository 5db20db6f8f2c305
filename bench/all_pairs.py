"""Every layer pair of layers 6-9 (6 pairs): each pair alone, all of them in one pass, and the
one pass of a baseline commit, each in a fresh process.

    python bench/all_pairs.py --tokens 100000 --shards 2   # 200,000 synthetic tokens
    python bench/all_pairs.py --tokens 100000 --shards 10 --how "one pass" \
        --baseline /path/to/worktree-of-7e60e61              # 10^6, before/after (heavy lock)
    python bench/all_pairs.py --home /scratch/s1e7 --how "one pass" --max-gb 16   # 10^7

Data: a `featstore.sources.synth` store of layers 6-9, 24,576 features (L0 ~49), `--shards`
shards of `--tokens` tokens, cached under `--out` (default `bench/out/`), or any store with
layers 6-9 (`--home`). Each measurement runs in a fresh process (peak RSS its own; killed
above `--max-gb` of RSS): `alone` runs `pair_stats(store, PairQuery(a, b, min_pearson=0.2))`
for the 6 pairs one after the other; `one pass` does what `allpairs.pair_reports(store,
(6, 7, 8, 9), partial(PairQuery, min_pearson=0.2))` does (`in_one_pass`), printing each pair's
time and peak. With `--baseline`, `one pass` runs first with `PYTHONPATH` at that worktree
(the baseline's code, this script), then this tree's, and the pairs found are compared: equal
row for row, every column bit for bit. Rates are tokens per core-minute per pair: tokens x
pairs over the process's CPU time (all its threads), which a shared machine's load inflates
less than wall time; wall time is printed beside it, with the load average.
"""

from __future__ import annotations

import argparse
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


def synthetic_home(out: Path, n_tokens: int, n_shards: int) -> Path:
    home = out / f"synth4-{n_tokens}x{n_shards}"
    if not planted_path(home).exists():
        print(f"generating {n_shards} x {n_tokens} synthetic tokens in {home} ...", flush=True)
        cfg = SynthConfig(layers=LAYERS, n_tokens=n_tokens, seed=0)
        generate_all(open_store(home, create=True), cfg, n_shards)
    return home


def measure(home: str, how: str, frames: str = "") -> dict:
    """One measurement, in this process; the pairs found written to `frames` when given."""
    import polars as pl

    from featstore.stats import query
    from featstore.stats.query import PairQuery

    store = open_store(Path(home))
    start, cpu = time.perf_counter(), time.process_time()
    if how == "alone":
        found = {(a, b): query.pair_stats(store, PairQuery(a, b, min_pearson=MIN_PEARSON))
                 for a, b in PAIRS}  # fmt: skip
    else:
        from featstore.stats import allpairs

        def work(a: int, b: int) -> pl.DataFrame:  # `pair_reports`' query, timed pair by pair
            frame = query.pair_stats(store, PairQuery(a, b, min_pearson=MIN_PEARSON))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"pair {a}-{b} done at {time.perf_counter() - start:.0f} s wall, "
                  f"{time.process_time() - cpu:.0f} CPU-s, peak {rss:.1f} GB", file=sys.stderr,
                  flush=True)  # fmt: skip
            return frame

        found = allpairs.in_one_pass(allpairs.layer_pairs(LAYERS), work)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if frames:
        tagged = [f.with_columns(pair=pl.lit(f"{a}-{b}")) for (a, b), f in found.items()]
        pl.concat(tagged).write_parquet(frames)
    rows = sum(frame.height for frame in found.values())
    return {"seconds": seconds, "cpu": cpu, "rows": rows, "rss": rss}


def in_subprocess(home: Path, how: str, code: Path, frames: Path, max_gb: float) -> dict | None:
    """`measure` in a fresh process importing featstore from `code`, killed above `max_gb`."""
    run = [sys.executable, __file__, "--measure", str(home), how, str(frames)]
    env = os.environ | {"PYTHONPATH": str(code)}
    with subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:  # fmt: skip
        while proc.poll() is None:
            time.sleep(1)
            if _rss_gb(proc.pid) > max_gb:
                proc.kill()
                print(f"{how}: killed above {max_gb} GB of RSS")
        out, err = proc.communicate()
    print(err.strip(), flush=True)  # progress pair by pair, or why it failed
    if proc.returncode:
        print(f"{how}: failed (exit {proc.returncode})")
        return None
    return json.loads(out.strip().splitlines()[-1])


def _rss_gb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    kb = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(kb[0]) / 1e6 if kb else 0.0


def _same(x: Path, y: Path) -> str:
    import polars as pl

    fx, fy = (pl.read_parquet(f).sort("pair", "feature_a", "feature_b") for f in (x, y))
    if fx.columns != fy.columns:
        fy = fy.select(fx.columns)
    return "equal, bit for bit" if fx.equals(fy) else "DIFFERENT"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per shard")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT, help="where synthetic stores are cached")
    p.add_argument("--home", type=Path, help="an existing store with layers 6-9 instead")
    p.add_argument("--how", nargs="+", default=["alone", "one pass"])
    p.add_argument("--baseline", type=Path, help="a worktree of the baseline commit")
    p.add_argument("--max-gb", type=float, default=16.0, help="kill a run above this RSS")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    home = args.home or synthetic_home(args.out, args.tokens, args.shards)
    store = open_store(home)
    shards = store.shards(LAYERS[0])
    n = sum(int(store.info(LAYERS[0], s)["shape"][0]) for s in shards)
    here = Path(__file__).resolve().parents[1]
    runs = [(how, "this tree", here) for how in args.how]
    if args.baseline:
        runs.insert(0, ("one pass", "baseline", args.baseline.resolve()))
    frames = {}
    for how, tag, code in runs:
        frames[tag] = args.out / f"pairs-{tag.replace(' ', '-')}-{how.replace(' ', '-')}.parquet"
        load = os.getloadavg()[0]
        got = in_subprocess(home, how, code, frames[tag], args.max_gb)
        if got is None:
            continue
        rate = n * len(PAIRS) / (got["cpu"] / 60)
        print(
            f"{tag:<9} {how:<9} {n:>10,} tokens ({len(shards)} shards) x {len(PAIRS)} pairs: "
            f"{got['cpu']:7.1f} CPU-s ({got['seconds']:.1f} s wall, load {load:.1f} at start), "
            f"{rate / 1e6:5.2f} M tokens/core-minute/pair, peak {got['rss'] / 1e9:4.1f} GB, "
            f"{got['rows']:,} pairs with pearson >= {MIN_PEARSON}", flush=True,
        )  # fmt: skip
    if args.baseline and all(f.exists() for f in frames.values()) and len(frames) > 1:
        print("pairs found, baseline vs this tree:", _same(*frames.values()))


if __name__ == "__main__":
    main()
