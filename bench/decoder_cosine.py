"""Data-free matching at GPT-2 size: `featstore.decoders.decoder_cosine` on two 24,576 x 768
decoders against the dense way (the whole 24,576 x 24,576 cosine matrix, then the top k of every
row and column), measured in the same run, each in a fresh process for its peak memory.

    .venv/bin/python bench/decoder_cosine.py [--features 24576] [--d-model 768] [--k 10]

Random unit decoders stand in for the SAEs' (no download here); the cost does not depend on the
values. The two outputs are compared pair by pair.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np


def decoders(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, d), dtype=np.float32) for _ in range(2))


def dense_top_k(w_a: np.ndarray, w_b: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The pairs among the k best of their row or column, from the whole matrix."""
    u_a = w_a / np.linalg.norm(w_a, axis=1, keepdims=True)
    u_b = w_b / np.linalg.norm(w_b, axis=1, keepdims=True)
    full = u_a @ u_b.T
    rows = np.argpartition(-full, k - 1, axis=1)[:, :k]
    cols = np.argpartition(-full, k - 1, axis=0)[:k, :]
    pairs = {(i, int(j)) for i, row in enumerate(rows) for j in row}
    return pairs | {(int(i), j) for j, col in enumerate(cols.T) for i in col}


def featstore_top_k(w_a: np.ndarray, w_b: np.ndarray, k: int) -> set[tuple[int, int]]:
    from featstore.analysis.decoders import decoder_cosine

    frame = decoder_cosine(w_a, w_b, k)
    return set(zip(frame["feature_a"].to_list(), frame["feature_b"].to_list(), strict=True))


def run(name: str, n: int, d: int, k: int, out: mp.Queue) -> None:
    w_a, w_b = decoders(n, d)
    start = time.perf_counter()
    pairs = (dense_top_k if name == "dense" else featstore_top_k)(w_a, w_b, k)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out.put((name, seconds, peak, sorted(pairs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--features", type=int, default=24576)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    results = {}
    for name in ("featstore", "dense"):
        out: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=run, args=(name, args.features, args.d_model, args.k, out)
        )
        proc.start()
        results[name] = out.get()
        proc.join()
    ours, theirs = set(results["featstore"][3]), set(results["dense"][3])
    base = results["dense"][1]
    print(f"{args.features} x {args.features} features, d_model {args.d_model}, k {args.k}")
    for name, seconds, peak, pairs in results.values():
        print(
            f"{name:<10} {seconds:8.2f} s  peak RSS {peak:6.2f} GB  {len(pairs):,} pairs  "
            f"dense/this {base / seconds:5.2f}x"
        )
    print(f"pairs in one output only: {len(ours ^ theirs)} (float32 near-ties at the k-th place)")


if __name__ == "__main__":
    main()
