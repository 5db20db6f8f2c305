"""The statistics kernel alone: CPU nanoseconds per multiply-add of `kernel.coactive_block`
(the screened pass `pair_stats` runs), this tree's against a baseline commit's, in one process.

    python bench/pair_kernel.py --baseline /path/to/worktree-of-3402b32 [--tokens 200000]
        [--shards 2] [--rounds 5] [--threads 1 2]

Data: layers 6 and 7 of a `featstore.sources.synth` store (24,576 features, L0 ~49, cached
under `--out` as `bench/all_pairs.py` caches it), stacked as the one-pass scan stacks them
(shards as segments), with the Pearson >= 0.2 screen. Timed: `coactive_block` over 12 ranges
of 256 features spread over the layer (frequent and rare features alike), on `--threads`
threads at once (the pass runs two), alternating baseline and this tree each round; the best
round's process CPU time over the multiply-adds done (B's nonzeros on each of A's tokens).
The baseline's kernel module is loaded from its file; its pairs must equal this tree's, bit
for bit. A kernel that waits on memory shows here: the machine's load shifts both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from all_pairs import OUT, synthetic_home  # noqa: E402

from featstore.stats import kernel, scan  # noqa: E402
from featstore.stats.finish import pearson_screen  # noqa: E402
from featstore.stats.query import PairQuery  # noqa: E402
from featstore.store.home import open_store  # noqa: E402


def baseline_kernel(worktree: Path):
    """The baseline's `featstore/stats/kernel.py` as a module of its own."""
    path = worktree / "featstore" / "stats" / "kernel.py"
    spec = importlib.util.spec_from_file_location("baseline_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(module, arrays, ranges, screen, cuts, pool) -> tuple[float, list]:
    """(process CPU seconds, the blocks' pairs) of `coactive_block` over `ranges` on `pool`."""
    args = (screen.row, screen.col, screen.floor, 4096, True, cuts)
    module.coactive_block(*arrays, 0, 1, *args)  # compiled before the clock starts
    start = time.process_time()
    jobs = [pool.submit(module.coactive_block, *arrays, lo, hi, *args) for lo, hi in ranges]
    found = [job.result() for job in jobs]
    return time.process_time() - start, [tuple(x[: f[-1]] for x in f[:4]) for f in found]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--baseline", type=Path, required=True, help="a worktree of the baseline")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens per shard")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    store = open_store(synthetic_home(args.out, args.tokens, args.shards))
    pairs = scan.PairScan.open(store, 6, 7, save=False)
    rules = PairQuery(6, 7, min_pearson=0.2).rules
    screen = pearson_screen(pairs.stats, rules).checked(*pairs.stats_a.count.shape,
                                                       *pairs.stats_b.count.shape)  # fmt: skip
    m_a, m_b, cuts = scan.stacked_matrices(store, 6, 7, store.shards(6))
    arrays = m_a.feature_major(0, m_a.shape[1]) + m_b.arrays()
    step = m_a.shape[1] // 12
    ranges = [(lo, lo + 256) for lo in range(0, 12 * step, step)]
    work = m_a.feature_work(np.diff(m_b.indptr))
    madds = int(sum(work[lo:hi].sum() for lo, hi in ranges))
    print(f"{m_a.shape[0]:,} tokens ({len(cuts) - 1} segments), {madds / 1e9:.3f} G "
          f"multiply-adds timed, load {np.round(__import__('os').getloadavg(), 1)}")  # fmt: skip
    modules = {"baseline": baseline_kernel(args.baseline), "this tree": kernel}
    for threads in args.threads:
        best: dict[str, float] = {}
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(args.rounds):
                found = {}
                for name, module in modules.items():
                    cpu, found[name] = run(module, arrays, ranges, screen, cuts, pool)
                    best[name] = min(best.get(name, np.inf), cpu)
                same = all(
                    all(np.array_equal(x, y) for x, y in zip(f, g, strict=True))
                    for f, g in zip(found["baseline"], found["this tree"], strict=True)
                )
                if not same:
                    sys.exit("pairs differ between the baseline and this tree")
        ns = {name: cpu / madds * 1e9 for name, cpu in best.items()}
        print(f"{threads} thread(s): baseline {ns['baseline']:.2f}, this tree "
              f"{ns['this tree']:.2f} CPU-ns a multiply-add (best of {args.rounds}): "
              f"{ns['baseline'] / ns['this tree']:.2f}x; pairs equal bit for bit")  # fmt: skip


if __name__ == "__main__":
    main()
