"""Concepts with token-level labels, the SAE features that detect them, and their path through
layers along the feature graph.

A concept set is a YAML file in `concepts/` (see `concepts/python.yaml` for the rules). Scores of
feature f for concept c over the scored tokens (every position but the first):
AUROC of the activation as a detector of c (a Mann-Whitney statistic: zeros tie at the bottom,
ties share their mean rank), and precision / recall / F1 of "f fires" (activation > 0, the SAE's
own threshold). All are computed for every (concept, feature) at once from the sparse codes.
Traces follow the graph's edge table (`graph/edges.parquet`, read lazily with filters: only the
successors of the traced features are loaded), or a networkx graph of a few edges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import yaml

from featstore.analysis.graph import Graph, as_edges
from featstore.errors import FeatstoreError
from featstore.store.local import Store

# The concept sets: the repo's top-level concepts/, carried in the package as featstore/_data.
CONCEPTS_DIR = Path(str(resources.files("featstore") / "_data" / "concepts"))
RULES = ("token", "span")
# What a concept is about (`kind:` in its YAML; by default from its rule: token -> lexical, span
# -> context): syntax (punctuation, brackets, keywords, function words, layout), lexical (the
# token's own form: digits, capitals, a name), context (where the token is: inside a string, a
# comment, quotes; its rule reads the surrounding text). C1 compares syntax with context.
KINDS = ("syntax", "lexical", "context")
DEFAULT_KIND = {"token": "lexical", "span": "context"}


@dataclass(frozen=True)
class Concept:
    name: str
    description: str
    rule: str  # "token" or "span"
    pattern: re.Pattern[str]
    kind: str = "lexical"  # one of KINDS


# -- concept sets --------------------------------------------------------------------------------


def concept_file(name_or_path: str | Path) -> Path:
    """A YAML path, else the name of a set in `concepts/` (`python`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    path = CONCEPTS_DIR / f"{Path(name_or_path).name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONCEPTS_DIR.glob("*.yaml"))
        raise FeatstoreError(f"no concept set {name_or_path!r} (known: {', '.join(known)})")
    return path


def default_set(source: str) -> str:
    """The concept set whose `sources` list names `source`."""
    for path in sorted(CONCEPTS_DIR.glob("*.yaml")):
        if source in (yaml.safe_load(path.read_text()) or {}).get("sources", []):
            return path.stem
    raise FeatstoreError(f"no concept set lists source {source!r}; pass one explicitly")


def load_concepts(name_or_path: str | Path) -> list[Concept]:
    """The concepts of a set, each rule checked and compiled; errors name the file and concept."""
    path = concept_file(name_or_path)
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("concepts")
    except yaml.YAMLError as exc:
        raise FeatstoreError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(entries, dict) or not entries:
        raise FeatstoreError(f"{path}: expected a non-empty `concepts:` mapping")
    return [_concept(path, name, entry) for name, entry in entries.items()]


# A concept's name becomes a file name (`{name}.png`) and a column: no '/', no '..'.
CONCEPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _concept(path: Path, name: str, entry) -> Concept:
    if not isinstance(name, str) or not CONCEPT_NAME.fullmatch(name):
        raise FeatstoreError(
            f"{path}: bad concept name {name!r}: letters, digits, '_', '-' (at most 64, first a "
            "letter or digit)"
        )
    rules = [r for r in RULES if isinstance(entry, dict) and r in entry]
    if len(rules) != 1:
        raise FeatstoreError(f"{path}: concept {name!r} needs exactly one of `token:` or `span:`")
    try:
        pattern = re.compile(entry[rules[0]])
    except (re.error, TypeError) as exc:
        raise FeatstoreError(f"{path}: concept {name!r}: bad regular expression: {exc}") from None
    kind = entry.get("kind", DEFAULT_KIND[rules[0]])
    if kind not in KINDS:
        raise FeatstoreError(
            f"{path}: concept {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}"
        )
    return Concept(name, str(entry.get("description", "")), rules[0], pattern, kind)


# -- labels --------------------------------------------------------------------------------------


def token_labels(concepts: list[Concept], vocab: list[str], sequences: np.ndarray) -> np.ndarray:
    """(n_tokens, n_concepts) bool labels of the tokens of `sequences` (row-major)."""
    out = np.zeros((sequences.size, len(concepts)), dtype=bool)
    texts = np.asarray(vocab, dtype=object)
    for k, concept in enumerate(concepts):
        if concept.rule == "token":
            hits = np.fromiter((bool(concept.pattern.search(t)) for t in vocab), bool, len(vocab))
            out[:, k] = hits[sequences.ravel()]
        else:
            out[:, k] = np.concatenate([span_labels(concept.pattern, texts[s]) for s in sequences])
    return out


def span_labels(pattern: re.Pattern[str], texts: np.ndarray) -> np.ndarray:
    """Tokens (by their decoded texts) with a character inside a match over their joined text."""
    ends = np.cumsum([len(t) for t in texts])
    starts = ends - [len(t) for t in texts]
    spans = np.array(
        [m.span() for m in pattern.finditer("".join(texts)) if m.end() > m.start()], dtype=np.int64
    ).reshape(-1, 2)
    first = np.searchsorted(ends, spans[:, 0], side="right")  # first token ending past the start
    last = np.searchsorted(starts, spans[:, 1], side="left")  # tokens starting before the end
    cover = np.zeros(len(texts) + 1, dtype=np.int64)
    np.add.at(cover, first, 1)
    np.add.at(cover, last, -1)
    return np.cumsum(cover)[:-1] > 0


# -- scores --------------------------------------------------------------------------------------


def nonzero_ranks(codes: sp.csr_matrix) -> sp.csc_matrix:
    """Ranks of the nonzero activations among all n values of their column (zeros included, tied
    at the bottom: SAE codes are non-negative; equal values share their mean rank), as a sparse
    matrix of codes' shape."""
    csc = sp.csc_matrix(codes)
    csc.eliminate_zeros()
    n = csc.shape[0]
    counts = np.diff(csc.indptr)
    col = np.repeat(np.arange(csc.shape[1]), counts)
    order = np.lexsort((csc.data, col))
    value, col_sorted = csc.data[order], col[order]
    position = np.arange(len(order)) - csc.indptr[col_sorted]  # 0-based among the column's nonzeros
    new_run = np.r_[True, (np.diff(value) != 0) | (np.diff(col_sorted) != 0)]
    run = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:] - 1, len(order) - 1]
    mean_pos = (position[run_start] + position[run_end]) / 2.0
    ranks = np.empty(len(order))
    ranks[order] = (n - counts[col_sorted]) + 1 + mean_pos[run]
    return sp.csc_matrix((ranks, csc.indices, csc.indptr), shape=csc.shape)


