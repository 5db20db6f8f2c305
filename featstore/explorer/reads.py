"""What one feature's page needs, by indexed queries, never by loading a layer.

`Explorer` answers each page from: the store's SQL index (`featstore.store.sqlindex`, one DuckDB
file per (layer, shard) sorted by (feature, row); a feature filter reads only the row groups that
hold the feature): the feature's nonzeros give its histogram, its strongest activations and the
tokens of its label; the feature's stored sums (`Store.feature_stats`, d_sae numbers a shard);
the token tables (12 bytes a token, read once a shard) around each context; the merged pair
statistics of each layer pair (four columns of the feature's rows: successors from
`pair_stats/{a}-{b}.parquet`, sorted by feature_a, `sql/feature_*_sums.sql`; predecessors from
its copy sorted by feature_b, `featstore.store.pairindex`); the null model of the partners
shown (`featstore.stats.shifted`, from the partners' nonzeros and the token tables); the causal
edges
(`sql/feature_causal_effects.sql`), the best concepts (`concepts/best_features.parquet`) and the
logit effects (`logits/logit_effects.parquet`) where the pipeline wrote them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from featstore.analysis.cards import check_feature
from featstore.analysis.logits import read_logit_effects
from featstore.defaults import DEFAULT_MEASURE, MIN_BOTH, NULL_SHIFTS
from featstore.errors import FeatstoreError
from featstore.sequences import token_text
from featstore.stats.finish import finish_stats
from featstore.stats.kernel import PairCounts
from featstore.stats.measures import with_intervals
from featstore.stats.shardsums import merged_feature_stats
from featstore.stats.shifted import SequenceShifts, null_summary, shifted_sums
from featstore.store import pairindex, spec
from featstore.store import sql as store_sql
from featstore.store.local import FeatureStats, Store
from featstore.store.sql import CAUSAL_EDGES_SCHEMA, PAIR_STATS_SCHEMA, named_query, one_line
from featstore.store.sqlindex import literal

CONTEXT = (8, 4)  # tokens shown before and after an activation
LABEL_HITS = 32  # a label's tokens: the most frequent among the feature's strongest activations
HIST_EDGES = np.geomspace(1e-4, 1e4, 81)  # log-spaced: 10 bins per decade
KEYS = ("layer_a", "layer_b", "feature_a", "feature_b", "n_tokens")
MEASURES = tuple(f.name for f in PAIR_STATS_SCHEMA if f.name not in KEYS)
NULL_COLUMNS = ("null_mean", "null_sd", "null_z", "null_p")
CONCEPTS_FILE = "best_features.parquet"
CAUSAL_COLUMNS = ("layer_a", "feature_a", "layer_b", "feature_b", "n_tokens", "asked_by",
                  "relative_effect", "relative_attribution", "share_off", "share_on")  # fmt: skip
# Shards as their index in the layer's list (no string per nonzero: a dense feature has 10^5).
HITS_QUERY = ("SELECT list_position($shards, shard) - 1 AS shard, row, value, token "
              "FROM activations WHERE layer = $layer AND feature = $feature")  # fmt: skip
# Several features of a layer: one feature filter each, so each reads only its row groups.
MANY_QUERY = ("SELECT feature, list_position($shards, shard) - 1 AS shard, row, value, token "
              "FROM activations WHERE layer = $layer AND feature IN ({})")  # fmt: skip
TOKEN_QUERY = ("SELECT layer, feature, count(*) AS n FROM activations "
               "WHERE token IN (SELECT unnest($ids)) GROUP BY layer, feature "
               "ORDER BY n DESC, layer, feature LIMIT $limit")  # fmt: skip


@dataclass(frozen=True)
class Hits:
    """One feature's nonzeros in a layer, by shard (index into the layer's shards) then row."""

    shard: np.ndarray  # int32
    row: np.ndarray  # int64
    value: np.ndarray  # float32
    token: np.ndarray  # int64 (-1: unknown)

    @staticmethod
    def of(columns: dict[str, np.ndarray]) -> Hits:
        """From a query's columns (`shard`: index into the layer's shards, -1: a shard the
        explorer does not know, left out), in any order."""
        shard = np.asarray(columns["shard"], np.int32)
        row = np.asarray(columns["row"], np.int64)
        # One int64 key, timsort: each index file returns its rows in order, so this merges runs.
        order = np.argsort((shard.astype(np.int64) << 32) | row, kind="stable")
        order = order[shard[order] >= 0]
        token = np.asarray(columns["token"])
        token = np.where(np.ma.getmaskarray(token), -1, np.ma.getdata(token)).astype(np.int64)
        value = np.asarray(columns["value"], np.float32)
        return Hits(shard[order], row[order], value[order], token[order])

    def strongest(self, n: int, among: np.ndarray | None = None) -> np.ndarray:
        """Positions of the `n` largest values (ties: earlier shard, then row), `among` those
        positions only (a boolean mask) if given."""
        if among is None:
            return strongest(self.value, min(n, self.value.size))
        return strongest(np.where(among, self.value, -np.inf), min(n, int(among.sum())))

    def in_shard(self, i: int) -> slice:
        lo, hi = np.searchsorted(self.shard, [i, i + 1])
        return slice(int(lo), int(hi))

    def histogram(self) -> np.ndarray:
        """Counts below the first edge, in each bin of `HIST_EDGES`, above the last."""
        bins = np.searchsorted(HIST_EDGES, self.value[self.value > 0], side="right")
        return np.bincount(bins, minlength=HIST_EDGES.size + 1)


def strongest(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` largest `values`, largest first, ties in position order (a partial
    sort: a dense feature has ~10^5 values)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if n < values.size:
        least = np.partition(values, values.size - n)[values.size - n]
        candidates = np.flatnonzero(values >= least)
    else:
        candidates = np.arange(values.size)
    return candidates[np.argsort(-values[candidates], kind="stable")][:n]


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
    frame: pl.DataFrame  # layer, feature, every measure, its 95% interval, the null, sorted


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
    null_shifts: int = NULL_SHIFTS  # alignments of the partners' null model

    @property
    def frequency(self) -> float:
        return self.count / self.n_tokens if self.n_tokens else float("nan")


def histogram_bins(counts: np.ndarray) -> list[tuple[float, float, int]]:
    """The occupied range of a histogram (`Hits.histogram`) as (lo, hi, count) rows."""
    edges = np.concatenate([[0.0], HIST_EDGES, [np.inf]])
    hit = np.flatnonzero(counts)
    if not hit.size:
        return []
    return [(float(edges[i]), float(edges[i + 1]), int(counts[i]))
            for i in range(hit[0], hit[-1] + 1)]  # fmt: skip


class Explorer:
    """Read-only answers about the features of one store (see module doc). The SQL index is
    brought in step with the store on first use (`warm` does it at once)."""

    def __init__(
        self, store: Store, top: int = 20, context: tuple[int, int] = CONTEXT,
        null_shifts: int = NULL_SHIFTS,
    ) -> None:  # fmt: skip
        if isinstance(null_shifts, bool) or not isinstance(null_shifts, int) or null_shifts < 2:
            raise FeatstoreError(f"null_shifts must be an integer >= 2, got {null_shifts!r}")
        self.store, self.top, self.context = store, top, context
        self.ks = np.arange(1, null_shifts + 1)
        self.layers = store.layers()
        self._shards = {x: tuple(store.shards(x)) for x in self.layers}
        self._lock, self._index_lock = threading.Lock(), threading.Lock()
        self._pair_lock = threading.Lock()
        self._pair_dbs: dict[tuple[int, int], tuple[str, str]] = {}  # name, table's stamp
        self._stats: dict[int, FeatureStats] = {}
        self._vocab = store.vocab()
        self._index: store_sql.Connection | None = None
        self._files = connect(store)
        self._tokens: dict[str, dict[str, np.ndarray]] = {}
        self._shifts: dict[str, SequenceShifts] = {}
        self._labels: dict[tuple[int, int], list[tuple[str, int]]] = {}

    # -- cached ----------------------------------------------------------------------------------

    def index(self) -> store_sql.Connection:
        """The SQL index's `activations` view (built or refreshed once, on first use)."""
        with self._index_lock:  # its own lock: a build never holds up the other caches
            if self._index is None:
                self._index = store_sql.connect(self.store, views=("activations",))
            return self._index

    def stats(self, layer: int) -> FeatureStats:
        with self._lock:
            if layer not in self._stats:
                self._stats[layer] = merged_feature_stats(self.store, layer, self._shards[layer])
            return self._stats[layer]

    def token_table(self, shard: str) -> dict[str, np.ndarray]:
        """A shard's token columns (12 bytes a token), read once."""
        with self._lock:
            if shard not in self._tokens:
                table = self.store.tokens(shard)
                self._tokens[shard] = {c: table[c].to_numpy() for c in table.columns}
            return self._tokens[shard]

    def shifts(self, shard: str) -> SequenceShifts:
        table = self.token_table(shard)
        with self._lock:
            if shard not in self._shifts:
                self._shifts[shard] = SequenceShifts.of(table["seq"], table["pos"])
            return self._shifts[shard]

    def pair_index(self, a: int, b: int) -> str | None:
        """The attached name of the fresh by-feature_b copy of `pair_stats/{a}-{b}.parquet`
        (`featstore.store.pairindex`; built or rebuilt when the table changed); None without
        a table, or where the index cannot be written (then the table is scanned)."""
        parquet = self.store.home / spec.PAIR_STATS_DIR / f"{a}-{b}.parquet"
        try:
            now = pairindex.stamp(parquet)
        except OSError:
            return None
        with self._pair_lock:
            db, seen = self._pair_dbs.get((a, b), (None, None))
            if seen == now:
                return db
            try:
                file = pairindex.ensure(self.store, a, b, parquet)
            except (OSError, FeatstoreError):
                return None
            if db is not None:
                self._files.execute(f"DETACH {db}")
            db = f"pairs_{a}_{b}_{len(self._pair_dbs)}_{uuid.uuid4().hex[:6]}"
            self._files.execute(f"ATTACH {literal(str(file))} AS {db} (READ_ONLY)")
            self._pair_dbs[(a, b)] = (db, now)
            return db

    def warm(self) -> None:
        """Bring the SQL index and the pair tables' indexes in step with the store, and read
        the token tables (and their sequences' shifts) that contexts and the null model use."""
        self.index()
        for a, b in zip(self.layers, self.layers[1:], strict=False):
            self.pair_index(a, b)
        for shard in self.store.token_shards():
            self.shifts(shard)

    def d_sae(self, layer: int) -> int:
        return int(self.stats(layer).count.size)

    def check(self, layer: int, feature: int) -> None:
        check_feature(self.store, layer, feature)

    def text(self, token: int) -> str:
        return token_text(token, self._vocab)

    # -- queries ---------------------------------------------------------------------------------

    def _run(self, con, query: str, params: dict) -> dict[str, np.ndarray]:
        try:
            return con.cursor().execute(query, params).fetchnumpy()
        except duckdb.Error as exc:
            raise FeatstoreError(one_line(exc).removeprefix("Invalid Input Error: ")) from None

    def sql(self, name: str, params: dict) -> pl.DataFrame:
        """A named query of `sql/` over the pair statistics and causal edges."""
        try:
            return self._files.cursor().sql(named_query(name), params=params).pl()
        except duckdb.Error as exc:
            raise FeatstoreError(one_line(exc)) from None

    def hits(self, layer: int, feature: int) -> Hits:
        """Every nonzero of the feature (an indexed query: the row groups holding it)."""
        params = {"layer": layer, "feature": feature, "shards": list(self._shards[layer])}
        return Hits.of(self._run(self.index().duckdb, HITS_QUERY, params))

    def many_hits(self, layer: int, features: list[int]) -> dict[int, Hits]:
        """The nonzeros of several features of a layer, in one indexed query."""
        if not features:
            return {}
        query = MANY_QUERY.format(", ".join(str(int(f)) for f in sorted(set(features))))
        params = {"layer": layer, "shards": list(self._shards[layer])}
        cols = self._run(self.index().duckdb, query, params)
        order = np.argsort(cols["feature"], kind="stable")
        cols = {k: np.ma.filled(v, -1)[order] for k, v in cols.items()}
        wanted = sorted(set(features))
        ends = np.searchsorted(cols["feature"], [*wanted, wanted[-1] + 1])
        return {f: Hits.of({k: v[ends[i] : ends[i + 1]] for k, v in cols.items()})
                for i, f in enumerate(wanted)}  # fmt: skip

    def contexts(self, layer: int, feature: int, hits: Hits | None = None) -> list[Context]:
        """The strongest activations with the tokens around each and the feature's value on
        each of those tokens (same sequence only)."""
        hits = self.hits(layer, feature) if hits is None else hits
        shards = self._shards[layer]
        have = set(self.store.token_shards())
        with_tokens = np.isin(hits.shard, [i for i, s in enumerate(shards) if s in have])
        chosen = hits.strongest(self.top, with_tokens)
        return [self._context(hits, shards, int(i)) for i in chosen]

    def _context(self, hits: Hits, shards: tuple[str, ...], i: int) -> Context:
        before, after = self.context
        index, row = int(hits.shard[i]), int(hits.row[i])
        table = self.token_table(shards[index])
        lo = max(row - before, 0)
        cols = {k: v[lo : row + after + 1] for k, v in table.items()}
        same = np.flatnonzero(cols["seq"] == cols["seq"][row - lo])
        mine = hits.in_shard(index)
        rows, values = hits.row[mine], hits.value[mine]
        window = lo + same
        at = np.minimum(np.searchsorted(rows, window), max(rows.size - 1, 0))
        shown = np.where(rows[at] == window, values[at], 0.0) if rows.size else window * 0.0
        return Context(
            shards[index], int(cols["seq"][row - lo]), int(cols["pos"][row - lo]),
            float(hits.value[i]), [self.text(int(t)) for t in cols["token"][same]],
            shown.astype(np.float64).tolist(), int(np.searchsorted(same, row - lo)),
        )  # fmt: skip

    def top_tokens(
        self, layer: int, feature: int, n: int = 5, hits: Hits | None = None
    ) -> list[tuple[str, int]]:
        """The most frequent tokens among the feature's `LABEL_HITS` strongest activations."""
        hits = self.hits(layer, feature) if hits is None else hits
        tokens = hits.token[hits.strongest(LABEL_HITS)]
        ids, counts = np.unique(tokens[tokens >= 0], return_counts=True)
        order = np.lexsort((ids, -counts))[:n]
        return [(self.text(int(ids[i])), int(counts[i])) for i in order]

    def label_tokens(self, nodes: list[tuple[int, int]]) -> None:
        """Fetch the label tokens of `nodes` (one query a layer), for `labeller`."""
        todo: dict[int, list[int]] = {}
        for x, f in nodes:
            if (x, f) not in self._labels and x in self._shards:
                todo.setdefault(x, []).append(f)
        for x, features in todo.items():
            for f, hits in self.many_hits(x, features).items():
                self._labels[(x, f)] = self.top_tokens(x, f, 3, hits)

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
        were active together on >= min_both tokens: the sums by DuckDB from the layer pair's
        merged file, finished here."""
        up = other > layer
        a, b = (layer, other) if up else (other, layer)
        stats_a, stats_b = self.stats(a), self.stats(b)
        params = {"feature": feature, "min_both": min_both}
        db = None if up else self.pair_index(a, b)
        if db is not None:  # the table's copy sorted by feature_b: only that feature's rows
            try:
                sums = self._files.cursor().sql(pairindex.PREDECESSORS.format(db=db),
                                                params=params).pl()  # fmt: skip
            except duckdb.Error as exc:
                raise FeatstoreError(one_line(exc)) from None
        else:
            name = "feature_successor_sums" if up else "feature_predecessor_sums"
            sums = self.sql(name, {"layer_a": a, "layer_b": b, **params})
        counts = PairCounts(
            stats_a.n_tokens, stats_a.count.size, stats_b.count.size,
            *(sums[c].to_numpy() for c in ("feature_a", "feature_b", "n_both", "sum_xy")),
        )  # fmt: skip
        frame = finish_stats(counts, stats_a, stats_b)
        return frame.with_columns(layer_a=pl.lit(a), layer_b=pl.lit(b))

    def partners(
        self, layer: int, feature: int, measure: str = DEFAULT_MEASURE, n: int = 10,
        min_both: int = MIN_BOTH, hits: Hits | None = None,
    ) -> list[Partners]:  # fmt: skip
        """The `n` strongest partners by `measure` in each layer with merged pair statistics,
        each against the null model (`null_columns`)."""
        check_measure_name(measure)
        hits = self.hits(layer, feature) if hits is None else hits
        out = []
        for other in self.layers:
            frame = self.pair_rows(layer, other, feature, min_both) if other != layer else None
            if frame is None or not frame.height:
                continue
            a, b = sorted((layer, other))
            frame = with_intervals(frame, self.stats(a), self.stats(b))
            frame = frame.sort(measure, descending=True, nulls_last=True).head(n)
            frame = frame.hstack(self.null_columns(layer, feature, hits, other, frame, measure))
            mine = "feature_a" if other < layer else "feature_b"
            side = "predecessors" if other < layer else "successors"
            out.append(Partners(other, side, frame.select(
                pl.lit(other).alias("layer"), pl.col(mine).cast(pl.Int64).alias("feature"),
                pl.exclude(*KEYS),
            )))  # fmt: skip
        return out

    def null_values(
        self, layer: int, feature: int, hits: Hits, other: int, features: list[int]
    ) -> pl.DataFrame:
        """Every measure of (layer, feature) with each of `features` of `other` under each
        shift of `self.ks` (`featstore.stats.shifted`): feature_a, feature_b, shift, measures.
        Empty where a shard has no token table (no sequences to shift)."""
        a, b = sorted((layer, other))
        stats_a, stats_b = self.stats(a), self.stats(b)
        shards = self._shards[layer]
        if set(shards) - set(self.store.token_shards()) or shards != self._shards[other]:
            return pl.DataFrame()
        theirs = self.many_hits(other, features)
        k = self.ks.size
        n_both = np.zeros((len(features), k), np.int64)
        sum_xy = np.zeros((len(features), k), np.float64)
        for i, shard in enumerate(shards):
            shifts, n_rows = self.shifts(shard), self.token_table(shard)["seq"].size
            here = hits.in_shard(i)
            for j, g in enumerate(features):
                there = theirs[g].in_shard(i)
                sides = [(hits.row[here], hits.value[here]),
                         (theirs[g].row[there], theirs[g].value[there])]  # fmt: skip
                (ra, va), (rb, vb) = sides if layer < other else sides[::-1]
                got = shifted_sums(shifts, n_rows, ra, va.astype(np.float64), rb,
                                   vb.astype(np.float64), self.ks)  # fmt: skip
                n_both[j] += got[0]
                sum_xy[j] += got[1]
        mine = np.full(n_both.size, feature, np.int32)
        yours = np.repeat(np.asarray(features, np.int32), k)
        fa, fb = (mine, yours) if layer < other else (yours, mine)
        counts = PairCounts(stats_a.n_tokens, stats_a.count.size, stats_b.count.size,
                            fa, fb, n_both.ravel(), sum_xy.ravel())  # fmt: skip
        frame = finish_stats(counts, stats_a, stats_b)
        return frame.with_columns(shift=pl.Series(np.tile(self.ks, len(features))))

    def null_columns(
        self, layer: int, feature: int, hits: Hits, other: int, frame: pl.DataFrame, measure: str
    ) -> pl.DataFrame:
        """For each partner row of `frame`, its `measure` against the null model's values of
        the same pair (`null_summary`: mean, sd, z, p)."""
        theirs = "feature_a" if other < layer else "feature_b"
        partners = frame[theirs].to_list()
        null = self.null_values(layer, feature, hits, other, partners)
        rows = []
        for g, value in zip(partners, frame[measure].to_list(), strict=True):
            values = (null.filter(pl.col(theirs) == g)[measure].to_numpy().astype(np.float64)
                      if null.height else np.zeros(0))  # fmt: skip
            rows.append(null_summary(value, values))
        return pl.DataFrame(rows, schema=dict.fromkeys(NULL_COLUMNS, pl.Float64), orient="row")

    def causal(self, layer: int, feature: int, n: int = 10) -> pl.DataFrame:
        """The `n` strongest measured effects of ablating the feature, and on it (exact where
        patched, attribution always)."""
        frame = self.sql("feature_causal_effects", {"layer": layer, "feature": feature})
        return frame.head(n).select(*CAUSAL_COLUMNS)

    def feature(
        self, layer: int, feature: int, measure: str = DEFAULT_MEASURE, n: int = 10
    ) -> FeatureView:
        """Everything a feature page shows."""
        self.check(layer, feature)
        check_measure_name(measure)
        stats = self.stats(layer)
        hits = self.hits(layer, feature)
        partners = self.partners(layer, feature, measure, n, hits=hits)
        self.label_tokens([(p.layer, f) for p in partners for f in p.frame["feature"]])
        return FeatureView(
            layer, feature, stats.n_tokens, int(stats.count[feature]),
            float(stats.total[feature]), histogram_bins(hits.histogram()),
            self.contexts(layer, feature, hits), self.concepts(layer, feature),
            self.top_tokens(layer, feature, hits=hits), partners,
            self.causal(layer, feature), read_logit_effects(self.store, layer, feature),
            int(self.ks.size),
        )  # fmt: skip


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """DuckDB reading the merged pair statistics and the causal edges of `store` in place
    (their Parquet files, DuckDB's own reader: a query reads only the columns it names and the
    row groups its filters admit; only the fixed queries of `sql/` run on it, never a user's)."""
    con = duckdb.connect()
    files = [str(f) for f in store_sql.pair_stats_files(store.home)]
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
    """Feature ids, tokens and concepts to features, by indexed queries."""

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
        """The features most often active on the token (one scan of the index's token
        column)."""
        vocab = self.ex._vocab or []
        wanted = query.lower()
        ids = [i for i, t in enumerate(vocab) if t.strip().lower() == wanted]
        if not ids:
            return []
        cols = self.ex._run(self.ex.index().duckdb, TOKEN_QUERY,
                            {"ids": ids, "limit": self.limit})  # fmt: skip
        found = zip(cols["layer"], cols["feature"], cols["n"], strict=True)
        return [((int(x), int(f)), f"active {n} times on {query!r}") for x, f, n in found]


def labeller(ex: Explorer) -> Callable[[tuple[int, int]], str]:
    """A feature's label: its best concept (AUROC >= 0.7), else its most frequent tokens
    (fetched by `Explorer.label_tokens` in one query a layer, or one query a node)."""
    concepts = ex.concepts().filter(pl.col("auroc") >= 0.7)
    best = {}
    for c, x, f, _ in concepts.iter_rows():  # sorted by AUROC, best first
        best.setdefault((int(x), int(f)), c)

    def label(node: tuple[int, int]) -> str:
        if node in best:
            return best[node]
        if node not in ex._labels:
            ex.label_tokens([node])
        return " ".join(f"'{t}'" for t, _ in ex._labels.get(node, []))

    return label
