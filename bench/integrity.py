"""What the store's integrity checks cost (issue 13): writing and the pair statistics, with the
checks on against the same code with them off, in one run.

    python bench/integrity.py                 # 200,000 tokens, layers 6 and 7, 24,576 features
    python bench/integrity.py --tokens 20000  # quicker

Data: a `featstore.synth` shard (L0 ~ 50), generated once in memory. Two configurations:

- on: what featstore does (every array with a CRC-32C codec after blosc and a fill value no valid
  element takes; every read checked: the fill value, feature ids in range, indptr monotone,
  values positive and finite);
- off: blosc alone, zarr's fill value 0, and the read checks replaced by no-ops.

For each, `write` times storing both layers and the token table (`write_activations`,
`write_tokens`; extraction's store path) and `stats` times `update_shard_pairs` (reading both
layers block by block, the compiled kernel, saving the shard's pair sums; the statistics
benchmark's `save shard sums`). The two configurations alternate, `--repeat` times each (default
3), and medians are compared. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from featstore.sources.synth import SynthConfig, build_world, generate_block, token_table
from featstore.stats.shardsums import update_shard_pairs
from featstore.store import encodings, local
from featstore.store.home import open_store

LAYERS = (6, 7)


@contextlib.contextmanager
def checks(on: bool) -> Iterator[None]:
    """featstore as it is (on), or with its integrity checks replaced by no-ops (off)."""
    saved = (local.CODECS, encodings.check_read, encodings.csr_problem, encodings.fill_value)
    if not on:
        local.CODECS = local.CODECS[:1]
        encodings.check_read = lambda *_: None
        encodings.csr_problem = lambda *_: None
        encodings.fill_value = lambda _dtype: 0
    try:
        yield
    finally:
        local.CODECS, encodings.check_read, encodings.csr_problem, encodings.fill_value = saved


def measure(home: Path, acts: dict, tokens, on: bool) -> tuple[float, float]:
    shutil.rmtree(home, ignore_errors=True)
    with checks(on):
        store = open_store(home, create=True)
        t0 = time.perf_counter()
        for layer, matrix in acts.items():
            store.write_activations(layer, "s0", matrix)
        store.write_tokens("s0", tokens)
        t1 = time.perf_counter()
        update_shard_pairs(store, *LAYERS, "s0")
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cfg = SynthConfig(layers=LAYERS, n_tokens=args.tokens, block_tokens=args.tokens)
    rng = np.random.default_rng(0)
    acts = generate_block(rng, cfg, build_world(cfg), args.tokens)
    tokens = token_table(rng, cfg)
    nnz = sum(m.nnz for m in acts.values())
    print(f"{args.tokens:,} tokens, layers {LAYERS}, d_sae {cfg.d_sae}, {nnz:,} nonzeros")
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for on in (False, True):
                times[on].append(measure(Path(tmp) / "home", acts, tokens, on))
    print(f"{'step':<8}{'off (s)':>10}{'on (s)':>10}{'on/off':>9}")
    for i, step in enumerate(("write", "stats")):
        off = statistics.median(t[i] for t in times[False])
        on = statistics.median(t[i] for t in times[True])
        print(f"{step:<8}{off:>10.2f}{on:>10.2f}{on / off:>9.3f}")


if __name__ == "__main__":
    main()
