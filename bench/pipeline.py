"""Every stage of the pipeline at the users' size: wall time and peak memory per stage, projected.

    flock /tmp/featstore-heavy.lock .venv/bin/python bench/pipeline.py --source gpt2-random \
        --tokens 16384 32768 [--cache DIR] [--results runs.json]

For each token count N (tokens per layer), a fresh store is filled by `featstore.stages` in
order (extraction, per-shard sums, statistics, graph, plots, decoder cosine, concepts,
comparison, cards, causal edges, erasure); each stage runs in a fresh subprocess, so its peak
resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`, reported by the stage's own process) is its
own. Text: Python's standard library sources (featstore.sources.train_tiny's corpus), cut into
shards of `--shard-tokens` tokens each. With two token counts, each stage's time and memory are
projected to 10^6 and 10^7 tokens by the power law through the two measurements
(t = t1 * (N / N1)^k, k = log(t2 / t1) / log(N2 / N1)); a stage over 16 GB peak is marked.

A generated source (`gpt2-random`) is built on first use into `--cache` (FEATSTORE_CACHE); when
it is not there yet, that is timed first as its own row (`source`, once: it does not grow with
tokens). `--results FILE` keeps each token count's rows, so that two counts can be measured in
two runs (each under the heavy lock's time limit) and the table printed with both; `--work DIR`
keeps the stores, so that one count's stages can be split over runs (`--stages`): rows of a
stage run again replace its earlier row.
The costly analyses run on fixed samples (`--causal-edges`, ...; see `Plan`): their cost is per
edge or sequence asked, not per token stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from featstore.defaults import STEER_BATCH
from featstore.stages import STAGES, Plan

LIMIT_GB = 16.0
PROJECT = (10**6, 10**7)
SEQ_LEN = 128


def write_text(folder: Path, tokens: int, shard_tokens: int) -> int:
    """Text shards of about `shard_tokens` tokens (tiny tokenizer: ~3 bytes a token) from the
    stdlib corpus; returns the number of shards. Extraction then caps each at its sequences."""
    from featstore.sources.train_tiny import build_corpus

    corpus = build_corpus()
    files = iter(sorted({**corpus.train, **corpus.heldout}.items()))
    shards = math.ceil(tokens / shard_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        parts, size = [], 0
        while size < 4 * shard_tokens:  # enough bytes for the shard's sequences, with room
            text = next(files)[1]
            parts.append(text)
            size += len(text)
        (folder / f"shard-{k:03d}.txt").write_text("\n\n".join(parts), encoding="utf-8")
    return shards


def run_stage(name: str, home: Path, plan: Plan) -> dict:
    """One stage in a fresh process: its wall time, peak RSS and what it made."""
    out = home / f".bench-{name}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--home", str(home),
           "--plan", json.dumps(asdict(plan))]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"stage": name, "seconds": seconds, "peak_gb": math.nan, "made": f"FAILED: {tail}"}
    return {"stage": name, "seconds": seconds, **json.loads(out.read_text())}


def stage_main(name: str, home: str, plan_json: str) -> None:
    """Inside the stage's process: run it, write its peak RSS and description."""
    from featstore.store.home import open_store

    plan = Plan(**{**json.loads(plan_json), "layers": tuple(json.loads(plan_json)["layers"])})
    if name == "source":  # the generated source, built on first use (not a store stage)
        Path(home).mkdir(parents=True, exist_ok=True)
        made = generate_source(plan.source)
    else:
        made = STAGES[name](open_store(home, create=True), plan)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    Path(home, f".bench-{name}.json").write_text(json.dumps({"peak_gb": peak, "made": made}))


def generate_source(name: str) -> str:
    """The source's model folder, generated first when it is not in the cache."""
    from featstore.sources.registry import get_source

    source = get_source(name)
    if source.model["kind"] != "generated":
        return f"{name}: not generated"
    return f"{name}: {source.embedded_model_folder().parent}"


def source_cached(name: str) -> bool:
    from featstore.sources import generated
    from featstore.sources.registry import get_source

    source = get_source(name)
    if source.model["kind"] != "generated":
        return True
    return any((p / generated.DONE).exists() for p in generated.cache_root().glob(f"{name}-*"))


def run_all(
    tokens: int, args: argparse.Namespace, root: Path, keep=lambda rows: None
) -> list[dict]:
    text = root / f"text-{tokens}"
    per_shard = min(tokens, args.shard_tokens)
    if not text.exists():  # a kept --work folder continues with its text and store
        write_text(text, tokens, per_shard)
    plan = Plan(source=args.source, text_dir=str(text), max_sequences=per_shard // SEQ_LEN,
                seq_len=SEQ_LEN, device=args.device, causal_sequences=args.causal_sequences,
                causal_edges=args.causal_edges, causal_random=args.causal_random,
                causal_attribution=not args.causal_no_attribution,
                erasure_sequences=args.erasure_sequences, steer_batch=args.steer_batch,
                stats_min_pearson=args.stats_min_pearson)  # fmt: skip
    home = root / f"home-{tokens}"
    rows = []
    for name in args.stages:
        rows.append(run_stage(name, home, plan))
        keep(rows)  # a run stopped by a time limit keeps the stages it finished
        r = rows[-1]
        print(f"  {tokens:>9,} {name:<15} {r['seconds']:8.1f} s {r['peak_gb']:6.2f} GB  "
              f"{r['made']}",
              flush=True)
    return rows


