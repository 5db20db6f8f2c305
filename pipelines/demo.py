"""`python -m pipelines.demo`: materialise every asset for the configured source (tiny by default).

Runs go into a persistent Dagster instance ($DAGSTER_HOME, default ./.dagster), so `make ui`
afterwards shows them; the store goes to $FEATSTORE_HOME (default ./featstore-data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from dagster_shared.error import SerializableErrorInfo

from featstore.analysis import graph as fgraph
from featstore.errors import FeatstoreError
from featstore.sources.extract import list_shards
from featstore.store import spec
from featstore.store.local import Store
from pipelines.assets.causal import causal_edges, concept_traces, erasure
from pipelines.assets.comparison import feature_cards, logit_effects, method_comparison
from pipelines.assets.extraction import activations, encoder_config, tokenizer_config, tokens
from pipelines.assets.statistics import (
    GRAPH_DIR,
    PLOTS_DIR,
    feature_graph,
    pair_stats,
    plots,
    shard_pair_stats,
)
from pipelines.definitions import build_defs, defs
from pipelines.execution import instance_config
from pipelines.partitions import (
    LAYER,
    LAYERS,
    PAIR,
    PAIRS,
    multi_key,
    parse_pair,
    range_tags,
    shard_partitions,
)
from pipelines.resources import FeatstoreResource, from_env

# INFO keeps the progress lines of the assets and drops Dagster's per-step DEBUG events.
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster, with a dagster.yaml in it (`instance_config`)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(instance_config())
    return home


def register_shards(instance: dg.DagsterInstance, shards: Sequence[str]) -> list[str]:
    """Adds the shards the instance does not know yet as dynamic partitions; returns them."""
    known = set(instance.get_dynamic_partitions(shard_partitions.name))
    new = [s for s in shards if s not in known]
    if new:
        instance.add_dynamic_partitions(shard_partitions.name, new)
    return new


def materialize(
    instance: dg.DagsterInstance,
    assets: Sequence[dg.AssetsDefinition | dg.SourceAsset],
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    location: dg.Definitions = defs,
    ops: dict[str, dict] | None = None,
) -> dg.ExecuteInProcessResult:
    """One run of the location's asset job over `assets` and their checks; raises on failure."""
    job = location.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        run_config={**RUN_CONFIG, "ops": ops or {}},
        instance=instance,
        # An observable source (`dg.SourceAsset`) has one `key`; an asset definition `keys`.
        asset_selection=[key for a in assets for key in getattr(a, "keys", None) or [a.key]],
        partition_key=partition_key,
        tags=tags,
        raise_on_error=False,
    )
    errors = [root_cause(e.step_failure_data.error) for e in result.get_step_failure_events()]
    errors += [
        f"check {e.asset_key.to_user_string()}:{e.check_name} failed"
        for e in result.get_asset_check_evaluations()
        if not e.passed
    ]
    if not result.success or errors:
        raise FeatstoreError(f"run {result.run_id} failed: {'; '.join(errors) or 'see its log'}")
    return result


def root_cause(error: SerializableErrorInfo | None) -> str:
    """The innermost error's last line: the FeatstoreError, not Dagster's wrapper around it."""
    if error is None:
        return "unknown error"
    while error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[-1]


def layer_range(layers: Sequence[int]) -> tuple[str, str]:
    """First and last layer partition key of the configured layers (a run covers the span)."""
    keys = [k for k in LAYERS if int(k) in layers]
    if not keys:
        raise FeatstoreError(f"none of the layers {list(layers)} is a layer partition {LAYERS}")
    return keys[0], keys[-1]


def pair_range(layers: Sequence[int]) -> tuple[str, str] | None:
    """First and last pair partition key with both layers configured; None if there is none."""
    keys = [k for k in PAIRS if set(parse_pair(k)) <= set(layers)]
    return (keys[0], keys[-1]) if keys else None


def shard_spans(instance: dg.DagsterInstance, shards: Sequence[str]) -> list[tuple[str, str]]:
    """`shards` as (first, last) runs of the instance's shard order; one span when contiguous."""
    wanted, spans, span = set(shards), [], []
    for key in instance.get_dynamic_partitions(shard_partitions.name):
        if key in wanted:
            span.append(key)
        elif span:
            spans.append((span[0], span[-1]))
            span = []
    return [*spans, (span[0], span[-1])] if span else spans


def box_tags(shards: tuple[str, str], dimension: str, keys: tuple[str, str]) -> dict[str, str]:
    """Range tags over shards x (layers or pairs): one run for the whole box."""
    return range_tags(
        multi_key(shards[0], **{dimension: keys[0]}), multi_key(shards[1], **{dimension: keys[1]})
    )


