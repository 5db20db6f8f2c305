"""Statistics state on disk against the activations it summarises, by number of shards (issue 15).

Usage: python bench/state.py [--tokens N] [--shards 10 100] [--layers 6 7] [--keep] [--save]

For each shard count, a synthetic store of N tokens in all (24,576 features, `featstore synth`)
gets `featstore stats --layer-a A --layer-b B --min-pearson 0.2` (the default: no pair sums
kept; with `--save` the whole merged table instead, which is a result, not state, and holds every
co-active pair); the script prints the bytes of activations + token tables, of kept pair sums
(`pairs/`, the state for incremental recomputation) and of the merged table (`pair_stats/`), and
the time of the statistics step. `--keep` adds a run with `--keep-shard-sums` (the cache).
Run it on an idle machine; compare only within one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def featstore(home: Path, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cmd = [sys.executable, "-m", "featstore.cli", "--home", str(home), *args]
    subprocess.run(cmd, check=True, env=env, **quiet)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, nargs="+", default=[10, 100])
    p.add_argument("--layers", type=int, nargs=2, default=[6, 7])
    p.add_argument("--keep", action="store_true")
    p.add_argument("--save", action="store_true")
    args = p.parse_args()
    a, b = args.layers
    print(f"{args.tokens:,} tokens, layers {a}-{b}, 24,576 features; load {os.getloadavg()[0]:.1f}")
    print("| shards | kept sums | activations + tokens | pair state (pairs/) | state / data | "
          "merged table | stats s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for shards in args.shards:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            home = Path(tmp) / "home"
            featstore(home, "synth", "--tokens", str(args.tokens // shards), "--shards",
                      str(shards), "--layers", str(a), str(b))  # fmt: skip
            store = home / "store.zarr"
            data = du(store / "activations") + du(store / "tokens")
            for keep in (False, True) if args.keep else (False,):
                out = ["--out", str(Path(tmp) / "out.parquet")]
                out += ["--save"] if args.save else ["--min-pearson", "0.2"]
                out += ["--keep-shard-sums"] if keep else []
                seconds = featstore(home, "stats", "--layer-a", str(a), "--layer-b", str(b), *out)
                state = du(store / "pairs")
                table = du(home / "pair_stats")
                print(f"| {shards} | {'yes' if keep else 'no'} | {data / 1e6:,.0f} MB | "
                      f"{state / 1e6:,.0f} MB | {state / data:.2f} | {table / 1e6:,.0f} MB | "
                      f"{seconds:.0f} |", flush=True)
                shutil.rmtree(store / "pairs", ignore_errors=True)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