def ordered(rows: list[dict]) -> list[dict]:
    """Rows in the pipeline's order of stages."""
    order = ["source", *STAGES]
    return sorted(rows, key=lambda r: order.index(r["stage"]))


def projected(v1: float, v2: float, n1: int, n2: int, n: int) -> float:
    """v at n on the power law through (n1, v1) and (n2, v2)."""
    if not (v1 > 0 and v2 > 0):
        return math.nan
    return v1 * (n / n1) ** (math.log(v2 / v1) / math.log(n2 / n1))


def table(runs: dict[int, list[dict]]) -> str:
    counts = sorted(runs)
    done = set.intersection(*({r["stage"] for r in rows} for rows in runs.values()))
    runs = {n: [r for r in rows if r["stage"] in done] for n, rows in runs.items()}
    head = ["stage"] + [f"{n:,} tok: s / GB" for n in counts]
    if len(counts) >= 2:
        head += [f"10^{round(math.log10(n))} tok: s / GB (projected)" for n in PROJECT]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(r["stage"] for r in runs[counts[0]]):
        rows = [runs[n][i] for n in counts]
        cells = [f"{r['seconds']:.1f} / {r['peak_gb']:.2f}" for r in rows]
        if len(counts) >= 2:
            (n1, a), (n2, b) = (counts[-2], rows[-2]), (counts[-1], rows[-1])
            for n in PROJECT:
                s = projected(a["seconds"], b["seconds"], n1, n2, n)
                gb = projected(a["peak_gb"], b["peak_gb"], n1, n2, n)
                mark = " (over 16 GB)" if gb > LIMIT_GB else ""
                cells.append(f"{s:,.0f} / {gb:.1f}{mark}")
        failed = [r["made"] for r in rows if r["made"].startswith("FAILED")]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" ({failed[0]})" if failed else "")
                     + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="gpt2-random")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768],
                   help="tokens per layer; two or more for projections")
    p.add_argument("--shard-tokens", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="of extraction, causal edges and erasure")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--work", default=None,
                   help="folder keeping the stores (home-N), so that a later run with --stages "
                        "continues them (default: a temporary folder, deleted)")
    p.add_argument("--cache", default=None, help="FEATSTORE_CACHE: where a generated source is")
    p.add_argument("--results", default=None, help="JSON file keeping every token count's rows")
    p.add_argument("--causal-sequences", type=int, default=1, help="per shard")
    p.add_argument("--causal-edges", type=int, default=10, help="graph edges per layer pair")
    p.add_argument("--causal-random", type=int, default=5, help="random pairs per layer pair")
    p.add_argument("--causal-no-attribution", action="store_true",
                   help="causal edges by exact patching only (no attribution estimate)")
    p.add_argument("--stats-min-pearson", type=float, default=None,
                   help="the statistics stage writes only pairs reaching it (default: every "
                        "co-active pair)")
    p.add_argument("--erasure-sequences", type=int, default=4, help="per shard")
    p.add_argument("--steer-batch", type=int, default=STEER_BATCH,
                   help="sequences per forward pass of steering")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        return stage_main(args.stage, args.home, args.plan)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.cache:
        os.environ["FEATSTORE_CACHE"] = args.cache
    saved = Path(args.results) if args.results else None
    runs = {int(n): rows for n, rows in json.loads(saved.read_text()).items()} if (
        saved and saved.exists()) else {}  # fmt: skip
    if not source_cached(args.source):
        with tempfile.TemporaryDirectory() as root:
            row = run_stage("source", Path(root), Plan(source=args.source))
        print(f"  {'':>9} {'source':<15} {row['seconds']:8.1f} s {row['peak_gb']:6.2f} GB  "
              f"{row['made']}", flush=True)  # fmt: skip
        runs.setdefault(0, []).append(row)
    with contextlib.ExitStack() as stack:
        root = args.work or stack.enter_context(tempfile.TemporaryDirectory())
        for n in sorted(args.tokens):

            before = [r for r in runs.get(n, []) if r["stage"] not in args.stages]

            def keep(rows: list[dict], n: int = n, before: list = before) -> None:
                if saved:
                    saved.write_text(json.dumps({**runs, n: ordered(before + rows)}, indent=1))

            runs[n] = ordered(before + run_all(n, args, Path(root), keep))
    print(table({n: rows for n, rows in runs.items() if n > 0}))


if __name__ == "__main__":
    main()
