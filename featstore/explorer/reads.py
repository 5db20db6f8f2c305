"""What one feature's page needs, read from the store and the pipeline's tables, never all of it.

`Explorer` answers each page from: the layer summary (`featstore.explorer.summary`, one pass per
layer, cached), the feature's stored sums (`Store.feature_stats`), the token rows around its
strongest activations (`token_slice`, `Store.read` of those rows only), the merged pair
statistics by DuckDB (`sql/feature_successors.sql`, `sql/feature_predecessors.sql`), the causal
edges (`sql/feature_causal_effects.sql`), the best concepts (`concepts/best_features.parquet`)
and the logit effects (`logits/logit_effects.parquet`) where the pipeline wrote them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from featstore.analysis.cards import check_feature
from featstore.analysis.logits import read_logit_effects
from featstore.defaults import MIN_BOTH
from featstore.errors import FeatstoreError
from featstore.explorer.summary import HIST_EDGES, LayerSummary, summarise_layer
from featstore.stats.finish import finish_stats
from featstore.stats.kernel import PairCounts
from featstore.stats.measures import with_intervals
from featstore.stats.shardsums import merged_feature_stats
from featstore.store import spec
from featstore.store.local import FeatureStats, Store
from featstore.store.sql import (
    CAUSAL_EDGES_SCHEMA,
    PAIR_STATS_SCHEMA,
    named_query,
    one_line,
    pair_stats_files,
)

CONTEXT = (8, 4)  # tokens shown before and after an activation
CONTEXT_READERS = 4  # threads reading context windows (zarr decompresses outside the GIL)
KEYS = ("layer_a", "layer_b", "feature_a", "feature_b", "n_tokens")
MEASURES = tuple(f.name for f in PAIR_STATS_SCHEMA if f.name not in KEYS)
CONCEPTS_FILE = "best_features.parquet"
CAUSAL_COLUMNS = ("layer_a", "feature_a", "layer_b", "feature_b", "n_tokens", "asked_by",
                  "relative_effect", "relative_attribution", "share_off", "share_on")  # fmt: skip


@dataclass(frozen=True)
class Context:
    shard: str
    seq: int
    pos: int
    value: float
    texts: list[str]  # the tokens of the window
    values: list[float]  # the feature's activation on each
    active: int  # index of the activation in the window


@dataclass(frozen=True)
class Partners:
    layer: int  # the other layer
    side: str  # "predecessors" (other layer below) or "successors"
    frame: pl.DataFrame  # layer, feature, every measure and its 95% interval, sorted


@dataclass(frozen=True)
class FeatureView:
    layer: int
    feature: int
    n_tokens: int
    count: int
    total: float
    histogram: list[tuple[float, float, int]]  # (lo, hi, count) of the occupied bins
    contexts: list[Context]
    concepts: pl.DataFrame  # concept, auroc, rank (possibly empty)
    top_tokens: list[tuple[str, int]]  # most frequent among its strongest activations
    partners: list[Partners]
    causal: pl.DataFrame
    logits: pl.DataFrame | None  # None: no logit effects table

    @property
    def frequency(self) -> float:
        return self.count / self.n_tokens if self.n_tokens else float("nan")


def histogram_bins(counts: np.ndarray) -> list[tuple[float, float, int]]:
    """The occupied range of a summary histogram as (lo, hi, count) rows."""
    edges = np.concatenate([[0.0], HIST_EDGES, [np.inf]])
    hit = np.flatnonzero(counts)
    if not hit.size:
        return []
    return [(float(edges[i]), float(edges[i + 1]), int(counts[i]))
            for i in range(hit[0], hit[-1] + 1)]  # fmt: skip


class Explorer:
    """Read-only answers about the features of one store; caches per-layer summaries."""

    def __init__(self, store: Store, top: int = 20, context: tuple[int, int] = CONTEXT) -> None:
        self.store, self.top, self.context = store, top, context
        self.layers = store.layers()
        self._lock = threading.Lock()
        self._summaries: dict[int, LayerSummary] = {}
        self._stats: dict[int, FeatureStats] = {}
        self._vocab = store.vocab()
        self._con = connect(store)
        self._tokens: dict[str, dict[str, np.ndarray]] = {}

    # -- cached per layer ------------------------------------------------------------------------

    def summary(self, layer: int) -> LayerSummary:
        with self._lock:
            if layer not in self._summaries:
                self._summaries[layer] = summarise_layer(self.store, layer)
            return self._summaries[layer]

    def stats(self, layer: int) -> FeatureStats:
        with self._lock:
            if layer not in self._stats:
                self._stats[layer] = merged_feature_stats(
                    self.store, layer, self.store.shards(layer)
                )
            return self._stats[layer]

    def token_table(self, shard: str) -> dict[str, np.ndarray]:
        """A shard's token columns (12 bytes a token), read once."""
        with self._lock:
            if shard not in self._tokens:
                table = self.store.tokens(shard)
                self._tokens[shard] = {c: table[c].to_numpy() for c in table.columns}
            return self._tokens[shard]

    def d_sae(self, layer: int) -> int:
        return int(self.stats(layer).count.size)

    def check(self, layer: int, feature: int) -> None:
        check_feature(self.store, layer, feature)

    def text(self, token: int) -> str:
        vocab = self._vocab
        return vocab[token] if vocab is not None and 0 <= token < len(vocab) else f"<{token}>"

    # -- queries ---------------------------------------------------------------------------------

    def sql(self, name: str, params: dict) -> pl.DataFrame:
        try:
            return self._con.cursor().sql(named_query(name), params=params).pl()
        except duckdb.Error as exc:
            raise FeatstoreError(one_line(exc)) from None

    def contexts(self, layer: int, feature: int) -> list[Context]:
        """The strongest activations with the tokens around each and the feature's value on
        each of those tokens (same sequence only); the windows are read concurrently."""
        summary = self.summary(layer)
        hits = summary.top(feature)
        have = set(self.store.token_shards())
        todo = [(summary.shards[s], int(r), float(v))
                for s, r, v in zip(hits.shard, hits.row, hits.value, strict=True)
                if summary.shards[s] in have][: self.top]  # fmt: skip
        with ThreadPoolExecutor(CONTEXT_READERS) as pool:
            return list(pool.map(lambda hit: self._context(layer, feature, *hit), todo))

    def _context(self, layer: int, feature: int, shard: str, row: int, value: float) -> Context:
        before, after = self.context
        lo = max(row - before, 0)
        cols = {k: v[lo : row + after + 1] for k, v in self.token_table(shard).items()}
        same = np.flatnonzero(cols["seq"] == cols["seq"][row - lo])
        values = self.store.read(layer, shard, lo, lo + cols["seq"].size)[:, feature]
        return Context(
            shard, int(cols["seq"][row - lo]), int(cols["pos"][row - lo]), value,
            [self.text(int(t)) for t in cols["token"][same]],
            values.toarray().ravel()[same].tolist(), int(np.searchsorted(same, row - lo)),
        )  # fmt: skip

    def top_tokens(self, layer: int, feature: int, n: int = 5) -> list[tuple[str, int]]:
        tokens = self.summary(layer).top_tokens(feature)
        ids, counts = np.unique(tokens[tokens >= 0], return_counts=True)
        order = np.lexsort((ids, -counts))[:n]
        return [(self.text(int(ids[i])), int(counts[i])) for i in order]

    def concepts(self, layer: int | None = None, feature: int | None = None) -> pl.DataFrame:
        path = self.store.home / spec.CONCEPTS_DIR / CONCEPTS_FILE
        if not path.exists():
            return pl.DataFrame(schema={"concept": pl.String, "layer": pl.Int64,
                                        "feature": pl.Int64, "auroc": pl.Float64})  # fmt: skip
        frame = read_table(path, ["concept", "layer", "feature", "auroc"])
        if layer is not None:
            frame = frame.filter((pl.col("layer") == layer) & (pl.col("feature") == feature))
        return frame.sort("auroc", descending=True, nulls_last=True)

    def pair_rows(self, layer: int, other: int, feature: int, min_both: int = MIN_BOTH):
        """Every measure of the pairs of (layer, feature) with the features of `other` that
        were active together on >= min_both tokens: the sums by DuckDB, finished here."""
        up = other > layer
        a, b = (layer, other) if up else (other, layer)
        name = "feature_successor_sums" if up else "feature_predecessor_sums"
        sums = self.sql(name, {"layer_a": a, "layer_b": b, "feature": feature,
                               "min_both": min_both})  # fmt: skip
        stats_a, stats_b = self.stats(a), self.stats(b)
        counts = PairCounts(
            stats_a.n_tokens, stats_a.count.size, stats_b.count.size,
            *(sums[c].to_numpy() for c in ("feature_a", "feature_b", "n_both", "sum_xy")),
        )  # fmt: skip
        frame = finish_stats(counts, stats_a, stats_b)
        return frame.with_columns(layer_a=pl.lit(a), layer_b=pl.lit(b))

    def partners(
        self, layer: int, feature: int, measure: str = "pearson", n: int = 10,
        min_both: int = MIN_BOTH,
    ) -> list[Partners]:  # fmt: skip
        """The `n` strongest partners by `measure` in each layer with merged pair statistics."""
        check_measure_name(measure)
        out = []
        for other in self.layers:
            frame = self.pair_rows(layer, other, feature, min_both) if other != layer else None
            if frame is None or not frame.height:
                continue
            a, b = sorted((layer, other))
            frame = with_intervals(frame, self.stats(a), self.stats(b))
            frame = frame.sort(measure, descending=True, nulls_last=True).head(n)
            mine = "feature_a" if other < layer else "feature_b"
            side = "predecessors" if other < layer else "successors"
            out.append(Partners(other, side, frame.select(
                pl.lit(other).alias("layer"), pl.col(mine).cast(pl.Int64).alias("feature"),
                pl.exclude(*KEYS),
            )))  # fmt: skip
        return out

    def causal(self, layer: int, feature: int, n: int = 10) -> pl.DataFrame:
        """The `n` strongest measured effects of ablating the feature, and on it (exact where
        patched, attribution always)."""
        frame = self.sql("feature_causal_effects", {"layer": layer, "feature": feature})
        return frame.head(n).select(*CAUSAL_COLUMNS)

    def feature(
        self, layer: int, feature: int, measure: str = "pearson", n: int = 10
    ) -> FeatureView:
        """Everything a feature page shows."""
        self.check(layer, feature)
        stats = self.stats(layer)
        return FeatureView(
            layer, feature, stats.n_tokens, int(stats.count[feature]),
            float(stats.total[feature]),
            histogram_bins(self.summary(layer).histogram[feature]),
            self.contexts(layer, feature), self.concepts(layer, feature),
            self.top_tokens(layer, feature), self.partners(layer, feature, measure, n),
            self.causal(layer, feature), read_logit_effects(self.store, layer, feature),
        )  # fmt: skip


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """DuckDB reading the merged pair statistics and the causal edges of `store` in place
    (their Parquet files; only the fixed queries of `sql/` run on it, never a user's)."""
    con = duckdb.connect()
    files = [str(f) for f in pair_stats_files(store.home)]
    pairs = con.read_parquet(files, union_by_name=True) if files else None
    causal = store.home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE
    edges = con.read_parquet(str(causal)) if causal.exists() else None
    for name, rel, schema in (("pair_stats", pairs, PAIR_STATS_SCHEMA),
                              ("causal_edges", edges, CAUSAL_EDGES_SCHEMA)):  # fmt: skip
        (rel if rel is not None else con.from_arrow(schema.empty_table())).to_view(name)
    return con


