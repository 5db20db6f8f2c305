"""What the store's integrity checks cost (issue 13): writing and the pair statistics, with the
checks on against the same code with them off, in one run.

    python bench/integrity.py                 # 200,000 tokens, layers 6 and 7, 24,576 features
    python bench/integrity.py --tokens 20000  # quicker

Data: a `featstore.synth` shard (L0 ~ 50), generated once in memory. Two configurations:

- on: what featstore does (every array with a CRC-32C codec after blosc and a fill value no valid
  element takes; every read checked: the fill value, feature ids in range, indptr monotone,
  values positive and finite; spec version 4's reads of one state: each group opened pinned to
  its `zarr.json` bytes and commit, and its `zarr.json` read again after each array read);
- off: blosc alone, zarr's fill value 0, the read checks replaced by no-ops, and no pinning (a
  group's existence tested as before spec version 4, nothing compared after a read).

For each, `write` times storing both layers and the token table (`write_activations`,
`write_tokens`; extraction's store path) and `stats` times `update_shard_pairs` (reading both
layers block by block, the compiled kernel, saving the shard's pair sums; the statistics
benchmark's `save shard sums`). The two configurations alternate (order swapped each round),
`--repeat` times each (default 3), and medians are compared. On a shared machine the two differ by
more than the checks cost, so `checks alone` also times just the read checks
(`encodings.check_read` on each array read and `encodings.csr_problem` on each block, over both
layers as `update_shard_pairs` reads them) and the CRC-32C of every chunk, as a share of `stats`
with the checks on. Results: bench/RESULTS.md.
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
from featstore.store import encodings, writers
from featstore.store.home import open_store
from featstore.store.local import Store
from featstore.store.snapshot import Snapshot

LAYERS = (6, 7)
STAMPS: list[float] = []  # seconds of each `Store._stamp` with the checks on


@contextlib.contextmanager
def checks(on: bool) -> Iterator[None]:
    """featstore as it is (on), or with its integrity checks replaced by no-ops (off)."""
    saved = (writers.CODECS, writers.VALUE_CODECS, encodings.check_read, encodings.csr_problem,
             encodings.fill_value)  # fmt: skip
    pinning = (Store._stamp, Snapshot.pin, Snapshot.verify)
    if on:  # time the reads of zarr.json that pinning adds (its one cost besides a dict)
        stamp = Store._stamp

        def timed(self, path):
            t0 = time.perf_counter()
            try:
                return stamp(self, path)
            finally:
                STAMPS.append(time.perf_counter() - t0)

        Store._stamp = timed
    else:
        writers.CODECS, writers.VALUE_CODECS = writers.CODECS[:1], ()  # no CRC-32C
        encodings.check_read = lambda *_: None
        encodings.csr_problem = lambda *_: None
        encodings.fill_value = lambda _dtype: 0
        Store._stamp = lambda self, path: b"" if self._exists(path) else None
        Snapshot.pin = Snapshot.verify = lambda *_: None
    try:
        yield
    finally:
        (writers.CODECS, writers.VALUE_CODECS, encodings.check_read, encodings.csr_problem,
         encodings.fill_value) = saved  # fmt: skip
        Store._stamp, Snapshot.pin, Snapshot.verify = pinning


def measure(home: Path, acts: dict, tokens, on: bool) -> tuple[float, float]:
    shutil.rmtree(home, ignore_errors=True)
    with checks(on):
        store = open_store(home, create=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for layer, matrix in acts.items():
            store.write_activations(layer, "s0", matrix)
        store.write_tokens("s0", tokens)
        t1, c1 = time.perf_counter(), time.process_time()
        update_shard_pairs(store, *LAYERS, "s0")
        t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c1 - c0, c2 - c1


def checks_alone(home: Path) -> float:
    """Seconds of the read checks and chunk CRCs alone over both layers of the stored shard."""
    import google_crc32c

    store = open_store(home)
    seconds = 0.0
    for layer in LAYERS:
        group = store.group(f"activations/layer_{layer}/s0", "bench")
        nnz, d_sae = int(group.attrs["nnz"]), int(group.attrs["d_sae"])
        arrays = {n: group[n] for n in ("data", "indices", "indptr")}
        raw = {n: a[:] for n, a in arrays.items()}
        chunks = [p.read_bytes() for p in (home / "store.zarr" / group.path).rglob("c/*")]
        t0 = time.perf_counter()
        for name, array in arrays.items():
            encodings.check_read(array, raw[name], slice(None))
        encodings.csr_problem(raw["data"], raw["indices"], raw["indptr"], nnz, d_sae)
        for chunk in chunks:
            google_crc32c.value(chunk[:-4])
        seconds += time.perf_counter() - t0
    return seconds


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
    times: dict[bool, list[tuple[float, ...]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        small = {layer: m[:2000] for layer, m in acts.items()}
        for on in (True, False):  # warm-up (imports, compiled kernels), not counted
            measure(Path(tmp) / "home", small, tokens.head(2000), on)
        STAMPS.clear()
        for r in range(args.repeat):
            for on in (False, True) if (args.repeat - r) % 2 else (True, False):  # on last
                times[on].append(measure(Path(tmp) / "home", acts, tokens, on))
        alone = checks_alone(Path(tmp) / "home") if times[True] else 0.0
    print(f"{'step':<10}{'off (s)':>10}{'on (s)':>10}{'on/off':>9}")
    # Wall seconds, then CPU seconds of this process (all its threads): on a loaded machine the
    # CPU seconds are the fairer comparison.
    for i, step in enumerate(("write", "stats", "write cpu", "stats cpu")):
        off = statistics.median(t[i] for t in times[False])
        on = statistics.median(t[i] for t in times[True])
        print(f"{step:<10}{off:>10.2f}{on:>10.2f}{on / off:>9.3f}")
    for on in (False, True):  # every run, to see the spread the medians hide
        runs = ", ".join(f"{t[1]:.2f}/{t[3]:.2f}" for t in times[on])
        print(f"stats wall/cpu, checks {'on' if on else 'off'}: {runs}")
    stats_on = statistics.median(t[1] for t in times[True])
    print(f"checks alone: {alone:.3f} s = {alone / stats_on:.2%} of stats with checks on")
    per_run = sum(STAMPS) / max(len(times[True]), 1)
    print(f"pinning (zarr.json reads, write + stats): {len(STAMPS) // max(len(times[True]), 1)} "
          f"a run, {per_run:.4f} s = {per_run / stats_on:.3%} of stats with checks on")


if __name__ == "__main__":
    main()
