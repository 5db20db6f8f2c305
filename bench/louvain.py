"""Louvain communities of a store's feature graph: the comparison's graph against networkx's
full directed graph (the path before, `graph.build_graph` + `to_undirected`), each in a fresh
process, wall time and peak RSS.

    python bench/louvain.py HOME [--threshold 0.2] [--max-edges N]

HOME holds a graph (`{home}/graph/edges.parquet`, the graph stage's table); the edges with
Pearson >= threshold and n_both >= MIN_BOTH are the community graph of `compare.communities`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def edges_of(home: str, threshold: float, max_edges: int | None):
    import polars as pl

    from featstore.analysis.graph import read_edges
    from featstore.defaults import MIN_BOTH
    from featstore.store import spec

    frame = read_edges(f"{home}/{spec.GRAPH_DIR}").filter(
        (pl.col("pearson") >= threshold) & (pl.col("n_both") >= MIN_BOTH)
    ).select("layer_a", "feature_a", "layer_b", "feature_b", "n_both", "pearson").collect()
    frame = frame.head(max_edges) if max_edges else frame
    return {(a, b): g.drop("layer_a", "layer_b")
            for (a, b), g in frame.group_by("layer_a", "layer_b")}  # fmt: skip


def one(path: str, home: str, threshold: float, max_edges: int | None) -> dict:
    import networkx as nx

    from featstore.analysis.compare import CompareConfig, communities
    from featstore.analysis.graph import build_graph

    edges = edges_of(home, threshold, max_edges)
    n_edges = sum(f.height for f in edges.values())
    start = time.perf_counter()
    if path == "now":
        groups = communities(edges, CompareConfig(community_threshold=threshold)).height
    else:  # before: the directed graph with every statistic, then its undirected copy
        graph = build_graph(edges, "pearson", threshold).to_undirected()
        groups = len(nx.community.louvain_communities(graph, weight="pearson", seed=0))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"path": path, "edges": n_edges, "communities": groups, "seconds": seconds,
            "peak_gb": peak}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("home")
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--max-edges", type=int, default=None)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(one(args.path, args.home, args.threshold, args.max_edges)))
        return
    rows = []
    for path in ("before", "now"):
        cmd = [sys.executable, __file__, args.home, "--threshold", str(args.threshold),
               "--path", path] + (["--max-edges", str(args.max_edges)] if args.max_edges else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| path | edges | communities | seconds | peak GB (process) |\n|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / rows[0]["seconds"]
        print(f"| {r['path']} | {r['edges']:,} | {r['communities']:,} | {r['seconds']:.1f} "
              f"({ratio:.2f}x) | {r['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
