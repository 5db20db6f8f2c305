"""Every stage of the pipeline over one store, one call each, in order, without Dagster: what the
Dagster assets wire, as `bench/pipeline.py` times it and the end-to-end test runs it.

Each stage is a function of (store, `Plan`) returning a short description of what it made; the
stages read only what earlier ones wrote to the store home, so each can run in its own process.
Top floor (beside `cli`): may import every wing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from featstore.defaults import DECODER_K, STEER_BATCH
from featstore.errors import FeatstoreError
from featstore.store import spec
from featstore.store.local import Store


@dataclass(frozen=True)
class Plan:
    """What to run: the source, layers and text, and the sample sizes of the costly analyses."""

    source: str = "gpt2-random"
    layers: tuple[int, ...] = (6, 7, 8, 9)
    text_dir: str | None = None
    max_sequences: int | None = None  # per text shard at extraction
    seq_len: int = 128
    batch_size: int = 8
    device: str = "cpu"  # of the model steps (extraction, causal edges, erasure)
    threshold: float = 0.2  # Pearson of a graph edge
    # The statistics stage: None writes the table of every co-active pair; a Pearson computes only
    # the pairs reaching it (not written; the plots stage then writes the whole tables itself).
    stats_min_pearson: float | None = None
    causal_sequences: int = 2  # per shard
    causal_edges: int | None = 100  # graph edges measured per layer pair (a seeded sample)
    causal_random: int = 100  # random control pairs per layer pair
    causal_attribution: bool = True  # also the attribution estimate of each causal edge
    erasure_sequences: int = 8  # per shard
    cards: int = 5
    decoder_k: int = DECODER_K
    steered: int = 2  # busiest features of the first layer clamped (steering)
    steer_batch: int = STEER_BATCH  # sequences per forward pass of steering
    findings_features: int = 50  # vanishing features and controls each, for C3a

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        if len(self.layers) < 2:
            raise FeatstoreError(f"the pipeline needs two layers or more, got {list(self.layers)}")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in itertools.pairwise(self.layers) if b == a + 1]

    def extract_config(self):
        from featstore.sources.extract import ExtractConfig

        return ExtractConfig(source=self.source, layers=self.layers, seq_len=self.seq_len,
                             batch_size=self.batch_size, device=self.device,
                             text_dir=self.text_dir,
                             max_sequences=self.max_sequences)  # fmt: skip


def extraction(store: Store, plan: Plan) -> str:
    from featstore.sources.extract import extract_all

    reports = list(extract_all(store, plan.extract_config()))
    tokens = sum(r.n_tokens for r in reports)
    l0 = {k: round(sum(r.nnz[k] for r in reports) / max(tokens, 1), 1) for k in plan.layers}
    return f"{tokens} tokens per layer in {len(reports)} shards, L0 {l0}"


def shard_sums(store: Store, plan: Plan) -> str:
    from featstore.stats.shardsums import update_shard_pairs

    pairs = sum(update_shard_pairs(store, a, b, shard).nnz
                for a, b in plan.pairs for shard in store.shards(a))  # fmt: skip
    return f"{pairs} co-active (pair, shard) sums"


def statistics(store: Store, plan: Plan) -> str:
    from featstore.stats.query import PairQuery, pair_stats, save_pair_table

    if plan.stats_min_pearson is None:
        rows = {f"{a}-{b}": save_pair_table(store, PairQuery(a, b)).rows for a, b in plan.pairs}
        return f"co-active pairs written {rows}"
    rows = {f"{a}-{b}": pair_stats(store, PairQuery(a, b, min_pearson=plan.stats_min_pearson,
                                                    save=False)).height
            for a, b in plan.pairs}  # fmt: skip
    return f"pairs with Pearson >= {plan.stats_min_pearson} (not written) {rows}"


def graph(store: Store, plan: Plan) -> str:
    from featstore.analysis.graph import export_graph

    summary = export_graph(store, store.home / spec.GRAPH_DIR, layers=plan.layers,
                           threshold=plan.threshold)  # fmt: skip
    return f"{summary['nodes']} nodes, {summary['edges']} edges"


def plots(store: Store, plan: Plan) -> str:
    from featstore.analysis.plots import plot_store

    paths = plot_store(store, store.home / spec.PLOTS_DIR, layers=plan.layers,
                       threshold=plan.threshold)  # fmt: skip
    return f"{len(paths)} figures"


def decoder_cosine(store: Store, plan: Plan) -> str:
    """The data-free measure (as `featstore stats --decoder-cosine` joins it), not saved."""
    from featstore.analysis.decoders import store_decoder_cosine

    rows = sum(store_decoder_cosine(store, a, b, plan.decoder_k).height for a, b in plan.pairs)
    return f"{rows} top-{plan.decoder_k} decoder cosines"


def concepts(store: Store, plan: Plan) -> str:
    from featstore.analysis.concepts import default_set, run_concepts

    paths = run_concepts(store, default_set(plan.source), list(plan.layers), graph_edges(store),
                         store.home / spec.CONCEPTS_DIR)  # fmt: skip
    return f"{len(paths)} files"


def comparison(store: Store, plan: Plan) -> str:
    from featstore.analysis.compare import CompareConfig, run_comparison

    result, paths = run_comparison(store, CompareConfig(layers=plan.layers),
                                   store.home / spec.COMPARISON_DIR)  # fmt: skip
    groups = result.communities
    return f"{len(paths)} files, {groups.height} communities of {groups['size'].sum()} nodes"


def cards(store: Store, plan: Plan) -> str:
    from featstore.analysis.cards import busiest_features, write_cards

    keys = busiest_features(graph_edges(store), plan.cards)
    paths = write_cards(store, keys, store.home / spec.CARDS_DIR)
    return f"{len(paths)} pages"


def causal_edges(store: Store, plan: Plan) -> str:
    from featstore.analysis.asked import EdgeChoice
    from featstore.analysis.causal import CausalConfig, run_causal
    from featstore.sources.extract import load_model_and_saes

    model, saes = load_model_and_saes(plan.extract_config())
    choice = EdgeChoice(sample="graph", min_pearson=plan.threshold, max_edges=plan.causal_edges,
                        random_pairs=plan.causal_random)  # fmt: skip
    cfg = CausalConfig(layers=plan.layers, max_sequences=plan.causal_sequences, edges=choice,
                       attribution=plan.causal_attribution)  # fmt: skip
    paths = run_causal(store, model, saes, cfg)
    return f"{len(paths)} files"


def erasure(store: Store, plan: Plan) -> str:
    from featstore.analysis.erasure import run_erasure
    from featstore.sources.extract import load_model_and_saes

    model, saes = load_model_and_saes(plan.extract_config())
    paths = run_erasure(store, model, saes, graph_edges(store), plan.layers,
                        store.home / spec.ERASURE_DIR,
                        max_sequences=plan.erasure_sequences)  # fmt: skip
    return f"{len(paths)} files"


def logits(store: Store, plan: Plan) -> str:
    from featstore.analysis.logits import store_logit_effects, write_logit_effects
    from featstore.sources.extract import load_model_and_saes

    model, saes = load_model_and_saes(plan.extract_config())
    w_dec = {layer: saes[layer].W_dec.detach().float().cpu().numpy() for layer in plan.layers}
    frame = store_logit_effects(store, plan.layers, model=model, decoders=w_dec)
    write_logit_effects(store, frame)
    return f"{frame.height} rows"


def steering(store: Store, plan: Plan) -> str:
    from featstore.analysis.steering import SteerConfig, run_steering
    from featstore.sources.extract import load_model_and_saes
    from featstore.stats.shardsums import merged_feature_stats

    model, saes = load_model_and_saes(plan.extract_config())
    first = plan.layers[0]
    count = merged_feature_stats(store, first, store.shards(first)).count
    busiest = tuple(int(f) for f in count.argsort()[::-1][: plan.steered])
    cfg = SteerConfig(layer=first, features=busiest, targets=plan.layers[1:])
    paths = run_steering(store, model, saes, cfg, plan.causal_sequences, plan.steer_batch)
    return f"{len(busiest)} features, {len(paths)} tables"


def findings(store: Store, plan: Plan) -> str:
    from featstore.analysis.findings import FindingsConfig, run_findings
    from featstore.sources.extract import load_model_and_saes

    model, saes = load_model_and_saes(plan.extract_config())
    cfg = FindingsConfig(layers=plan.layers, max_sequences=plan.erasure_sequences,
                         max_features=plan.findings_features)  # fmt: skip
    frame, paths = run_findings(store, cfg, store.home / spec.FINDINGS_DIR, model, saes)
    return f"{frame.height} conjectures, {len(paths)} files"


def graph_edges(store: Store) -> pl.LazyFrame:
    """The graph stage's edge table, lazily (each consumer filters it before reading)."""
    from featstore.analysis.graph import read_edges

    return read_edges(store.home / spec.GRAPH_DIR)


Stage = Callable[[Store, Plan], str]
STAGES: dict[str, Stage] = {
    "extraction": extraction,
    "shard_sums": shard_sums,
    "statistics": statistics,
    "graph": graph,
    "plots": plots,
    "decoder_cosine": decoder_cosine,
    "concepts": concepts,
    "comparison": comparison,
    "cards": cards,
    "causal_edges": causal_edges,
    "erasure": erasure,
    "logits": logits,
    "steering": steering,
    "findings": findings,
}
