"""Methods compared on the same tokens and SAEs.

For every feature of layer L its best successor at L+1 under each measure (data measures from one
compiled pass, `stats.bests`, that keeps each feature's bests and counts, never every co-active
pair; `decoder_cosine` from the SAEs; the causal effect from `{home}/causal/causal_edges.parquet`
when it exists), how often methods agree and how their scores
rank (Spearman), pairs above threshold in the data and in the null model, the share of features
with no predecessor ("from nowhere") with and without the null correction, best-match scores by
layer distance, and Louvain communities of the graph.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import polars as pl
import scipy.stats
from matplotlib.figure import Figure

from featstore.analysis.decoders import saved_decoder_cosine, store_decoders
from featstore.defaults import (
    DECODER_K,
    DEFAULT_ENGINE,
    EDGE_THRESHOLD,
    MEASURE_THRESHOLDS,
    MIN_BOTH,
)
from featstore.errors import FeatstoreError
from featstore.figures import no_data, pair_label, save
from featstore.files import write_parquet_atomic
from featstore.names import node_id
from featstore.progress import Progress, Ticker
from featstore.sources.registry import default_layers
from featstore.stats.bests import MEASURES, several_bests
from featstore.stats.finish import measure_values
from featstore.stats.measures import DATA_FREE, check_measure
from featstore.stats.scan import PairScan
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store import spec
from featstore.store.local import Store

KEYS = ["feature_a", "feature_b"]
CAUSAL = "causal"  # the method name of the patching effect |relative_effect|


@dataclass(frozen=True)
class CompareConfig:
    """What to compare: data measures with their thresholds, support, null quantile, ..."""

    layers: tuple[int, ...] = field(default_factory=default_layers)
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(MEASURE_THRESHOLDS))
    min_both: int = MIN_BOTH
    distances: tuple[int, ...] = (1, 2, 3)
    null_quantile: float = 0.95  # corrected threshold: this quantile of the null's best scores
    decoder_k: int = DECODER_K  # decoder cosines kept per feature; 0: no decoder_cosine method
    community_metric: str = "pearson"
    community_threshold: float = EDGE_THRESHOLD
    seed: int = 0
    engine: str = DEFAULT_ENGINE

    def __post_init__(self) -> None:
        for measure, threshold in self.thresholds.items():
            check_measure(measure, threshold)
            if measure in DATA_FREE:
                raise FeatstoreError(f"thresholds take data measures; {measure} is data-free")
        check_measure(self.community_metric, self.community_threshold)
        if self.community_metric not in MEASURES:
            raise FeatstoreError(
                f"community_metric takes a data measure, got {self.community_metric}"
            )
        if self.community_threshold <= 0:
            raise FeatstoreError("community_threshold must be > 0: it weights Louvain's edges")
        if not 0 < self.null_quantile < 1:
            raise FeatstoreError(f"null_quantile must lie in (0, 1), got {self.null_quantile}")
        if len(set(self.layers)) < 2:
            raise FeatstoreError(f"comparing needs at least two layers, got {list(self.layers)}")


@dataclass(frozen=True)
class PairSummary:
    """One pass over a layer pair: bests per feature (`method, feature, match, score`), counts
    above threshold (`measure -> pairs`), every method's best pairs with all scores, edges."""

    successors: pl.DataFrame
    predecessors: pl.DataFrame
    counts: dict[str, int]
    candidates: pl.DataFrame
    edges: pl.DataFrame


def best(frame: pl.DataFrame, by: str, other: str, score: str, method: str) -> pl.DataFrame:
    """Per value of `by`, the `other` with the largest finite `score` (ties: the first row)."""
    finite = frame.filter(pl.col(score).is_finite())
    return (
        finite.group_by(by, maintain_order=True)
        .agg(
            pl.lit(method).alias("method"),
            pl.col(other).get(pl.col(score).arg_max()).alias("match"),
            pl.col(score).max().cast(pl.Float64).alias("score"),
        )
        .select("method", pl.col(by).alias("feature"), "match", "score")
    )


def _bests_frame(value: np.ndarray, partner: np.ndarray, method: str) -> pl.DataFrame:
    """`method, feature, match, score` of the features with a finite best."""
    found = np.flatnonzero((partner >= 0) & np.isfinite(value))
    return pl.DataFrame(
        {"method": method, "feature": found, "match": partner[found], "score": value[found]},
        schema={"method": pl.String, "feature": pl.Int32, "match": pl.Int32,
                "score": pl.Float64},
    )  # fmt: skip


