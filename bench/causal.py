"""What one causal edge costs at GPT-2 dims: exact patching reads only the asked target columns.

Model: GPT-2-small-shaped with random weights and random 24,576-feature SAEs on layers 6 and 7
(`bench/extraction.py`'s `gpt2_sized`, L0 about 50), sequences of 128 random tokens after BOS.
Asked edges: `--sources` source features of layer 6 active in the sequences, `--per-source` random
target features of layer 7 each. Timed, in one run:

- `all columns` (the baseline): the same rows patched, every one of the 24,576 target features
  read (what the dense design did per row, without its dense accumulators);
- `asked columns`: `edge_effects` reading only the asked targets (the shipped path);
- `attribution`: `edge_attribution` of the same edges (a backward pass per chunk of targets).

Prints seconds per (sequence, feature) row, per edge, ratios to the baseline and the peak RSS.

    .venv/bin/python bench/causal.py [--sequences 8] [--sources 16] [--per-source 10]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from extraction import gpt2_sized

from featstore.analysis.attribution import edge_attribution
from featstore.analysis.patching import Edges, PatchConfig, edge_effects, patch_jobs
from featstore.sources.extract import encode_batch

D_SAE = 24_576


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def asked(codes, n_seq: int, sources: int, per_source: int, all_targets: bool) -> Edges:
    rng = np.random.default_rng(0)
    active = np.unique(codes[:, :].tocoo().col)
    src = np.sort(rng.choice(active, min(sources, len(active)), replace=False))
    if all_targets:
        return Edges.of(7, np.repeat(src, D_SAE), np.tile(np.arange(D_SAE), len(src)))
    targets = np.concatenate([rng.choice(D_SAE, per_source, replace=False) for _ in src])
    return Edges.of(7, np.repeat(src, per_source), targets)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--per-source", type=int, default=10)
    parser.add_argument("--batch-rows", type=int, default=16)
    args = parser.parse_args()
    model, saes = gpt2_sized("cpu")
    saes = {layer: saes[layer] for layer in (6, 7)}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 50257, (args.sequences, 128), generator=gen)
    tokens[:, 0] = 50256
    codes = encode_batch(model, {6: saes[6]}, {6: "blocks.6.hook_resid_pre"}, tokens)[6]
    tokens = tokens.numpy()
    cfg = PatchConfig(6, batch_rows=args.batch_rows, max_cells=1 << 28)
    few = asked(codes, args.sequences, args.sources, args.per_source, all_targets=False)
    full = asked(codes, args.sequences, args.sources, args.per_source, all_targets=True)
    rows = len(patch_jobs(codes, 128, np.unique(few.feature_a), 1)[0])
    print(f"GPT-2 dims, {args.sequences} sequences x 128 tokens, L0 of layer 6 "
          f"{codes.nnz / codes.shape[0]:.1f}, {len(np.unique(few.feature_a))} sources, "
          f"{rows} (sequence, feature) rows, {len(few)} asked edges, torch threads "
          f"{torch.get_num_threads()}")
    results = {
        "all columns (baseline)": (timed(lambda: edge_effects(model, saes, tokens, codes, cfg,
                                                              [full])), len(full)),
        "asked columns": (timed(lambda: edge_effects(model, saes, tokens, codes, cfg, [few])),
                          len(few)),
        "attribution": (timed(lambda: edge_attribution(model, saes, tokens, codes, cfg, [few],
                                                        batch_sequences=4, chunk=16)), len(few)),
    }
    base = results["all columns (baseline)"][0]
    print("| path | edges | seconds | s / row | s / edge | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, n) in results.items():
        print(f"| {name} | {n:,} | {seconds:.1f} | {seconds / rows:.3f} | {seconds / n:.2e} | "
              f"{seconds / base:.2f}x |")
    print(f"peak RSS {peak_gb():.1f} GB")


if __name__ == "__main__":
    main()
