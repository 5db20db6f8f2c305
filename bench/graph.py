"""Memory per edge of the graph stage: `export_graph` of one code tree against another (e.g. the
networkx + GraphML one before issue 14's rework), in the same run, each call in a fresh process
for its own peak memory (`getrusage` maxrss).

    flock /tmp/featstore-heavy.lock nice -n 5 .venv/bin/python bench/graph.py \
        --before /path/to/old/tree --home /work/scratch/$USER/graph-bench

A synthetic store (`featstore synth`: 24,576 features, layers 6 and 7, `--tokens` tokens) is
made once in `--home`. At a few tokens most co-active pairs are seen once and chance gives
large Pearson values, so the graph built with min_both 1 has from ~10^5 (Pearson >= 0.5) to
~1.4M (>= 0.1) edges on the same store: memory per edge is the slope of peak RSS between two
thresholds (what does not grow with edges, imports and the store's statistics, cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = (6, 7)


def measure(home: str, threshold: float, out: str) -> dict:
    """Inside a fresh process (the tree under test first on sys.path)."""
    from featstore.analysis.graph import export_graph
    from featstore.store.home import open_store

    store = open_store(Path(home))
    start = time.perf_counter()
    done = export_graph(store, out, layers=LAYERS, threshold=threshold, min_both=1)
    seconds = time.perf_counter() - start
    summary = done[1] if isinstance(done, tuple) else done  # the old code returned (graph, summary)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"edges": summary["edges"], "seconds": seconds, "peak_gb": peak}


def in_process(tree: str, home: Path, threshold: float) -> dict:
    with tempfile.TemporaryDirectory(dir=home) as out:
        cmd = [sys.executable, __file__, "--measure", str(home), str(threshold), out]
        env = {**os.environ, "PYTHONPATH": tree}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--home", help="scratch folder for the synthetic store (required)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="code tree")
    p.add_argument("--before", default=None, help="code tree to compare with (e.g. old main)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    p.add_argument("--before-thresholds", type=float, nargs="+", default=[0.5, 0.3],
                   help="the old code holds ~9 KB an edge: keep its graphs small")  # fmt: skip
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        home, threshold, out = args.measure
        print(json.dumps(measure(home, float(threshold), out)))
        return
    if not args.home:
        p.error("--home is required")
    home = Path(args.home)
    if not (home / "store.zarr").exists():
        synth = [sys.executable, "-m", "featstore.cli", "--home", str(home), "synth", "--tokens",
                 str(args.tokens), "--layers", *map(str, LAYERS), "--shards", "1"]  # fmt: skip
        subprocess.run(synth, check=True, env={**os.environ, "PYTHONPATH": args.after})
        stats = [sys.executable, "-m", "featstore.cli", "--home", str(home), "stats",
                 "--layer-a", "6", "--layer-b", "7", "--save", "--out", str(home / "all.parquet")]
        subprocess.run(stats, check=True, env={**os.environ, "PYTHONPATH": args.after})  # fmt: skip
    trees = [("after", args.after, args.thresholds)]
    if args.before:
        trees.insert(0, ("before", args.before, args.before_thresholds))
    print("| code | Pearson >= | edges | seconds | peak GB | KB per edge (slope) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tree, thresholds in trees:
        rows = []
        for t in sorted(thresholds, reverse=True):
            r = in_process(tree, home, t)
            if "error" in r:
                print(f"| {name} | {t} | failed: {r['error']} | | | |", flush=True)
                continue
            slope = ""
            if rows and r["edges"] > rows[-1]["edges"]:
                grew = (r["peak_gb"] - rows[-1]["peak_gb"]) * 2**20  # KiB
                slope = f"{grew / (r['edges'] - rows[-1]['edges']):.2f}"
            rows.append(r)
            print(f"| {name} | {t} | {r['edges']:,} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | "
                  f"{slope} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
