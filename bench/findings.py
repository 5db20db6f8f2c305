"""Every findings analysis at the users' size: wall time and peak memory, each in a fresh process.

    flock /tmp/featstore-heavy.lock nice -n 5 .venv/bin/python bench/findings.py \
        --home /work/scratch/findings/u200k --make --tokens 50000 --shards 4

With `--make`, `featstore synth` first writes a store of 24,576 features a layer (layers 6-9,
`--shards` shards of `--tokens` tokens, planted pass-through chains, AND/OR gates and vanishing
features: `featstore.sources.planted`). Then each analysis runs in its own subprocess, whose peak
resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`, its own) and wall time are reported with
what it found, and whether the planted structure was recovered (exactly for chains and gates;
the planted vanishing features among those found). `--stages` picks some; `findings` is the
whole `run_findings` (every row and table, each pass once), the others its parts and the
measure variants (relative threshold, BOS switch, cosine) on one layer pair.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

LAYERS = (6, 7, 8, 9)
PLANT = {"n_chains": 64, "n_gates": 32, "n_vanishing": 64}


def _planted(home: str) -> pl.DataFrame:
    return pl.read_parquet(Path(home) / "synthetic" / "structures.parquet")


def _links(frame: pl.DataFrame) -> set:
    return set(frame.select("layer_a", "feature_a", "layer_b", "feature_b").iter_rows())


def _gate_set(frame: pl.DataFrame) -> set:
    return set(frame.select("layer_b", "kind", "feature_b", "parent_1", "parent_2").iter_rows())


def _planted_gates(planted: pl.DataFrame) -> set:
    two = (
        planted.filter(pl.col("kind").is_in(["and", "or"]))
        .group_by("layer_b", "kind", "feature_b")
        .agg(parent_1=pl.col("feature_a").min(), parent_2=pl.col("feature_a").max())
    )
    return _gate_set(two)


def _vanishing_found(gone: pl.DataFrame, planted: pl.DataFrame) -> str:
    want = set(planted.filter(pl.col("kind") == "vanishing").select("layer_a", "feature_a")
               .iter_rows())  # fmt: skip
    got = set(gone.select("layer", "feature").iter_rows())
    return f"{len(got)} vanishing, planted {len(want & got)}/{len(want)} among them"


def stage_synth(home: str, args) -> str:
    from featstore.sources.synth import SynthConfig, generate_all
    from featstore.store.home import open_store

    cfg = SynthConfig(layers=LAYERS, n_tokens=args.tokens, **PLANT)
    edges = generate_all(open_store(home, create=True), cfg, args.shards)
    return f"{args.shards} x {args.tokens} tokens, {cfg.d_sae} features, {edges.height} edges"


def stage_c1_token_eta(store, home, out) -> str:
    from featstore.analysis.evidence import token_explained

    n = 0
    for layer in LAYERS:
        n += token_explained(store, layer, store.shards(layer)).height
        token_explained(store, layer, store.shards(layer), shuffle_seed=0)
    return f"eta^2 of {n} features (+ shuffled null)"


def stage_c1_concepts(store, home, out) -> str:
    """C1's concept AUROC at this size: a synthetic store has no vocabulary, so its token ids
    get stand-in texts (Python-like, seeded) in this process only; the cost is real, the
    AUROCs mean nothing."""
    import numpy as np

    from featstore.analysis.evidence import concept_auroc
    from featstore.sources.synth import VOCAB_SIZE

    pieces = np.array(["(", ")", ":", ",", ".", " =", " def", " if", "#", '"', "\n", " x",
                       " self", " 1", " None", "    ", " Foo", " BAR", " return", "'"])  # fmt: skip
    texts = np.random.default_rng(0).choice(pieces, VOCAB_SIZE).tolist()
    store.vocab = lambda: texts

    def whole(shard):  # `Store.sequences` refuses a partial last sequence (50,000 = 390.6 x 128)
        tokens = store.tokens(shard)["token"].to_numpy()
        return tokens[: tokens.size // 128 * 128].reshape(-1, 128)

    store.sequences = whole
    table = concept_auroc(store, LAYERS, store.shards(6), "python")
    return f"best AUROC of {table['concept'].n_unique()} concepts x {len(LAYERS)} layers " \
        "(stand-in texts for the synthetic token ids)"


def stage_gates(store, home, out) -> str:
    from featstore.analysis.gates import all_parent_sets, gates

    found = gates(all_parent_sets(store, LAYERS))
    ok = _gate_set(found) == _planted_gates(_planted(home))
    return f"{found.height} gates; planted gates recovered exactly: {ok}"


def stage_gates_null(store, home, out) -> str:
    from featstore.analysis.gates import all_parent_sets
    from featstore.stats.shardsums import Variant

    return f"{all_parent_sets(store, LAYERS, variant=Variant(null=True)).height} null parent sets"


def stage_best_partner(store, home, out) -> str:
    from featstore.stats.best import best_both

    sides = best_both(store, 6, 7, "pearson", min_both=2)
    return f"best Pearson partner of {int((sides['a'][1] >= 0).sum())} + " \
        f"{int((sides['b'][1] >= 0).sum())} features (6-7, both sides, one pass)"


def _cfg(**kw):
    from featstore.analysis.findings import FindingsConfig

    return FindingsConfig(layers=LAYERS, **kw)


def stage_c3_distance(store, home, out) -> str:
    from featstore.analysis.findings import best_pearson, distance_curve

    cfg = _cfg()
    shards = store.shards(6)
    curve = distance_curve(store, cfg, shards, best_pearson(store, cfg, shards), out)
    pooled = curve.filter(pl.col("start") == "all")["mean_best_pearson"].to_list()
    return "mean best Pearson at distance 1-3: " + ", ".join(f"{v:.3f}" for v in pooled)


def stage_pass_through(store, home, out) -> str:
    from featstore.analysis.passthrough import pass_through_links, run_pass_through
    from featstore.stats.shardsums import Variant

    paths = run_pass_through(store, LAYERS, out)
    links = pl.read_parquet(paths["pass_through"])
    null = pass_through_links(store, LAYERS, variant=Variant(null=True))
    want = _links(_planted(home).filter(pl.col("kind") == "pass"))
    return f"{links.height} links (null {null.height}); planted chains recovered " \
        f"{len(want & _links(links))}/{len(want)}, extra {len(_links(links) - want)}"


def stage_vanishing(store, home, out) -> str:
    from featstore.analysis.vanishing import run_vanishing

    gone = pl.read_parquet(run_vanishing(store, LAYERS, out)["vanishing"])
    return _vanishing_found(gone, _planted(home))


def stage_convergence(store, home, out) -> str:
    from featstore.analysis.convergence import run_convergence

    frame = pl.read_parquet(run_convergence(store, LAYERS, out)["convergence"])
    first = frame.filter((pl.col("measure") == "pearson") & (pl.col("layer_a") == 6))
    return "6-7 pearson >= 0.5 pairs by prefix: " + " -> ".join(
        f"{n} ({r:.2f} found)" for n, r in zip(first["pairs_above"], first["recovered"],
                                               strict=True)
    )  # fmt: skip


def _query(store, **kw) -> str:
    from featstore.stats.query import PairQuery, pair_stats

    frame = pair_stats(store, PairQuery(6, 7, save=False, **kw))
    return f"{frame.height} pairs (6-7)"


def stage_relative_threshold(store, home, out) -> str:
    from featstore.stats.shardsums import Variant

    v = Variant(relative_threshold=0.2)
    return _query(store, thresholds={"jaccard": 0.5}, min_both=2, variant=v) + \
        " with jaccard >= 0.5, active > 0.2 x max"


def stage_bos(store, home, out) -> str:
    from featstore.stats.shardsums import Variant

    return _query(store, min_pearson=0.5, variant=Variant(bos=False)) + \
        " with pearson >= 0.5, BOS left out"


def stage_cosine(store, home, out) -> str:
    return _query(store, thresholds={"cosine": 0.5}, min_both=2) + " with cosine >= 0.5"


def stage_findings(store, home, out) -> str:
    from featstore.analysis.findings import run_findings

    frame, paths = run_findings(store, _cfg(), out)
    verdicts = ", ".join(f"{c} {v}" for c, v in zip(frame["conjecture"], frame["verdict"],
                                                      strict=True))  # fmt: skip
    links = _links(pl.read_parquet(paths["pass_through"]))
    want = _links(_planted(home).filter(pl.col("kind") == "pass"))
    gates_ok = _gate_set(pl.read_parquet(paths["gates"])) == _planted_gates(_planted(home))
    return f"{verdicts}; chains {len(want & links)}/{len(want)} (+{len(links - want)}), " \
        f"gates exact: {gates_ok}"


STAGES = {name.removeprefix("stage_"): fn for name, fn in globals().items()
          if name.startswith("stage_") and name != "stage_synth"}  # fmt: skip


def child(name: str, home: str, args) -> None:
    """Inside the stage's process: run it, print its peak RSS and what it made as JSON."""
    if name == "synth":
        made = stage_synth(home, args)
    else:
        from featstore.store.home import open_store

        out = Path(home) / "bench-findings" / name
        out.mkdir(parents=True, exist_ok=True)
        made = STAGES[name](open_store(home), home, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"peak_gb": peak, "made": made}))


def run(name: str, home: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--home", home,
           "--tokens", str(args.tokens), "--shards", str(args.shards)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"stage": name, "seconds": seconds, "peak_gb": float("nan"),
                "made": f"FAILED {tail}"}  # fmt: skip
    return {"stage": name, "seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--home", required=True, help="the store (written with --make)")
    p.add_argument("--make", action="store_true", help="write the synthetic store first")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens per shard (--make)")
    p.add_argument("--shards", type=int, default=4, help="shards (--make)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.home, args)
    names = (["synth"] if args.make else []) + args.stages
    print("| analysis | wall s | peak GB | found |\n|---|---:|---:|---|", flush=True)
    for name in names:
        r = run(name, args.home, args)
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['made']} |",
              flush=True)


if __name__ == "__main__":
    main()
