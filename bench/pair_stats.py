"""Pair statistics at GPT-2 scale: featstore.stats engines against dense and bare sparse baselines.

    python bench/pair_stats.py            # 4,096 and 200,000 tokens, every engine
    python bench/pair_stats.py --quick    # 4,096 and 20,000 tokens, small dense slices
    python bench/pair_stats.py --million  # the default engine on 1,000,000 tokens
    python bench/pair_stats.py --all-measures  # also every measure on, and the null model
    python bench/pair_stats.py --tokens 4096 --engines sparse --repeat 3  # medians of 3 runs

Data: `featstore.synth` stores of layers 6 and 7 with 24,576 features (L0 ~ 50), cached under
`bench/out/`. Every measurement runs in a fresh subprocess so that its peak resident memory
(`ru_maxrss`, interpreter and libraries included) is its own. Baselines, measured in the same run:

- dense: both layers as dense float32 tokens x features arrays, standardised per feature, then
  `A.T @ B / n` into a 24,576 x 24,576 float32 matrix of Pearson correlations (Balcells et al.
  2024). Where that does not fit, a slice of rows (tokens) and output columns is measured and the
  time scaled by (n / rows) for densifying and standardising and by (n / rows) * (d / cols) for the
  product; its memory is then the arrays' size, computed, not measured.
- sparse: scipy `A.T @ B` of the CSR matrices, no statistics (the floor for any exact engine).

`--all-measures` adds the default engine on issue 7's queries: every measure on (a threshold
on each data measure, `min_both`, the 95% intervals) and the null model (layer b's sequences
deranged; computed in memory like a plain query).

`save shard sums` times `featstore.pairs.update_shard_pairs` (the default engine computing the
shard pair sums and saving them to the store, as the `shard_pair_stats` asset does): the
engines' query rows save nothing since issue 3.

Engines slower than the dense baseline allows (duckdb, polars) run on the first 20,000 tokens at
200,000 and their time is scaled. Each measurement is capped at min(24 GB, 85% of available
memory) of address space, so one that outgrows a shared machine fails with a note instead.
Method and numbers: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.sources.synth import SynthConfig, generate_all, planted_path
from featstore.store import spec
from featstore.store.home import open_store
from featstore.store.local import Store

LAYERS = (6, 7)
D_SAE = 24576
MIN_PEARSON = 0.2
# Issue 7's query with every measure on: a threshold on each data measure (at its least value
# that still tests something: pmi >= 0 is "co-active more than by chance"), beside min_pearson.
ALL_MEASURES = {
    "agreement": 0.0,
    "jaccard": 0.0,
    "sufficiency": 0.0,
    "necessity": 0.0,
    "mutual_information": 0.0,
    "pmi": 0.0,
}
QUERY_NAMES = {"all": "every measure", "null": "null model"}
GOAL_NULL_PASSES = 2  # the null model costs at most one more statistics pass: <= 2x the query
OUT = Path(__file__).resolve().parent / "out"
GOAL_DENSE_SPEEDUP = 100  # at 4,096 tokens
GOAL_SPARSE_SLOWDOWN = 2  # at 200,000 tokens
GOAL_MILLION_SECONDS = 300
GOAL_MILLION_GB = 24


# -- data --------------------------------------------------------------------------------------


def synthetic_home(n_tokens: int) -> Path:
    """A cached one-shard synthetic store of `n_tokens` tokens."""
    home = OUT / f"synth-{n_tokens}x1"
    if not planted_path(home).exists():
        cfg = SynthConfig(d_sae=D_SAE, layers=LAYERS, n_tokens=n_tokens, seed=0)
        print(f"generating {n_tokens} synthetic tokens in {home} ...", flush=True)
        generate_all(open_store(home, create=True), cfg, 1)
    return home


def first_tokens(home: Path, n_tokens: int) -> Path:
    """A store holding the first `n_tokens` tokens of `home` (the slice slow engines run on)."""
    target = OUT / f"{home.name}-first-{n_tokens}"
    if planted_path(target).exists():
        return target
    source, store = open_store(home), open_store(target, create=True)
    for shard in source.token_shards():
        for layer in LAYERS:
            attrs = {k: v for k, v in source.info(layer, shard).items() if k == "source"}
            store.write_activations(layer, shard, source.read(layer, shard, 0, n_tokens), attrs)
        store.write_tokens(shard, source.tokens(shard).head(n_tokens))
    planted_path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(planted_path(home), planted_path(target))
    return target


def read_layer(store: Store, layer: int) -> sp.csr_matrix:
    """All shards of one layer stacked (tokens x d_sae)."""
    return sp.vstack([store.read(layer, s) for s in store.shards(layer)], format="csr")


# -- measurements (each in its own process) ----------------------------------------------------


def dense(home: str, rows: int | None, cols: int | None) -> dict:
    """Dense Pearson on the first `rows` tokens and `cols` output columns, scaled to full size."""
    start = time.perf_counter()
    a, b = (read_layer(open_store(home), layer) for layer in LAYERS)
    read = time.perf_counter() - start
    n, d = a.shape
    rows, cols = min(rows or n, n), min(cols or d, d)
    start = time.perf_counter()
    x, y = a[:rows].toarray(), b[:rows].toarray()
    del a, b
    for m in (x, y):  # standardise in place, float32 throughout
        m -= m.mean(axis=0)
        m /= np.maximum(m.std(axis=0), np.float32(1e-12))
    prep = time.perf_counter() - start
    start = time.perf_counter()
    corr = x.T @ y[:, :cols]
    corr /= np.float32(rows)
    product = time.perf_counter() - start
    seconds = read + (prep + product * d / cols) * n / rows
    exact = rows == n and cols == d
    scaled = f"{rows} tokens x {cols} columns, scaled x{n * d / rows / cols:.0f}"
    note = "measured" if exact else scaled
    return {"seconds": seconds, "product_s": product * n / rows * d / cols, "note": note,
            "exact": exact, "est_bytes": 4 * (2 * n * d + d * d)}  # fmt: skip


def sparse(home: str) -> dict:
    """Bare scipy product of the two CSR layers (co-activation sums only)."""
    start = time.perf_counter()
    a, b = (read_layer(open_store(home), layer) for layer in LAYERS)
    read = time.perf_counter() - start
    start = time.perf_counter()
    product = (a.T @ b).tocsr()
    seconds = time.perf_counter() - start
    note = f"read {read:.1f}s + product {seconds:.1f}s; {product.nnz:,} nonzero pairs"
    return {"seconds": read + seconds, "product_s": seconds, "nnz": int(product.nnz), "note": note}


def query_kwargs(query: str) -> dict:
    """`pair_stats` arguments of a query: `pearson` (issue 3's), `all` (a threshold on every
    data measure, min_both and the 95% intervals: issue 7's), `null` (pearson on the null model:
    layer b's sequences deranged)."""
    extra = {
        "pearson": {},
        "all": {"thresholds": ALL_MEASURES, "min_both": 1, "intervals": True},
        "null": {"null": True},
    }
    return {"min_pearson": MIN_PEARSON, **extra[query]}


def engine(home: str, name: str | None, query: str = "pearson") -> dict:
    """`featstore.stats.pair_stats` with one engine (None: its default) on a query (see
    `query_kwargs`), plus planted recall."""
    from featstore.stats.query import PairQuery, pair_stats

    store = open_store(home)
    kwargs = query_kwargs(query) | ({} if name is None else {"engine": name})
    start = time.perf_counter()
    # recompute: never reuse the pair sums an earlier measurement saved in the store
    found = pair_stats(store, PairQuery(*LAYERS, recompute=True, **kwargs))
    seconds = time.perf_counter() - start
    planted = pl.read_parquet(planted_path(home)).filter(
        (pl.col("kind") == "copy") & (pl.col("strength") >= 0.3)
    )
    hit = planted.join(found, on=["feature_a", "feature_b"], how="semi").height
    note = f"{found.height:,} pairs; planted copies found {hit}/{planted.height}"
    return {"seconds": seconds, "rows": found.height, "note": note}


def saving(home: str) -> dict:
    """`featstore.pairs.update_shard_pairs` of every shard (the `shard_pair_stats` asset's work):
    the default engine's shard pair sums computed and saved for later calls."""
    from featstore.stats import shardsums

    store = open_store(home)
    start = time.perf_counter()
    saved = [shardsums.update_shard_pairs(store, *LAYERS, s) for s in store.shards(LAYERS[0])]
    seconds = time.perf_counter() - start
    folders = [store.root_path / spec.pairs_path(*LAYERS, s.shard) for s in saved]
    size = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    for s in saved:  # the next measurement recomputes: no need to keep gigabytes
        store.delete_group(spec.pairs_path(*LAYERS, s.shard))
    note = f"{sum(s.nnz for s in saved):,} pairs saved, {size / 1e9:.2f} GB on disk"
    return {"seconds": seconds, "note": note}


MEASURES: dict[str, Callable[..., dict]] = {
    "dense": dense,
    "sparse": sparse,
    "engine": engine,
    "save": saving,
}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what a measurement may take without starving others."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**40


def child(spec: str) -> None:
    """Run one measurement and print it as JSON with this process's peak memory."""
    job = json.loads(spec)
    # Address-space cap: on a shared machine a measurement that outgrows it fails with a
    # MemoryError (reported) instead of waking the OOM killer.
    limit = job.pop("max_bytes")
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = MEASURES[job.pop("kind")](**job)
    result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def measure(kind: str, timeout: float, repeat: int = 1, **params) -> dict:
    """The median of `repeat` measurements, each in a fresh interpreter (progress on stderr):
    on shared cores single runs of a fraction of a second vary by 2x."""
    runs = sorted((_measure(kind, timeout, **params) for _ in range(repeat)), key=seconds_of)
    result = runs[(repeat - 1) // 2]
    if repeat > 1:
        low, high = runs[0]["seconds"], runs[-1]["seconds"]
        result["note"] += f"; median of {repeat} runs ({low:.2f}-{high:.2f}s)"
    print(f"  {kind} {params}: {result['seconds']:.2f}s; {result['note']}", file=sys.stderr)
    return result


def seconds_of(result: dict) -> float:
    return result["seconds"]


def _measure(kind: str, timeout: float, **params) -> dict:
    """One measurement in a fresh interpreter; a timeout or crash becomes a note."""
    max_bytes = int(min(GOAL_MILLION_GB * 1e9, 0.85 * available_bytes()))
    spec = json.dumps({"kind": kind, "max_bytes": max_bytes, **params})
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", spec],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "note": f"stopped after {timeout:.0f}s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["?"]
        last = ([x for x in lines if "Error" in x] or lines)[-1]
        note = f"failed under a {max_bytes / 1e9:.0f} GB address-space cap: {last}"
        return {"seconds": float("nan"), "note": note}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------


def default_engine() -> str | None:
    """The engine `pair_stats` uses when none is named, or None without featstore.stats."""
    import inspect

    try:
        from featstore.stats import query
    except ImportError:
        return None
    return inspect.signature(query.pair_stats).parameters["engine"].default


def measure_size(n: int, args: argparse.Namespace, engines: list[str]) -> list[dict]:
    """Every method at `n` tokens; slow engines on a slice of `args.slice_tokens`, scaled."""
    home = synthetic_home(n)
    rows, cols = args.dense_slice if n > args.dense_full_max else (None, None)
    results = [
        {
            "method": "dense baseline",
            **measure("dense", args.timeout, args.repeat, home=str(home), rows=rows, cols=cols),
        },
        {"method": "scipy A.T @ B", **measure("sparse", args.timeout, args.repeat, home=str(home))},
    ]
    for name in engines:
        for query in args.queries if name == engines[0] else ():
            where = {"home": str(home), "name": name, "query": query}
            row = measure("engine", args.timeout, args.repeat, **where)
            results.append({**row, "method": f"engine {name}, {QUERY_NAMES[query]}"})
        on_slice = n > args.slice_tokens and name in args.slice_engines
        where = first_tokens(home, args.slice_tokens) if on_slice else home
        row = measure("engine", args.timeout, args.repeat, home=str(where), name=name)
        row["method"] = f"engine {name}"
        if on_slice:
            row["seconds"] *= n / args.slice_tokens
            row["note"] = (
                f"on {args.slice_tokens} tokens, time scaled x{n / args.slice_tokens:g}; "
                + row["note"]
            )
            row["peak_bytes"] = None  # a slice's memory says little about the full size
        results.append(row)
    if args.save and engines:
        row = measure("save", args.timeout, args.repeat, home=str(home))
        results.append({**row, "method": f"save shard sums ({engines[0]})"})
    for row in results:
        row["tokens"] = n
    return results


def table(results: list[dict]) -> str:
    """Markdown table with ratios against the dense and the bare sparse rows of each size."""
    lines = ["| tokens | method | seconds | peak RSS | dense / this | this / scipy | note |",
             "|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in results:
        same = [r for r in results if r["tokens"] == row["tokens"]]
        dense_s = next(r["seconds"] for r in same if r["method"] == "dense baseline")
        sparse_s = next(r["seconds"] for r in same if r["method"] == "scipy A.T @ B")
        peak = row.get("peak_bytes")
        if row["method"] == "dense baseline" and not row.get("exact"):
            peak_text = f"~{row['est_bytes'] / 1e9:.1f} GB (arrays)"
        else:
            peak_text = "-" if peak is None else f"{peak / 1e9:.2f} GB"
        seconds = row["seconds"]
        lines.append(
            f"| {row['tokens']:,} | {row['method']} | {seconds:.2f} | {peak_text} "
            f"| {dense_s / seconds:.1f}x | {seconds / sparse_s:.2f}x | {row['note']} |"
        )
    return "\n".join(lines)


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def goals(results: list[dict], default: str | None) -> list[str]:
    """Which goals the measured default engine meets: issue 3's three, then issue 7's (the
    same with every measure on; the null model at most one more pass than the query)."""
    out = []
    by = {(r["tokens"], r["method"]): r for r in results}
    name = f"engine {default}"
    for method in (name, f"{name}, {QUERY_NAMES['all']}"):
        label = "" if method == name else f" ({QUERY_NAMES['all']})"
        if (4096, method) in by:
            ratio = by[4096, "dense baseline"]["seconds"] / by[4096, method]["seconds"]
            goal = f"goal >= {GOAL_DENSE_SPEEDUP}x"
            ok = ratio >= GOAL_DENSE_SPEEDUP
            out.append(f"4,096 tokens{label}: {ratio:.0f}x faster than dense ({goal}): {met(ok)}")
        if (200_000, method) in by:
            ratio = by[200_000, method]["seconds"] / by[200_000, "scipy A.T @ B"]["seconds"]
            goal = f"goal <= {GOAL_SPARSE_SLOWDOWN}x"
            ok = ratio <= GOAL_SPARSE_SLOWDOWN
            out.append(
                f"200,000 tokens{label}: {ratio:.2f}x the bare sparse product ({goal}): {met(ok)}"
            )
    for n in sorted({r["tokens"] for r in results}):
        if (n, f"{name}, {QUERY_NAMES['null']}") in by and (n, name) in by:
            ratio = by[n, f"{name}, {QUERY_NAMES['null']}"]["seconds"] / by[n, name]["seconds"]
            goal = f"goal <= {GOAL_NULL_PASSES}x: one more statistics pass"
            ok = ratio <= GOAL_NULL_PASSES
            out.append(f"{n:,} tokens: the null model takes {ratio:.2f}x the query ({goal}): "
                       f"{met(ok)}")  # fmt: skip
    if (1_000_000, name) in by:
        row = by[1_000_000, name]
        gb = (row.get("peak_bytes") or float("inf")) / 1e9
        ok = row["seconds"] < GOAL_MILLION_SECONDS and gb < GOAL_MILLION_GB
        goal = f"goal < {GOAL_MILLION_SECONDS}s and < {GOAL_MILLION_GB} GB"
        out.append(f"1,000,000 tokens: {row['seconds']:.0f}s, peak {gb:.1f} GB ({goal}): {met(ok)}")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4,096 and 20,000 tokens, small slices")
    p.add_argument("--million", action="store_true", help="the default engine on 1,000,000 tokens")
    p.add_argument("--engines", nargs="*", default=None, help="default: sparse duckdb polars")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--no-save", dest="save", action="store_false", help="skip the save row")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="only these sizes")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement (the median)")
    p.add_argument(
        "--all-measures",
        action="store_true",
        help="also the first engine with every measure on, and on the null model (issue 7)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [1_000_000] if args.million else [4096, 20_000 if args.quick else 200_000]
    args.sizes = args.tokens or args.sizes
    args.dense_full_max = 0 if args.quick else 4096  # sizes up to this run the dense baseline whole
    args.dense_slice = (4096, 1024) if args.quick else (16384, 2048)
    args.slice_tokens = 20_000
    args.slice_engines = {"duckdb", "polars"}
    args.queries = ["all", "null"] if args.all_measures else []
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(args.child)
        return 0
    default = default_engine()
    engines = args.engines if args.engines is not None else ["sparse", "duckdb", "polars"]
    if default is None:
        print("featstore.stats is missing: measuring the baselines only")
        engines = []
    elif args.million:
        engines = [default]
        args.save = False
    load_before = os.getloadavg()[0]
    results = []
    for n in args.sizes:
        results += measure_size(n, args, engines)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; 1-minute load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other processes share the cores)")  # fmt: skip
    mode = "million" if args.million else "quick" if args.quick else "full"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results-{mode}.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(*goals(results, default), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