def concept_scores(codes: sp.csr_matrix, labels: np.ndarray) -> dict[str, np.ndarray]:
    """(n_concepts, d_sae) arrays: auroc, precision, recall, f1, n_both; plus n_concept (C,) and
    n_fire (d,). AUROC is null (NaN) where a concept has no positive or no negative token."""
    n = codes.shape[0]
    ranks = nonzero_ranks(codes)
    fires = (ranks != 0).astype(np.float64)
    lab = sp.csr_matrix(labels.astype(np.float64))
    n_pos = labels.sum(0).astype(np.float64)[:, None]
    n_fire = np.asarray(fires.sum(0)).ravel()
    n_both = np.asarray((lab.T @ fires).todense())
    zero_rank = (n - n_fire + 1) / 2.0  # mean rank of the tied zeros of each column
    rank_sum = np.asarray((lab.T @ ranks).todense()) + (n_pos - n_both) * zero_rank[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
        precision = n_both / n_fire[None, :]
        recall = n_both / n_pos
        f1 = 2 * n_both / (n_fire[None, :] + n_pos)
    return {
        "auroc": auroc,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_both": n_both,
        "n_concept": n_pos.ravel(),
        "n_fire": n_fire,
    }


def scores_frame(
    scores: dict[str, np.ndarray], concepts: list[Concept], layer: int
) -> pl.DataFrame:
    """One row per (concept, feature) of one layer."""
    n_c, d = scores["auroc"].shape
    columns = {
        "concept": np.repeat([c.name for c in concepts], d),
        "layer": np.full(n_c * d, layer),
        "feature": np.tile(np.arange(d), n_c),
        **{k: scores[k].ravel() for k in ("auroc", "precision", "recall", "f1")},
        "n_both": scores["n_both"].ravel().astype(np.int64),
        "n_fire": np.tile(scores["n_fire"], n_c).astype(np.int64),
        "n_concept": np.repeat(scores["n_concept"], d).astype(np.int64),
    }
    return pl.DataFrame(columns, nan_to_null=True)


def score_store(
    store: Store,
    concepts: list[Concept],
    layers: list[int],
    shards: list[str] | None = None,
    max_sequences: int | None = None,
) -> pl.DataFrame:
    """Scores of every (concept, feature) of each layer over the shards' tokens (the first
    `max_sequences` sequences of each shard), BOS positions left out."""
    vocab = store.vocab()
    if vocab is None:
        raise FeatstoreError(f"store {store.home} has no vocabulary: concepts need decoded text")
    from featstore.sequences import stacked_codes, store_sequences

    shards = shards or store.shards(layers[0])
    seqs = store_sequences(store, shards, max_sequences)
    keep = np.concatenate([(np.arange(s.size) % s.shape[1]) > 0 for s in seqs])
    labels = np.concatenate([token_labels(concepts, vocab, s) for s in seqs])[keep]
    parts = []
    for layer in layers:
        codes = stacked_codes(store, layer, shards, seqs)[keep]
        parts.append(scores_frame(blocked_scores(codes, labels), concepts, layer))
    return pl.concat(parts)


FEATURE_BLOCK = 4096  # features scored at a time: the ranks' temporaries are ~40 bytes a nonzero


def blocked_scores(codes: sp.csr_matrix, labels: np.ndarray) -> dict[str, np.ndarray]:
    """`concept_scores` computed `FEATURE_BLOCK` features at a time (each feature's scores need
    only its own column), so the sort behind the ranks holds one block's nonzeros, not the
    layer's: the layer's codes (12 bytes a nonzero) are what grows with the tokens."""
    blocks = [concept_scores(codes[:, lo : lo + FEATURE_BLOCK], labels)
              for lo in range(0, codes.shape[1], FEATURE_BLOCK)]  # fmt: skip
    return {k: (blocks[0][k] if k == "n_concept" else
                np.concatenate([b[k] for b in blocks], axis=-1)) for k in blocks[0]}  # fmt: skip


def best_features(scores: pl.DataFrame, top: int = 5, min_fire: int = 1) -> pl.DataFrame:
    """The `top` features by AUROC of each (concept, layer), firing on >= `min_fire` tokens."""
    ranked = scores.filter(pl.col("n_fire") >= min_fire).sort(
        "concept", "layer", "auroc", descending=[False, False, True], nulls_last=True
    )
    ranked = ranked.with_columns(rank=pl.int_range(pl.len()).over("concept", "layer") + 1)
    return ranked.filter(pl.col("rank") <= top)


# -- traces along the feature graph --------------------------------------------------------------


def trace_concept(
    scores: pl.DataFrame, graph: Graph, layers: list[int], beam: int = 3
) -> pl.DataFrame:
    """A concept's path: its `beam` best features at the first layer, then at each next layer the
    `beam` best (by AUROC) among the graph successors of the previous layer's; where none has a
    successor the path restarts from the layer's best (`reached` false)."""
    rows, current, prev, graph = [], [], None, as_edges(graph)
    for layer in sorted(layers):
        here = scores.filter(pl.col("layer") == layer)
        here = here.sort("auroc", descending=True, nulls_last=True)
        auroc = dict(zip(here["feature"].to_list(), here["auroc"].to_list(), strict=True))
        rank = {f: k + 1 for k, f in enumerate(here["feature"].to_list())}
        preds = successors(graph, prev, current, layer)
        reached = bool(preds)
        chosen = (
            sorted(preds, key=lambda f: -(auroc.get(f) or 0.0))[:beam]
            if reached
            else (here["feature"].head(beam).to_list())
        )
        rows += [
            {
                "layer": layer,
                "feature": f,
                "auroc": auroc.get(f),
                "rank_in_layer": rank.get(f),
                "predecessor": preds.get(f),
                "reached": reached,
                "best_at_layer": rank.get(f) == 1,
            }
            for f in chosen
        ]
        current, prev = chosen, layer
    schema = {
        "layer": pl.Int64,
        "feature": pl.Int64,
        "auroc": pl.Float64,
        "rank_in_layer": pl.Int64,
        "predecessor": pl.Int64,
        "reached": pl.Boolean,
        "best_at_layer": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def successors(graph: Graph, layer: int | None, features: list[int], nxt: int) -> dict:
    """Features of layer `nxt` linked from `features` of `layer` -> the first linking feature
    (in the order of `features`)."""
    if layer is None or not features:
        return {}
    linked = as_edges(graph).lazy().filter(
        (pl.col("layer_a") == layer) & (pl.col("layer_b") == nxt)
        & pl.col("feature_a").is_in([int(f) for f in features])
    ).select("feature_a", "feature_b").collect()  # fmt: skip
    order = {int(f): k for k, f in enumerate(features)}
    out: dict[int, int] = {}
    for fa, fb in sorted(linked.iter_rows(), key=lambda r: (order[r[0]], r[1])):
        out.setdefault(int(fb), int(fa))
    return out


def concept_traces(
    scores: pl.DataFrame, graph: Graph, layers: list[int], beam: int = 3
) -> pl.DataFrame:
    """`trace_concept` of every concept in `scores`, stacked with a `concept` column."""
    graph = as_edges(graph)
    parts = [
        trace_concept(part, graph, layers, beam).select(pl.lit(name).alias("concept"), pl.all())
        for (name,), part in scores.group_by("concept", maintain_order=True)
    ]
    return pl.concat(parts)


# -- plots ---------------------------------------------------------------------------------------


def plot_trace(concept: Concept, scores: pl.DataFrame, trace: pl.DataFrame, path, top: int = 10):
    """AUROC per layer: the `top` features of each layer (grey), the traced path (edges drawn),
    each layer's best (star)."""
    from matplotlib.figure import Figure

    from featstore.figures import save

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    best = best_features(scores, top)
    ax.scatter(best["layer"], best["auroc"], s=12, color="0.7", label=f"top {top} per layer")
    tops = best.filter(pl.col("rank") == 1)
    ax.scatter(
        tops["layer"],
        tops["auroc"],
        marker="*",
        s=120,
        color="gold",
        edgecolor="black",
        label="best at layer",
        zorder=3,
    )
    where = {(r["layer"], r["feature"]): r["auroc"] for r in trace.iter_rows(named=True)}
    for r in trace.iter_rows(named=True):
        start = (r["layer"] - 1, r["predecessor"])
        if r["predecessor"] is not None and start in where:
            ax.plot([start[0], r["layer"]], [where[start], r["auroc"]], color="tab:blue", lw=1.2)
        ax.annotate(
            str(r["feature"]),
            (r["layer"], r["auroc"] or 0.0),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.scatter(
        trace["layer"], trace["auroc"], s=22, color="tab:blue", label="traced path", zorder=2
    )
    ax.set_xticks(sorted(set(scores["layer"].to_list())))
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC")
    ax.set_title(f"concept {concept.name}: {concept.description}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return save(fig, path)


def run_concepts(
    store: Store,
    concept_set: str | Path,
    layers: list[int],
    graph: Graph,
    out: Path,
    *,
    shards: list[str] | None = None,
    max_sequences: int | None = None,
    top: int = 5,
    beam: int = 3,
) -> dict[str, Path]:
    """Score, trace and plot one concept set; writes best_features.parquet,
    concept_traces.parquet and one PNG per concept under `out`."""
    from featstore.files import write_parquet_atomic

    concepts = load_concepts(concept_set)
    scores = score_store(store, concepts, sorted(layers), shards, max_sequences)
    traces = concept_traces(scores, graph, sorted(layers), beam)
    paths = {
        "best_features": write_parquet_atomic(
            best_features(scores, top), out / "best_features.parquet"
        ),
        "concept_traces": write_parquet_atomic(traces, out / "concept_traces.parquet"),
    }
    for concept in concepts:
        mine = pl.col("concept") == concept.name
        paths[f"plot_{concept.name}"] = plot_trace(
            concept, scores.filter(mine), traces.filter(mine), out / f"{concept.name}.png"
        )
    return paths
