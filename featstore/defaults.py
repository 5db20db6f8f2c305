"""Every default featstore has, in one place: the source, the engines, thresholds, the pair table.

Layers are per source: they come from the source's entry in `sources/sources.yaml`
(`featstore.sources.registry.default_layers`), never from a literal here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DEFAULT_SOURCE = "tiny"  # the embedded offline source (sources.yaml)
SYNTH_SOURCE = "gpt2-small"  # synthetic stores take this source's layers and width

# How a layer pair's sums are computed (same results; `bench/pair_stats.py` compares them).
ENGINES = ("sparse", "duckdb", "polars")
DEFAULT_ENGINE = "sparse"

EDGE_THRESHOLD = 0.2  # Pearson (or Jaccard) of a feature-graph edge and a correlation edge
AGREEMENT_THRESHOLD = 0.99  # agreement is near 1 for most pairs of sparse features
MIN_BOTH = 2  # default support of an edge: a pair seen together once is no edge
MIN_EFFECT = 0.1  # |relative effect| of a causal edge
DECODER_K = 10  # decoder cosines kept per feature (each feature's top k, as row and as column)
CAUSAL_SEQUENCES = 16  # sequences per shard patched for causal edges
# Sequences per forward pass of the model-side analyses, so that their memory is one batch's,
# never grows with the shards sampled. Steering, a sequence of seq_len tokens: the clean and
# steered next-token log-probabilities, the clean probabilities and one temporary (float64,
# (seq_len - 1) x d_vocab each; GPT-2: 4 x 51 MB), the float32 logits (26 MB) and each target
# layer's codes clean and steered (float32 seq_len x d_sae; 2 x 12.6 MB a target at 24,576
# features): ~0.3 GB a 128-token sequence at GPT-2 dims with three targets, 4 sequences ~1.2 GB
# above the model and SAEs (bench/RESULTS.md).
STEER_BATCH = 4
# Erasure's block components and C3a's next-SAE errors: (n_heads + 2) x d_model float32 a
# token, 5.5 MB a 128-token GPT-2 sequence (and a batch's projection onto the features asked).
MODEL_BATCH = 8
DEFAULT_MEASURE = "pearson"  # orders a feature page's partners (`featstore serve`)
SERVE_HOST, SERVE_PORT = "127.0.0.1", 8765  # where `featstore serve` listens by default
EXPLORER_URL = f"http://{SERVE_HOST}:{SERVE_PORT}"  # where feature cards link to
NULL_SHIFTS = 20  # alignments of a pair's null model on a feature page (`featstore.stats.shifted`)
# graph.graphml holds at most this many edges (the strongest by |metric|); edges.parquet holds
# all. GraphML readers (networkx, Gephi) hold the whole graph: ~1M edges is a few GB there.
GRAPHML_MAX_EDGES = 1_000_000
# Each data measure's threshold where measures are compared (`featstore.analysis.compare`).
MEASURE_THRESHOLDS = {
    "pearson": EDGE_THRESHOLD,
    "jaccard": 0.1,
    "sufficiency": 0.5,
    "necessity": 0.5,
    "mutual_information": 0.01,
    "pmi": 2.0,
}

# The pair table (`pair_stats`, one row per feature pair of a layer pair): keys, the sums it
# was finished from, then every data measure (docs/MEASURES.md), as polars type names (this
# module imports nothing, so that the CLI starts fast). The merged Parquet file and the
# `pair_stats` SQL table prepend `PAIR_LAYERS`.
PAIR_LAYERS = {"layer_a": "Int32", "layer_b": "Int32"}
PAIR_KEYS = {"feature_a": "Int32", "feature_b": "Int32"}
PAIR_SUMS = {"n_tokens": "Int64", "n_both": "Int64", "n_either": "Int64", "sum_xy": "Float64"}
PAIR_MEASURES = (
    "pearson",
    "agreement",
    "jaccard",
    "sufficiency",
    "necessity",
    "mutual_information",
    "pmi",
    "cosine",
)
PAIR_COLUMNS = {**PAIR_KEYS, **PAIR_SUMS, **dict.fromkeys(PAIR_MEASURES, "Float64")}


def pair_schema(columns: Iterable[str] | None = None, *, layers: bool = False) -> dict[str, Any]:
    """The pair table's polars schema (of `columns` only, if given; `PAIR_LAYERS` first with
    `layers`)."""
    import polars as pl

    named = (PAIR_LAYERS if layers else {}) | PAIR_COLUMNS
    names = named if columns is None else [*PAIR_LAYERS, *columns] if layers else columns
    return {k: getattr(pl, named[k])() for k in names}