def _partners(frame: pl.DataFrame, d_a: int) -> np.ndarray:
    """A best frame's matches as an array over the features of A (-1: none)."""
    out = np.full(d_a, -1, np.int32)
    out[frame["feature"].to_numpy()] = frame["match"].to_numpy()
    return out


def summarize_pair(
    store: Store,
    a: int,
    b: int,
    cfg: CompareConfig,
    *,
    variant: Variant | None = None,
    extra: Mapping[str, pl.DataFrame] | None = None,
) -> PairSummary:
    """Bests, counts and candidates of one layer pair in one compiled pass (`stats.bests`: each
    feature's best per measure, counts above threshold and the edges, never every co-active
    pair); `extra` methods come as frames (feature_a, feature_b, score) computed elsewhere
    (decoder cosine, causal effect)."""
    extra = {k: f.with_columns(pl.col(KEYS).cast(pl.Int32)).sort(KEYS) for k, f in
             (extra or {}).items()}  # fmt: skip
    extra_best = {m: best(f, "feature_a", "feature_b", "score", m) for m, f in extra.items()}
    scan = PairScan.open(store, a, b, engine=cfg.engine, variant=variant, save=False)
    stats_a, stats_b = scan.stats
    d_a = stats_a.count.size
    found = several_bests(
        scan, cfg.thresholds, max(cfg.min_both, 1),
        edge=(cfg.community_metric, cfg.community_threshold),
        extra=[_partners(f, d_a) for f in extra_best.values()],
    )  # fmt: skip
    succ = [_bests_frame(*found.side(m, "a"), m) for m in cfg.thresholds]
    predecessors = [_bests_frame(*found.side(m, "b"), m) for m in cfg.thresholds]
    succ += extra_best.values()
    predecessors += [best(f, "feature_b", "feature_a", "score", m) for m, f in extra.items()]
    picks = found.picks
    scored = pl.DataFrame(
        {"feature_a": picks.feature_a, "feature_b": picks.feature_b,
         **measure_values(picks, stats_a, stats_b, list(cfg.thresholds))},
        schema_overrides={"feature_a": pl.Int32, "feature_b": pl.Int32},
    ).fill_nan(None)  # fmt: skip
    picked = pl.concat(
        [f.select(pl.col("feature").alias("feature_a"), pl.col("match").alias("feature_b"))
         for f in succ]
    ).with_columns(pl.col(KEYS).cast(pl.Int32))  # fmt: skip
    candidates = picked.unique().join(scored, on=KEYS, how="left")
    for method, frame in extra.items():
        scores = frame.select(pl.col(KEYS).cast(pl.Int32), pl.col("score").alias(method))
        candidates = candidates.join(scores, on=KEYS, how="left")
    edges = found.edges
    return PairSummary(
        pl.concat(succ),
        pl.concat(predecessors),
        {m: found.above[m] for m in cfg.thresholds},
        candidates.sort(KEYS),
        pl.DataFrame(
            {"feature_a": edges.feature_a, "feature_b": edges.feature_b,
             "n_both": edges.n_both, cfg.community_metric: edges.sum_xy},
            schema={"feature_a": pl.Int32, "feature_b": pl.Int32, "n_both": pl.Int64,
                    cfg.community_metric: pl.Float64},
        ),
    )  # fmt: skip


# -- the other methods -----------------------------------------------------------------------------


def causal_scores(store: Store) -> dict[tuple[int, int], pl.DataFrame]:
    """|relative_effect| of each patched pair per layer pair, when the causal table exists."""
    path = store.home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE
    if not path.exists():
        return {}
    frame = pl.read_parquet(path).filter(pl.col("relative_effect").is_finite())
    frame = frame.with_columns(score=pl.col("relative_effect").abs())
    return {
        (a, b): group.select(*KEYS, "score").sort(KEYS)
        for (a, b), group in frame.group_by("layer_a", "layer_b")
    }


def decoder_scores(
    store: Store, layers: Sequence[int], k: int, decoders: Mapping[int, np.ndarray] | None
) -> tuple[dict[tuple[int, int], pl.DataFrame], str | None]:
    """decoder_cosine top-k frames of adjacent layers, or none and why (no SAE for the source)."""
    if k <= 0:
        return {}, "decoder_k is 0"
    try:
        w = decoders or store_decoders(store, layers)
    except FeatstoreError as exc:
        return {}, str(exc)
    pairs = itertools.pairwise(sorted(layers))
    return {
        (a, b): saved_decoder_cosine(store, w[a], w[b], k).rename({"decoder_cosine": "score"})
        for a, b in pairs
    }, None


