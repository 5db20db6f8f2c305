"""Names and numbers of the on-disk layout (docs/STORE_FORMAT.md); the only place they live."""

from __future__ import annotations

import re

# 2: groups at a URL are committed generations; 3: fill values no valid element takes and a
# CRC-32C per chunk, so damage is detected; 4: every group names its commit
# (`featstore-commit`) and readers check that what they read together is of one state
# (docs/STORE_FORMAT.md)
SPEC_VERSION = 4
ROOT = "store.zarr"

# Attribute keys.
ENCODING_TYPE = "encoding-type"
ENCODING_VERSION = "encoding-version"
FEATSTORE_VERSION = "featstore-spec-version"
SHAPE = "shape"

# Encoding types and their versions.
CSR = "csr_matrix"
CSR_VERSION = "0.1.0"
TOKEN_TABLE = "token_table"
TOKEN_TABLE_VERSION = "0.1.0"
VOCAB = "vocab"
VOCAB_VERSION = "0.1.0"
FEATURE_STATS = "feature_stats"
FEATURE_STATS_VERSION = "0.1.0"
PAIR_STATS = "pair_stats_coo"
PAIR_STATS_VERSION = "0.1.0"

# Group paths inside the root.
ACTIVATIONS = "activations"  # activations/layer_{L}/{shard}
TOKENS = "tokens"  # tokens/{shard}
PAIRS = "pairs"  # pairs/{a}-{b}/{shard}
PAIR_STATS_DIR = "pair_stats"  # {home}/pair_stats/{a}-{b}.parquet: merged, for SQL
CAUSAL_DIR = "causal"  # {home}/causal/: patching effects (featstore.causal), for SQL
CAUSAL_EDGES_FILE = "causal_edges.parquet"  # in CAUSAL_DIR: the `causal_edges` SQL table
SQL_INDEX_DIR = "sql_index"  # {home}/sql_index/: the SQL index (featstore.store.sqlindex)
PAIR_INDEX_DIR = "pair_index"  # {home}/pair_index/{a}-{b}.duckdb: by feature_b (pairindex)
STORE_URL_ENV = "FEATSTORE_STORE_URL"  # an fsspec URL for the Zarr hierarchy (objectstore.py)
STORAGE_OPTIONS_ENV = "FEATSTORE_STORAGE_OPTIONS"  # JSON: fsspec options for that URL
GENERATION = "featstore-generation"  # group attr at a URL store: the committed generation
GENERATION_STALE_AFTER = 6 * 3600.0  # s: an unreferenced generation this old is dropped
GENERATION_PREFIX = "_gen-"  # cannot be a shard name, which starts with a letter or digit
GENERATION_NAME = re.compile(r"_gen-[0-9a-f]{10}-[0-9a-f]{32}")
STAGING = "_staging"  # half-written groups live here until renamed into place
TRASH = "_trash"  # replaced groups wait here until the new one is in place
COMMITS = "_commits"  # records of groups committed together (a shard across layers)
STAGING_ENTRY = re.compile(r"[0-9a-f]{32}\.[A-Za-z0-9_.%-]{1,1024}")  # {hex}.{path, URL-quoted}
PAIR_FOLDER = re.compile(r"(\d{1,10})-(\d{1,10})(?:\.|$)")  # pairs/{a}-{b}[.t{T}][.null]
ROWS_HASH = "featstore-rows-hash"  # BLAKE2b of a token table's (seq, pos); layers carry it

# Chunking: nonzeros are scanned by token range, so chunk along the nonzero axis.
NNZ_CHUNK = 1 << 18
TOKEN_CHUNK = 1 << 16

SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Names a shard cannot take: zarr's metadata file (any case: case-insensitive file systems).
RESERVED_NAMES = frozenset({"zarr.json"})
# Every folder name of a group path (layer_6, 6-7.t0.5.null, a shard) has the shard name's form.
GROUP_PATH_DEPTH = 3


def name_ok(name: object) -> bool:
    """Whether `name` may name a shard or a folder of a group path (`SHARD_NAME`, not reserved;
    the whole string: `re.match`'s `$` would let a trailing newline through)."""
    return (
        isinstance(name, str)
        and SHARD_NAME.fullmatch(name) is not None
        and name.lower() not in RESERVED_NAMES
    )


def group_path_ok(path: str) -> bool:
    """Whether `path` (e.g. read from a `_trash` entry) names a group inside the root: 1 to 3
    names of the shard name's form joined by '/', so never absolute, never '..'."""
    parts = path.split("/") if isinstance(path, str) else []
    return 0 < len(parts) <= GROUP_PATH_DEPTH and all(name_ok(p) for p in parts)


LAYER_FOLDER = re.compile(r"layer_(0|[1-9][0-9]{0,9})")  # activations/layer_{L}
MAX_LAYER = 2**31 - 1  # layers are int32 in SQL
MAX_SHARD_TOKENS = 2**28  # token rows of one shard (its indptr: 2 GiB); split larger inputs


def layer_group(layer: int) -> str:
    return f"{ACTIVATIONS}/layer_{layer}"


def activation_path(layer: int, shard: str) -> str:
    return f"{layer_group(layer)}/{shard}"


def tokens_path(shard: str) -> str:
    return f"{TOKENS}/{shard}"


def pairs_path(layer_a: int, layer_b: int, shard: str) -> str:
    return f"{PAIRS}/{layer_a}-{layer_b}/{shard}"


# Derived outputs under the store home (rebuilt from store.zarr; not part of the Zarr spec).
GRAPH_DIR = "graph"  # edges.parquet, nodes.parquet, summary.json, graph.graphml
DECODERS_DIR = "decoders"  # {digest}.parquet: decoder cosines' top k (analysis.decoders)
PLOTS_DIR = "plots"  # the PNGs of featstore.plots
CONCEPTS_DIR = "concepts"  # best features, traces, one PNG per concept
ERASURE_DIR = "erasure"  # erasure and gradual-change tables and PNGs
COMPARISON_DIR = "comparison"  # one Parquet per table, three PNGs
CARDS_DIR = "cards"  # index.html and L{layer}_{feature}.html
FINDINGS_DIR = "findings"  # the conjectures' table, page and plots (featstore.analysis.findings)
FINDINGS_FILE = "findings.parquet"  # in FINDINGS_DIR: the `findings` SQL table
LOGITS_DIR = "logits"  # logit effects of every feature (featstore.analysis.logits)
LOGIT_EFFECTS_FILE = "logit_effects.parquet"  # in LOGITS_DIR: the `logit_effects` SQL table
STEERING_DIR = "steering"  # clamped features: KL, tokens, later features (analysis.steering)