def check_measure_name(measure: str) -> None:
    if measure not in MEASURES:
        raise FeatstoreError(f"unknown measure {measure!r}: use one of {', '.join(MEASURES)}")


def read_table(path: Path, columns: list[str]) -> pl.DataFrame:
    """A derived Parquet table; a damaged one is one line naming it."""
    try:
        return pl.read_parquet(path, columns=columns)
    except Exception as exc:
        raise FeatstoreError(f"cannot read {path}: {one_line(exc)}") from None


class Search:
    """Feature ids, tokens and concepts to features, over an `Explorer`'s summaries."""

    def __init__(self, ex: Explorer, limit: int = 50) -> None:
        self.ex, self.limit = ex, limit

    def __call__(self, query: str) -> list[tuple[tuple[int, int], str]]:
        query = query.strip()[:200]
        if not query:
            return []
        found = self.by_id(query) or self.by_concept(query) + self.by_token(query)
        return found[: self.limit]

    def by_id(self, query: str) -> list[tuple[tuple[int, int], str]]:
        layer, sep, feature = query.upper().removeprefix("L").replace("/", ":").partition(":")
        if sep and layer.isdigit() and feature.isdigit():
            node = (int(layer), int(feature))
            ok = node[0] in self.ex.layers and node[1] < self.ex.d_sae(node[0])
            return [(node, "feature")] if ok else []
        if query.isdigit():
            f = int(query)
            return [((x, f), "feature") for x in self.ex.layers if f < self.ex.d_sae(x)]
        return []

    def by_concept(self, query: str) -> list[tuple[tuple[int, int], str]]:
        table = self.ex.concepts()
        hit = table.filter(
            pl.col("concept").str.to_lowercase().str.contains(query.lower(), literal=True)
        )
        return [((int(x), int(f)), f"concept {c} (AUROC {a:.3f})")
                for c, x, f, a in hit.head(self.limit).iter_rows()]  # fmt: skip

    def by_token(self, query: str) -> list[tuple[tuple[int, int], str]]:
        vocab = self.ex._vocab or []
        wanted = query.lower()
        ids = np.array([i for i, t in enumerate(vocab) if t.strip().lower() == wanted], np.int64)
        if not ids.size:
            return []
        scored = []
        for layer in self.ex.layers:
            s = self.ex.summary(layer)
            feats = s.hits.feature[np.isin(s.tokens, ids)]
            counts = np.bincount(feats, minlength=s.d_sae)
            for f in np.flatnonzero(counts):
                scored.append((int(counts[f]), layer, int(f)))
        scored.sort(key=lambda t: (-t[0], t[1], t[2]))
        return [((x, f), f"{n} of its strongest activations on {query!r}")
                for n, x, f in scored[: self.limit]]  # fmt: skip


def labeller(ex: Explorer) -> Callable[[tuple[int, int]], str]:
    """A feature's label: its best concept (AUROC >= 0.7), else its most frequent tokens."""
    concepts = ex.concepts().filter(pl.col("auroc") >= 0.7)
    best = {}
    for c, x, f, _ in concepts.iter_rows():  # sorted by AUROC, best first
        best.setdefault((int(x), int(f)), c)

    def label(node: tuple[int, int]) -> str:
        if node in best:
            return best[node]
        return " ".join(f"'{t}'" for t, _ in ex.top_tokens(*node, n=3))

    return label