# -- the tables ------------------------------------------------------------------------------------


def method_agreement(summary: PairSummary, methods: Sequence[str]) -> pl.DataFrame:
    """Per pair of methods: features with a best successor under both, the share of them with
    the same one, and Spearman's rank correlation of the two scores over every method's bests."""
    succ = summary.successors
    rows = []
    for m1, m2 in itertools.combinations(methods, 2):
        both = succ.filter(pl.col("method") == m1).join(
            succ.filter(pl.col("method") == m2), on="feature", suffix="_2"
        )
        scored = (
            summary.candidates.select(m1, m2)
            .drop_nulls()
            .filter(pl.col(m1).is_finite() & pl.col(m2).is_finite())
        )
        rho = (
            scipy.stats.spearmanr(scored[m1], scored[m2]).statistic
            if scored.height >= 3
            else float("nan")
        )
        rows.append({
            "method_1": m1, "method_2": m2, "features": both.height,
            "share_same": (both["match"] == both["match_2"]).mean() if both.height else None,
            "spearman": rho, "scored_pairs": scored.height,
        })  # fmt: skip
    schema = {
        "method_1": pl.String,
        "method_2": pl.String,
        "features": pl.Int64,
        "share_same": pl.Float64,
        "spearman": pl.Float64,
        "scored_pairs": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema, strict=False).fill_nan(None)


def from_nowhere(
    layer: int, live: np.ndarray, data: PairSummary, null: PairSummary, cfg: CompareConfig
) -> pl.DataFrame:
    """Share of the live features of `layer` whose best predecessor misses the threshold, raw and
    with the threshold raised to the null model's `null_quantile` of best scores."""
    rows = []
    for m, t in cfg.thresholds.items():
        scores = {}
        for name, summary in (("data", data), ("null", null)):
            found = summary.predecessors.filter(pl.col("method") == m)
            feature, value = found["feature"].to_numpy(), found["score"].to_numpy()
            size = max(int(live.max(initial=-1)), int(feature.max(initial=-1))) + 1
            dense = np.full(size, -np.inf)
            dense[feature] = value
            score = dense[live]
            scores[name] = score
        q = (
            np.quantile(scores["null"], cfg.null_quantile, method="higher")
            if live.size
            else -np.inf
        )
        corrected = max(t, float(q))
        share = lambda s, x: float(np.mean(s < x)) if live.size else None  # noqa: E731
        rows.append({
            "layer": layer, "measure": m, "threshold": t, "live": live.size,
            "from_nowhere": share(scores["data"], t), "null_from_nowhere": share(scores["null"], t),
            "corrected_threshold": corrected,
            "from_nowhere_corrected": share(scores["data"], corrected),
        })  # fmt: skip
    return pl.DataFrame(rows)


def distance_table(successors: pl.DataFrame) -> pl.DataFrame:
    """Quantiles of best-successor scores per (layer_a, distance, method)."""
    return (
        successors.group_by("layer_a", "distance", "method")
        .agg(
            n=pl.len(),
            mean=pl.col("score").mean(),
            **{f"p{q}": pl.col("score").quantile(q / 100, "linear") for q in (10, 50, 90)},
        )
        .sort("method", "layer_a", "distance")
    )


def communities(edges: Mapping[tuple[int, int], pl.DataFrame], cfg: CompareConfig) -> pl.DataFrame:
    """Louvain communities (seeded) of the undirected graph weighted by the community metric.

    The graph holds only what Louvain reads: integer nodes (layer << 32 | feature) and one weight
    an edge, built undirected at once (no directed graph with every statistic, no copy).
    """
    graph = nx.Graph()
    for (a, b), frame in sorted(edges.items()):
        kept = frame.filter(
            (pl.col("n_both") >= cfg.min_both) & pl.col(cfg.community_metric).is_finite()
            & (pl.col(cfg.community_metric) >= cfg.community_threshold)
        )  # fmt: skip
        graph.add_weighted_edges_from(
            zip(
                ((a << 32) | kept["feature_a"].cast(pl.Int64).to_numpy()).tolist(),
                ((b << 32) | kept["feature_b"].cast(pl.Int64).to_numpy()).tolist(),
                kept[cfg.community_metric].to_list(),
                strict=True,
            ),
            weight=cfg.community_metric,
        )
    groups = (
        nx.community.louvain_communities(graph, weight=cfg.community_metric, seed=cfg.seed)
        if graph.number_of_edges()
        else []
    )
    del graph
    rows = []
    for nodes in sorted(groups, key=lambda g: (-len(g), min(g))):
        members = sorted(nodes)  # by layer, then feature
        per_layer = Counter(n >> 32 for n in members)
        rows.append(
            {
                "community": len(rows),
                "size": len(members),
                "layers": sorted(per_layer),
                "per_layer": [per_layer[x] for x in sorted(per_layer)],
                "members": [node_id(n >> 32, n & 0xFFFFFFFF) for n in members],
            }
        )
    schema = {
        "community": pl.Int64,
        "size": pl.Int64,
        "layers": pl.List(pl.Int64),
        "per_layer": pl.List(pl.Int64),
        "members": pl.List(pl.String),
    }
    return pl.DataFrame(rows, schema=schema)


