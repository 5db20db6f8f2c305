"""The `featstore` command: thin wrappers over the library, errors in one line with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from featstore.defaults import (
    AGREEMENT_THRESHOLD,
    CAUSAL_SEQUENCES,
    DEFAULT_ENGINE,
    DEFAULT_MEASURE,
    DEFAULT_SOURCE,
    EDGE_THRESHOLD,
    ENGINES,
    GRAPHML_MAX_EDGES,
    MIN_BOTH,
    MIN_EFFECT,
    NULL_SHIFTS,
    SERVE_HOST,
    SERVE_PORT,
)
from featstore.errors import FeatstoreError

if TYPE_CHECKING:  # each command imports what it needs, so `featstore sql` starts fast
    from featstore.store.local import Store

if TYPE_CHECKING:
    from featstore.stats.shardsums import Variant

Command = Callable[[argparse.Namespace], int]
SOURCE_LAYERS = "default: the source's layers (sources.yaml)"
STORE_LAYERS = "default: every layer in the store"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FeatstoreError(f"{self.prog}: {message}")


def progress(line: str) -> None:
    """Long steps report here: stderr (stdout stays the command's result), when it is a terminal
    or FEATSTORE_PROGRESS=1 asks (a script reading stderr gets only the one-line errors)."""
    if os.environ.get("FEATSTORE_PROGRESS", "") == "1" or sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)


def layer_number(text: str) -> int:
    """A layer: an integer in 0 .. 2^31 - 1 (layers are int32 in SQL)."""
    try:
        layer = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number, got {text!r}") from None
    if not 0 <= layer <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"layer {layer} outside 0 .. 2^31-1")
    return layer


def positive(text: str) -> int:
    """A count of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def out_path(text: str) -> str:
    """An output path: not empty (`atomic_file` refuses replacing anything but a file)."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def feature_range(text: str) -> tuple[int, int]:
    """`LO:HI` as a half-open range."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"empty or negative feature range {text!r}")
    return lo, hi


# -- commands ------------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from featstore.store.ingest import ingest_npz

    report = ingest_npz(
        args.home,
        args.file,
        layer=args.layer,
        shard=args.shard,
        tokens_file=args.tokens,
        url=args.store_url,
    )
    print(report)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from featstore.sources.extract import ExtractConfig, extract_all

    cfg = ExtractConfig.of(args)
    for report in extract_all(_open(args, create=True), cfg, shards=args.shards):
        print(report.summary())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    store = _open(args)
    for layer in store.layers():
        for shard in store.shards(layer):
            info = store.info(layer, shard)
            print(f"layer {layer} shard {shard}: {info['shape'][0]} tokens, {info['nnz']} nonzeros")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from featstore.sources.synth import SynthConfig, generate_all, planted_path

    cfg = SynthConfig.of(args)
    edges = generate_all(_open(args, create=True), cfg, args.shards, log=print)
    print(f"{edges.height} planted edges in {planted_path(args.home)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from featstore.store.check import check_store

    problems = check_store(_open(args))
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) found" if problems else "store is sound")
    return 1 if problems else 0


def sql_param(text: str) -> tuple[str, int | float | str]:
    """`NAME=VALUE` for a `$NAME` in a query; VALUE is an integer, a float, else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def cmd_sql(args: argparse.Namespace) -> int:
    import dataclasses

    from featstore.store import sql
    from featstore.store.sqlguard import Limits
    from featstore.tables import render_rows

    if (args.query is None) == (args.file is None):
        raise FeatstoreError("give either a QUERY or --file FILE")
    text = args.query if args.file is None else sql.query_text(args.file)
    limits = Limits()
    if args.timeout is not None:  # 0: no limit
        limits = dataclasses.replace(limits, timeout=args.timeout or None)
    if args.memory_limit is not None:
        limits = dataclasses.replace(limits, memory_limit=args.memory_limit)
    columns, rows, float32 = sql.rows(
        args.home, text, dict(args.param) or None, limits, args.store_url
    )
    print(render_rows(columns, rows, args.format, float32))
    return 0


def metric_name(text: str) -> str:
    """A measure of docs/MEASURES.md (the measures are imported only when one is named)."""
    from featstore.stats.measures import RANGES

    if text not in RANGES:
        raise argparse.ArgumentTypeError(
            f"unknown metric {text!r} (choose from {', '.join(RANGES)})"
        )
    return text


def measure_value(text: str) -> tuple[str, float]:
    """`MEASURE=VALUE`, e.g. `sufficiency=0.9`."""
    name, sep, value = text.partition("=")
    try:
        return name, float(value if sep else "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEASURE=VALUE, got {text!r}") from None


def variant_metadata(variant: Variant) -> dict[str, str]:
    """The statistics' variant (thresholds, BOS, null) as a Parquet file's metadata."""
    import json

    return {"featstore.variant": json.dumps(variant.describe())}


def cmd_stats(args: argparse.Namespace) -> int:
    from collections import Counter

    import polars as pl

    from featstore import settings
    from featstore.analysis import decoders
    from featstore.files import write_parquet_atomic, write_parquet_frames
    from featstore.stats import measures, query
    from featstore.stats.shardsums import Variant

    store = _open(args)
    q = query.PairQuery.of(args, variant=settings.of(Variant, args))
    if args.never_coactive is not None:
        shards = query.shards_of_pair(store, *q.layers, q.shards)
        listed, total = measures.never_coactive_pairs(
            store, *q.layers, *args.never_coactive, shards=shards, variant=q.variant
        )
        write_parquet_atomic(listed, args.out, variant_metadata(q.variant))
        print(f"{total} never-co-active pairs reach {'='.join(map(str, args.never_coactive))}")
        print(f"wrote {listed.height} pairs to {args.out}")
        return 0
    blocks = query.pair_blocks(store, q, progress=progress)
    cosines = (
        decoders.store_decoder_cosine(store, *q.layers, args.decoder_cosine)
        if args.decoder_cosine
        else None
    )
    counts: Counter[str] = Counter()

    def frames() -> Iterator[pl.DataFrame]:  # block by block: a whole table is never held
        for frame, block_counts in blocks:
            counts.update(block_counts)
            yield frame if cosines is None else frame.join(
                cosines, on=["feature_a", "feature_b"], how="left"
            )

    rows = write_parquet_frames(frames(), args.out, variant_metadata(q.variant))
    print(query.describe_counts(counts, q))
    print(f"wrote {rows} pairs to {args.out}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from featstore.analysis.graph import export_graph

    store = _open(args)
    summary = export_graph(
        store,
        args.out,
        layers=args.layers or store.layers(),
        metric=args.metric,
        threshold=args.threshold,
        engine=args.engine,
        min_both=args.min_both,
        graphml_max_edges=args.graphml_max_edges,
    )
    pairs = ", ".join(f"{k}: {n}" for k, n in summary["edges_per_pair"].items())
    print(f"{summary['edges']} edges ({pairs or 'none'}), {summary['nodes']} nodes")
    held = summary["graphml"]
    if held["strongest_only"]:
        print(f"graph.graphml holds the {held['edges']} strongest edges (--graphml-max-edges)")
    print(f"wrote edges.parquet, nodes.parquet, summary.json and graph.graphml to {args.out}")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from featstore.analysis.plots import plot_store

    store = _open(args)
    paths = plot_store(
        store,
        args.out,
        layers=args.layers or store.layers(),
        threshold=args.threshold,
        agreement_threshold=args.agreement_threshold,
        features=args.features,
        n_edges=args.edges,
        engine=args.engine,
    )
    for path in paths:
        print(f"wrote {path}")
    return 0


def load_model_and_saes(source: str, layers: Sequence[int], device: str):
    """The source's model and SAEs; missing files become one line."""
    from featstore.sources.extract import ExtractConfig
    from featstore.sources.extract import load_model_and_saes as load

    try:
        return load(ExtractConfig(source=source, layers=tuple(layers), device=device))
    except OSError as exc:
        raise FeatstoreError(f"cannot load the model or SAEs of source {source}: {exc}") from None


def cmd_patch(args: argparse.Namespace) -> int:
    import polars as pl

    from featstore import settings
    from featstore.analysis.asked import EdgeChoice
    from featstore.analysis.causal import CausalConfig, run_causal
    from featstore.sources.registry import default_layers
    from featstore.tables import render

    choice = settings.of(EdgeChoice, args)
    cfg = settings.of(
        CausalConfig,
        args,
        layers=tuple(args.layers or default_layers(args.source)),
        edges=choice,
        attribution=not args.no_attribution,
    )
    store = _open(args)
    model, saes = load_model_and_saes(args.source, cfg.layers, args.device)
    paths = run_causal(store, model, saes, cfg, progress=progress)
    print(render(pl.read_parquet(paths["comparison"])))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def store_source(store, layer: int) -> str:
    """The source a layer's activations were extracted with (tiny when unrecorded)."""
    from featstore.analysis.decoders import store_source

    return store_source(store, layer)


def cmd_concepts(args: argparse.Namespace) -> int:
    from pathlib import Path

    import polars as pl

    from featstore.analysis.concepts import default_set, run_concepts
    from featstore.analysis.graph import EDGE_KEYS, store_edge_blocks

    store = _open(args)
    layers = sorted(args.layers or store.layers())
    concept_set = args.set or default_set(store_source(store, layers[0]))
    # Only the edges' four key columns are held, block by block as the statistics yield them.
    blocks = store_edge_blocks(store, layers, metric=args.metric, threshold=args.threshold)
    graph = pl.concat([block.select(list(EDGE_KEYS)) for block in blocks])
    out = Path(args.out) if args.out else store.home / "concepts"
    paths = run_concepts(
        store, concept_set, layers, graph, out, shards=args.shards,
        max_sequences=args.max_sequences, top=args.top, beam=args.beam,
    )  # fmt: skip
    print(f"concept set {concept_set}: wrote {len(paths)} files to {out}")
    return 0


def cmd_feature(args: argparse.Namespace) -> int:
    from featstore.analysis import cards

    store = _open(args)
    layer, feature = cards.parse_key(args.key)
    card = cards.feature_card(
        store, layer, feature, top=args.top, partners=args.partners, sort_by=args.sort_by,
        min_both=args.min_both,
    )  # fmt: skip
    print(cards.card_text(card))
    if args.html:
        from featstore.files import atomic_file

        with atomic_file(args.html) as tmp:
            tmp.write_text(cards.card_html(card), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    import polars as pl

    from featstore.analysis.cards import parse_key
    from featstore.analysis.steering import SteerConfig, run_steering
    from featstore.tables import render

    keys = [parse_key(k) for k in args.features]
    layers = {layer for layer, _ in keys}
    if len(layers) != 1:
        raise FeatstoreError(f"steer features of one layer at a time, got layers {sorted(layers)}")
    (layer,) = layers
    cfg = SteerConfig(layer, tuple(f for _, f in keys), args.k, tuple(args.targets), args.top)
    store = _open(args)
    model, saes = load_model_and_saes(args.source, (layer, *cfg.targets), args.device)
    paths = run_steering(store, model, saes, cfg, args.max_sequences)
    print(render(pl.read_parquet(paths["summary"])))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from featstore.analysis.cards import parse_key
    from featstore.explorer import app
    from featstore.explorer.reads import check_measure_name

    app.check_port(args.port)
    check_measure_name(args.measure)
    if args.null_shifts < 2:
        raise FeatstoreError(f"--null-shifts must be at least 2, got {args.null_shifts}")
    keys = [parse_key(k) for k in args.features or []]
    store = _open(args)
    if args.export:
        paths = app.export(store, args.export, keys, n=args.n, measure=args.measure,
                           null_shifts=args.null_shifts)  # fmt: skip
        print(f"wrote {len(paths)} pages to {args.export} (open index.html)")
        return 0
    print(f"featstore explorer on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    app.serve(store, args.host, args.port, args.null_shifts)
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    from featstore.analysis import logits

    store = _open(args)
    frame = logits.store_logit_effects(store, args.layers or store.layers(), k=args.k)
    path = logits.write_logit_effects(store, frame)
    print(f"wrote {frame.height} rows to {path}")
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featstore import settings
    from featstore.analysis.findings import FindingsConfig, run_findings
    from featstore.store.spec import FINDINGS_DIR
    from featstore.tables import render

    store = _open(args)
    layers = tuple(sorted(args.layers or store.layers()))
    shards = tuple(args.shards) if args.shards else None
    cfg = settings.of(FindingsConfig, args, layers=layers, shards=shards)
    cfg.checked_shards(store)  # before a model is loaded or anything written
    model, saes = None, None
    if args.model:
        model, saes = load_model_and_saes(
            args.source or store_source(store, layers[0]), layers, args.device
        )
    out = Path(args.out) if args.out else store.home / FINDINGS_DIR
    frame, paths = run_findings(store, cfg, out, model, saes)
    print(render(frame.select("conjecture", "statistic", "effect", "effect_lo", "effect_hi",
                              "verdict")))  # fmt: skip
    print(f"wrote {len(paths)} files to {out} (the page: {paths['findings_page'].name})")
    return 0


def cmd_convergence(args: argparse.Namespace) -> int:
    from pathlib import Path

    import polars as pl

    from featstore.analysis.convergence import FRACTIONS, MIN_BOTH, THRESHOLDS, run_convergence
    from featstore.store.spec import FINDINGS_DIR
    from featstore.tables import render

    store = _open(args)
    out = Path(args.out) if args.out else store.home / FINDINGS_DIR
    paths = run_convergence(
        store, args.layers or store.layers(), out, fractions=args.fractions or FRACTIONS,
        thresholds=dict(args.thresholds) or THRESHOLDS,
        min_both=MIN_BOTH if args.min_both is None else args.min_both, shards=args.shards,
    )  # fmt: skip
    print(render(pl.read_parquet(paths["convergence"]).drop("layer_b", "token_share")))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _open(args: argparse.Namespace, create: bool = False) -> Store:
    from featstore.store.home import open_store

    return open_store(args.home, create=create, url=args.store_url)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="featstore", description=__doc__)
    parser.add_argument(
        "--home", default=None, help="store home (default $FEATSTORE_HOME or ./featstore-data)"
    )
    parser.add_argument(
        "--store-url",
        default=None,
        help="fsspec URL of the Zarr store, e.g. s3://bucket/store.zarr (default "
        "$FEATSTORE_STORE_URL, else store.zarr in the home); fsspec options as JSON in "
        "$FEATSTORE_STORAGE_OPTIONS",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("ingest", help="import activations from a scipy sparse .npz")
    p.add_argument("file")
    p.add_argument("--layer", type=layer_number, required=True)
    p.add_argument("--shard", required=True)
    p.add_argument("--tokens", default=None, help="optional .npz/.parquet token table")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("extract", help="run the model and SAEs over text shards")
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=SOURCE_LAYERS)
    p.add_argument("--seq-len", type=positive, default=128)
    p.add_argument("--batch-size", type=positive, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--text-dir", default=None)
    p.add_argument("--max-sequences", type=positive, default=None)
    p.add_argument("--shards", nargs="*", default=None)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("info", help="list the stored layers and shards")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="write synthetic activations with planted relations")
    p.add_argument("--tokens", dest="n_tokens", type=positive, required=True,
                   help="tokens per shard")  # fmt: skip
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=SOURCE_LAYERS)
    p.add_argument("--d-sae", type=positive, default=None, help="default: GPT-2 small's width")
    p.add_argument("--shards", type=positive, default=1, help="number of shards (synth-000, ...)")
    p.add_argument("--l0", type=float, default=None, help="mean active features per token")
    p.add_argument("--planted", dest="n_planted", type=int, default=None,
                   help="relations per layer pair")  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chains", dest="n_chains", type=int, default=None,
                   help="pass-through chains through every layer (planted)")  # fmt: skip
    p.add_argument("--gates", dest="n_gates", type=int, default=None,
                   help="AND gates and OR gates, each, per layer pair (planted)")  # fmt: skip
    p.add_argument("--vanishing", dest="n_vanishing", type=int, default=None,
                   help="features per layer (not the last) nothing follows")  # fmt: skip
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check", help="verify a whole store; exit 1 listing every problem")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sql", help="run a read-only SQL query over the store (DuckDB)")
    p.add_argument("query", nargs="?", default=None, help="SELECT over activations, tokens, ...")
    p.add_argument("--file", default=None, help="query file, or the name of one in sql/")
    p.add_argument(
        "-p",
        "--param",
        type=sql_param,
        action="append",
        default=[],
        help="NAME=VALUE bound to $NAME in the query (repeatable)",
    )
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument(
        "--timeout", type=float, default=None, help="stop the query after this many seconds "
        "(0: no limit; default: featstore.store.sqlguard.DEFAULT_TIMEOUT, 300)"
    )  # fmt: skip
    p.add_argument(
        "--memory-limit", default=None, help="DuckDB's memory limit, e.g. 8GB (default: "
        "sqlguard.DEFAULT_MEMORY_LIMIT, 4GB; beyond it a query spills into the home or fails)"
    )  # fmt: skip
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("stats", help="exact pair statistics of two layers' features")
    p.add_argument("--layer-a", type=layer_number, required=True)
    p.add_argument("--layer-b", type=layer_number, required=True)
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    p.add_argument("--shards", nargs="+", default=None, help="default: every shard")
    p.add_argument("--min-pearson", type=float, default=None)
    p.add_argument("--min-jaccard", type=float, default=None)
    p.add_argument("--features-a", type=feature_range, default=None, metavar="LO:HI")
    p.add_argument("--features-b", type=feature_range, default=None, metavar="LO:HI")
    p.add_argument("--all-pairs", action="store_true", help="also never-co-active pairs")
    p.add_argument(
        "--min",
        dest="thresholds",
        type=measure_value,
        action="append",
        default=[],
        metavar="M=V",
        help="keep pairs with measure M >= V (any of docs/MEASURES.md; repeatable)",
    )
    p.add_argument("--min-both", type=int, default=0, help="keep pairs co-active on >= N tokens")
    p.add_argument("--intervals", action="store_true", help="add 95%% interval columns")
    p.add_argument("--active-threshold", type=float, default=0.0, help="active means > this")
    p.add_argument(
        "--relative-threshold",
        type=float,
        default=0.0,
        metavar="R",
        help="active means > R x the feature's maximum over the shards (spar-2024: 0.2)",
    )
    p.add_argument("--no-bos", dest="bos", action="store_false",
                   help="leave out each sequence's first position")  # fmt: skip
    p.add_argument("--null", action="store_true", help="null model: b's sequences deranged")
    p.add_argument(
        "--decoder-cosine",
        type=int,
        default=0,
        metavar="K",
        help="add decoder_cosine where among each feature's top K",
    )
    p.add_argument(
        "--never-coactive",
        type=measure_value,
        default=None,
        metavar="M=V",
        help="instead: list the never-co-active pairs with measure M >= V",
    )
    p.add_argument(
        "--save",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the merged table to HOME/pair_stats (default: only without thresholds, "
        "ranges or shards)",
    )
    p.add_argument(
        "--keep-shard-sums",
        dest="keep_sums",
        action="store_true",
        help="also keep each shard's pair sums, so a later call skips those shards "
        "(a cache tens of times the activations' size)",
    )
    p.add_argument("--out", type=out_path, required=True, help="Parquet file of the pairs passing")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("graph", help="cross-layer feature graph: GraphML, Parquet edges, summary")
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=STORE_LAYERS)
    p.add_argument("--metric", type=metric_name, default="pearson", help="any measure")
    p.add_argument("--threshold", type=float, default=EDGE_THRESHOLD,
                   help="edges where metric >= this")  # fmt: skip
    p.add_argument("--min-both", type=int, default=MIN_BOTH, help="edges co-active on >= N tokens")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    p.add_argument("--graphml-max-edges", type=positive, default=GRAPHML_MAX_EDGES,
                   help="graph.graphml holds the N strongest edges at most (edges.parquet all)")
    p.add_argument("--out", type=out_path, required=True,
                   help="folder for edges.parquet, nodes.parquet, graph.graphml, ...")  # fmt: skip
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("plots", help="PNG figures of the pair statistics of adjacent layers")
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=STORE_LAYERS)
    p.add_argument("--threshold", type=float, default=EDGE_THRESHOLD, help="Pearson, Jaccard")
    p.add_argument("--agreement-threshold", type=float, default=AGREEMENT_THRESHOLD)
    p.add_argument("--features", type=feature_range, default=(0, 100), metavar="LO:HI")
    p.add_argument("--edges", type=positive, default=60, help="strongest edges in graph.png")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    p.add_argument("--out", type=out_path, required=True, help="folder for the PNG files")
    p.set_defaults(func=cmd_plots)

    p = sub.add_parser("patch", help="causal edges by activation patching, vs correlation")
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="the model and SAEs the store was made with")  # fmt: skip
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=SOURCE_LAYERS)
    p.add_argument("--shards", nargs="+", default=None, help="default: every shard")
    p.add_argument("--max-sequences", type=positive, default=CAUSAL_SEQUENCES, help="per shard")
    p.add_argument("--features", type=int, nargs="+", default=None, help="source features")
    p.add_argument("--sample", choices=("graph", "bins"), default="graph",
                   help="measure the correlation graph's edges, or pairs stratified by bins")
    p.add_argument("--max-edges", type=int, default=None, help="graph: at most this many a pair")
    p.add_argument("--measure", default="jaccard", help="bins: the binned measure")
    p.add_argument("--bins", type=float, nargs="+", default=None,
                   help="bins: the bin edges (default 10 bins from 0.01 to 1.0)")
    p.add_argument("--per-bin", type=int, default=10, help="bins: pairs sampled per bin")
    p.add_argument("--random-pairs", type=int, default=100, help="random control pairs a pair")
    p.add_argument("--no-attribution", action="store_true", help="exact patching only")
    p.add_argument("--value", type=float, default=0.0, help="0 ablates; else clamp to this")
    p.add_argument("--min-effect", type=float, default=MIN_EFFECT,
                   help="|relative effect| of an edge")  # fmt: skip
    p.add_argument("--min-tokens", type=int, default=5, help="patched tokens of a causal edge")
    p.add_argument("--min-pearson", type=float, default=EDGE_THRESHOLD, help="a correlation edge")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("concepts", help="features detecting token-level concepts, traced by layer")
    p.add_argument("--set", default=None, help="concept set name or YAML (default: the source's)")
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=STORE_LAYERS)
    p.add_argument("--shards", nargs="+", default=None, help="default: every shard")
    p.add_argument("--max-sequences", type=positive, default=None, help="per shard")
    p.add_argument("--metric", choices=("pearson", "agreement", "jaccard"), default="pearson")
    p.add_argument("--threshold", type=float, default=EDGE_THRESHOLD, help="feature graph edges")
    p.add_argument("--top", type=positive, default=5,
                   help="best features kept per concept and layer")  # fmt: skip
    p.add_argument("--beam", type=positive, default=3, help="features followed per layer")
    p.add_argument("--out", type=out_path, default=None, help="folder (default: HOME/concepts)")
    p.set_defaults(func=cmd_concepts)

    p = sub.add_parser("feature", help="a feature's card: frequency, contexts, partners")
    p.add_argument("key", metavar="LAYER:ID", help="e.g. 7:123")
    p.add_argument("--top", type=positive, default=10, help="top-activating contexts shown")
    p.add_argument("--partners", type=positive, default=10,
                   help="predecessors and successors shown")  # fmt: skip
    p.add_argument("--sort-by", default="pearson", help="measure ranking the partners")
    p.add_argument("--min-both", type=int, default=MIN_BOTH, help="partners co-active >= N")
    p.add_argument("--html", type=out_path, default=None,
                   help="also write the card as a self-contained page")  # fmt: skip
    p.set_defaults(func=cmd_feature)

    p = sub.add_parser("steer", help="clamp features to k x their typical activation")
    p.add_argument("features", metavar="LAYER:ID", nargs="+", help="e.g. 7:123 7:40")
    p.add_argument("--k", type=float, default=5.0, help="clamp to k x the mean activation")
    p.add_argument("--targets", type=int, nargs="*", default=[], help="later layers reported")
    p.add_argument("--top", type=int, default=10, help="tokens and features reported")
    p.add_argument("--max-sequences", type=int, default=8, help="per shard")
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help="the model and SAEs the store was made with")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("serve", help="the feature explorer: a local web app, or --export a site")
    p.add_argument("--host", default=SERVE_HOST, help="address to listen on")
    p.add_argument("--port", type=int, default=SERVE_PORT, help="port to listen on (1-65535)")
    p.add_argument("--export", type=out_path, default=None, metavar="DIR",
                   help="write a static site instead")  # fmt: skip
    p.add_argument("--features", nargs="+", default=None, metavar="LAYER:ID",
                   help="features to export (default: the --n busiest of the graph)")  # fmt: skip
    p.add_argument("--n", type=positive, default=50, help="features exported by default")
    p.add_argument("--measure", default=DEFAULT_MEASURE,
                   help="--export: the pair_stats column that orders partners and colours the "
                   "graph (the server lets the reader choose)")  # fmt: skip
    p.add_argument("--null-shifts", type=int, default=NULL_SHIFTS,
                   help="alignments of each partner's null model (its p-value's floor is "
                   "1 / (K + 1); docs/MEASURES.md)")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("logits", help="logit effects of every feature (top promoted/suppressed)")
    p.add_argument("--layers", type=layer_number, nargs="+", default=None,
                   help="default: every layer")  # fmt: skip
    p.add_argument("--k", type=positive, default=10, help="tokens kept each way per feature")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("findings", help="the study's conjectures C1-C3a answered: statistics, "
                       "95%% intervals, verdicts (docs/FINDINGS.md)")  # fmt: skip
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=STORE_LAYERS)
    p.add_argument("--shards", nargs="+", default=None, help="default: every shard")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (>= 100)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="necessity/sufficiency of a gate partner (0.999)")  # fmt: skip
    p.add_argument("--gate-min-both", type=int, default=None, help="tokens a partner shares (10)")
    p.add_argument("--pass-pearson", type=float, default=None,
                   help="pass-through: mutual best match at least (0.95)")  # fmt: skip
    p.add_argument("--vanishing-necessity", type=float, default=None,
                   help="vanishing: best necessity at most (0.4)")  # fmt: skip
    p.add_argument("--max-distance", type=int, default=None, help="C3's layer distances (3)")
    p.add_argument("--concepts", dest="concept_set", default=None,
                   help="C1's concept set, name or YAML (default: the source's)")  # fmt: skip
    p.add_argument("--model", action="store_true",
                   help="load the store's model and SAEs: C3a and decoder survival")  # fmt: skip
    p.add_argument("--source", default=None, help="with --model (default: the store's source)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=out_path, default=None, help="folder (default: HOME/findings)")
    p.set_defaults(func=cmd_findings)

    p = sub.add_parser("convergence", help="pairs above thresholds as shards are added")
    p.add_argument("--layers", type=layer_number, nargs="+", default=None, help=STORE_LAYERS)
    p.add_argument("--shards", nargs="+", default=None, help="default: every shard")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="shares of the shards (default 1/8 1/4 1/2 1)")  # fmt: skip
    p.add_argument("--min", dest="thresholds", type=measure_value, action="append", default=[],
                   metavar="M=V", help="a measure's threshold (repeatable; default pearson=0.5 "
                   "jaccard=0.5 necessity=0.9)")  # fmt: skip
    p.add_argument("--min-both", type=int, default=None, help="pairs co-active on >= N (2)")
    p.add_argument("--out", type=out_path, default=None, help="folder (default: HOME/findings)")
    p.set_defaults(func=cmd_convergence)

    # Further commands register here (one add_parser block each).
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.home is None:
            from featstore.store.home import default_home

            args.home = str(default_home())
        return args.func(args)
    except FeatstoreError as exc:
        print(f"featstore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featstore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `featstore sql ... | head` closed the pipe: not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