def run_extraction(
    instance: dg.DagsterInstance, location: dg.Definitions, featstore: FeatstoreResource
) -> list[str]:
    """Tokens, then activations of every shard (one forward pass per shard for all layers);
    `featstore`: the location's resource, its environment variables resolved."""
    shards = list_shards(featstore.extract_config())
    if not shards:
        raise FeatstoreError(f"no *.txt shards in {featstore.text_folder()}")
    new = register_shards(instance, shards)
    print(f"text shards: {', '.join(shards)} ({len(new)} newly registered)")
    layers = layer_range(featstore.layers)
    # The configuration's data versions first, so the UI shows what they are and, after a
    # change of configuration, what it makes stale.
    materialize(instance, [tokenizer_config, encoder_config], location=location)
    for span in shard_spans(instance, shards):
        materialize(instance, [tokens], tags=range_tags(*span), location=location)
        materialize(instance, [activations], tags=box_tags(span, LAYER, layers), location=location)
    return shards


def run_statistics(
    instance: dg.DagsterInstance,
    location: dg.Definitions,
    shards: Sequence[str],
    layers: Sequence[int],
) -> None:
    """Pair sums per shard, merged pair statistics, then the graph and the plots."""
    pairs = pair_range(layers)
    if pairs is None:
        print("fewer than two adjacent layers configured: no pair statistics")
        return
    for span in shard_spans(instance, shards):
        tags = box_tags(span, PAIR, pairs)
        materialize(instance, [shard_pair_stats], tags=tags, location=location)
    materialize(instance, [pair_stats], tags=range_tags(*pairs), location=location)
    materialize(instance, [feature_graph, plots], location=location)


# The research assets sample sequences: patching every feature of every sequence costs minutes.
RESEARCH_OPS = {
    "causal_edges": {"config": {"max_sequences": 2, "attribution": False}},
    "erasure": {"config": {"max_sequences": 8}},
    "feature_cards": {"config": {"n_features": 20}},
}


def run_research(instance: dg.DagsterInstance, location: dg.Definitions) -> None:
    """Causal edges, concept traces, erasure, the method comparison, logit effects and cards."""
    research = [causal_edges, concept_traces, erasure, method_comparison, logit_effects,
                feature_cards]  # fmt: skip
    materialize(instance, research, location=location, ops=RESEARCH_OPS)


def report(store: Store, layers: Sequence[int], shards: Sequence[str], seconds: float) -> str:
    """What was produced and where."""
    lines = [f"\nDone in {seconds:.0f}s. Store: {store.home.resolve()}"]
    for layer in layers:
        infos = [store.info(layer, shard) for shard in shards]
        n_tokens = sum(info[spec.SHAPE][0] for info in infos)
        l0 = sum(info["nnz"] for info in infos) / max(n_tokens, 1)
        lines.append(f"  layer {layer}: {n_tokens} tokens in {len(shards)} shards, L0 {l0:.1f}")
    summary = store.home / GRAPH_DIR / fgraph.SUMMARY
    if summary.exists():
        graph = json.loads(summary.read_text())
        per_pair = ", ".join(f"{k}: {v}" for k, v in graph["edges_per_pair"].items()) or "none"
        lines.append(
            f"  feature graph: {graph['nodes']} nodes, {graph['edges']} edges ({per_pair}), "
            f"{graph['metric']} >= {graph['threshold']}"
        )
    for folder in (
        spec.PAIR_STATS_DIR,
        GRAPH_DIR,
        PLOTS_DIR,
        spec.CAUSAL_DIR,
        spec.CONCEPTS_DIR,
        spec.ERASURE_DIR,
        spec.COMPARISON_DIR,
        spec.CARDS_DIR,
    ):
        path = store.home / folder
        if path.is_dir():
            files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            lines.append(f"  {path.resolve()}/: {', '.join(files)}")
    lines.append(
        f"Dagster runs are in {os.environ['DAGSTER_HOME']}; browse them with `make ui` "
        "(http://127.0.0.1:3000)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__)
    p.add_argument("--max-sequences", type=int, default=None, help="cap per shard (default all)")
    p.add_argument("--text-dir", default=None, help="folder of *.txt shards (default: embedded)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Per-file "Generating train split" bars from `datasets` would drown the progress lines.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    dagster_home()
    try:
        text_dir = {"text_dir": args.text_dir} if args.text_dir else {}  # else FEATSTORE_TEXT_DIR
        featstore = from_env(max_sequences=args.max_sequences, **text_dir)
        location = build_defs(featstore)
        resolved = featstore.process_config_and_initialize()  # the environment's values
        instance = dg.DagsterInstance.get()
        shards = run_extraction(instance, location, resolved)
        run_statistics(instance, location, shards, resolved.layers)
        run_research(instance, location)
        seconds = time.perf_counter() - start
        print(report(resolved.open(), resolved.layers, shards, seconds))
    except FeatstoreError as exc:
        print(f"featstore demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