# -- all of it -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Every table of the comparison (see `run_comparison` for the files)."""

    best_successors: pl.DataFrame  # layer_a, layer_b, method, feature, match, score
    agreement: pl.DataFrame  # layer_a, layer_b, method_1, method_2, share_same, spearman, ...
    null_counts: pl.DataFrame  # layer_a, layer_b, measure, threshold, data, null
    from_nowhere: pl.DataFrame  # layer, measure, threshold, live, from_nowhere, ...
    distance_scores: pl.DataFrame  # layer_a, distance, method, feature, score
    communities: pl.DataFrame  # community, size, layers, per_layer, members
    notes: list[str]

    def tables(self) -> dict[str, pl.DataFrame]:
        return {
            "best_successors": self.best_successors,
            "agreement": self.agreement,
            "null_counts": self.null_counts,
            "from_nowhere": self.from_nowhere,
            "distances": distance_table(self.distance_scores),
            "communities": self.communities,
        }


def _tag(frame: pl.DataFrame, **constants: int) -> pl.DataFrame:
    return frame.select(*(pl.lit(v, pl.Int64).alias(k) for k, v in constants.items()), pl.all())


def compare_methods(
    store: Store,
    cfg: CompareConfig,
    decoders: Mapping[int, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """All tables; `decoders` (W_dec per layer) replace loading the SAEs of the store's source;
    `progress` hears each layer pair done."""
    layers = sorted(cfg.layers)
    cosine, why = decoder_scores(store, layers, cfg.decoder_k, decoders)
    causal = causal_scores(store)
    notes = [f"no decoder_cosine: {why}"] if why else []
    notes += [] if causal else ["no causal table: no causal method"]
    best_rows, agree, nulls, nowhere, edges, summaries = [], [], [], [], {}, {}
    ticker = Ticker(progress, "comparison, layer pairs (data and null)", len(layers) - 1, every=0)
    for a, b in itertools.pairwise(layers):
        extra = {
            name: frames[(a, b)]
            for name, frames in (("decoder_cosine", cosine), (CAUSAL, causal))
            if (a, b) in frames
        }
        data = summaries[(a, b)] = summarize_pair(store, a, b, cfg, extra=extra)
        null = summarize_pair(store, a, b, cfg, variant=Variant(null=True))
        best_rows.append(_tag(data.successors, layer_a=a, layer_b=b))
        agree.append(_tag(method_agreement(data, [*cfg.thresholds, *extra]), layer_a=a, layer_b=b))
        nulls += [{"layer_a": a, "layer_b": b, "measure": m, "threshold": t,
                   "data": data.counts.get(m, 0), "null": null.counts.get(m, 0)}
                  for m, t in cfg.thresholds.items()]  # fmt: skip
        count = merged_feature_stats(store, b, store.shards(b)).count
        nowhere.append(from_nowhere(b, np.flatnonzero(count > 0), data, null, cfg))
        edges[(a, b)] = data.edges
        ticker.step(note=f" ({a}-{b} done)")
    distance = []
    for d in cfg.distances:
        for a in (x for x in layers if x + d in layers):
            summary = summaries.get((a, a + d)) or summarize_pair(store, a, a + d, cfg)
            scores = summary.successors.filter(pl.col("method").is_in(list(cfg.thresholds)))
            distance.append(_tag(scores, layer_a=a, distance=d))
    return Comparison(
        pl.concat(best_rows), pl.concat(agree), pl.DataFrame(nulls), pl.concat(nowhere),
        pl.concat(distance) if distance else pl.DataFrame(), communities(edges, cfg), notes,
    )  # fmt: skip


# -- figures ---------------------------------------------------------------------------------------


def agreement_figure(agreement: pl.DataFrame, path: Path, title: str) -> Path:
    """Per layer pair: share of features with the same best successor (colour, upper number)
    and Spearman's rho of the scores (lower number) for each pair of methods."""
    pairs = sorted(set(agreement.select("layer_a", "layer_b").iter_rows()))
    methods = list(dict.fromkeys([*agreement["method_1"], *agreement["method_2"]]))
    fig = Figure(
        figsize=(1.0 + 0.9 * len(methods) * max(len(pairs), 1), 1.5 + 0.8 * len(methods)),
        layout="constrained",
    )
    fig.suptitle(f"best successor agreement between methods — {title}")
    if not pairs:
        no_data(fig, "no layer pairs")
        return save(fig, path)
    for ax, (a, b) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs, strict=True):
        share = np.eye(len(methods))
        for row in agreement.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).iter_rows(
            named=True
        ):
            i, j = methods.index(row["method_1"]), methods.index(row["method_2"])
            share[i, j] = share[j, i] = np.nan if row["share_same"] is None else row["share_same"]
            rho = "–" if row["spearman"] is None else f"{row['spearman']:.2f}"
            for x, y in ((i, j), (j, i)):
                ax.text(y, x, f"{share[i, j]:.2f}\nρ {rho}", ha="center", va="center", fontsize=7)
        ax.imshow(share, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(pair_label((a, b)), fontsize=10)
    return save(fig, path)


def distance_figure(scores: pl.DataFrame, path: Path, title: str) -> Path:
    """Per measure: box plots of best-successor scores at L+1, L+2, L+3 (layers pooled)."""
    methods = list(dict.fromkeys(scores["method"])) if scores.height else []
    fig = Figure(figsize=(3.2 * max(len(methods), 1), 3.6), layout="constrained")
    fig.suptitle(f"best-match score by layer distance — {title}")
    if not methods:
        no_data(fig, "no scores")
        return save(fig, path)
    for ax, m in zip(fig.subplots(1, len(methods), squeeze=False)[0], methods, strict=True):
        mine = scores.filter(pl.col("method") == m)
        ds = sorted(set(mine["distance"]))
        ax.boxplot(
            [mine.filter(pl.col("distance") == d)["score"].to_numpy() for d in ds],
            tick_labels=[f"L+{d}" for d in ds],
            showfliers=False,
        )
        ax.set_title(m, fontsize=10)
    return save(fig, path)


def null_figure(nulls: pl.DataFrame, path: Path, title: str) -> Path:
    """Pairs above threshold in the data and in the null model, per measure and layer pair."""
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    fig.suptitle(f"pairs above threshold: data vs null — {title}")
    if not nulls.height:
        no_data(fig, "no layer pairs")
        return save(fig, path)
    ax = fig.add_subplot()
    labels = [f"{r['measure']}\n{r['layer_a']}-{r['layer_b']}" for r in nulls.iter_rows(named=True)]
    x = np.arange(nulls.height)
    ax.bar(x - 0.2, nulls["data"] + 1, 0.4, label="data")
    ax.bar(x + 0.2, nulls["null"] + 1, 0.4, label="null (sequences deranged)")
    ax.set_yscale("log")
    ax.set_ylabel("pairs + 1")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.legend(fontsize=8)
    return save(fig, path)


def run_comparison(
    store: Store,
    cfg: CompareConfig,
    out: str | Path,
    decoders: Mapping[int, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> tuple[Comparison, dict[str, Path]]:
    """`compare_methods`, written to `out`: one Parquet file per table (members as lists) and
    agreement.png, distances.png, null_counts.png."""
    result = compare_methods(store, cfg, decoders, progress)
    out = Path(out)
    paths = {
        name: write_parquet_atomic(frame, out / f"{name}.parquet")
        for name, frame in result.tables().items()
    }
    layers = sorted(cfg.layers)
    title = f"layers {layers[0]}-{layers[-1]}, min_both {cfg.min_both}"
    paths["agreement_png"] = agreement_figure(result.agreement, out / "agreement.png", title)
    paths["distances_png"] = distance_figure(result.distance_scores, out / "distances.png", title)
    paths["null_counts_png"] = null_figure(result.null_counts, out / "null_counts.png", title)
    return result, paths
