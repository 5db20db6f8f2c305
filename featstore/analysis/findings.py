"""The study's conjectures answered: one row per statistic with a 95% bootstrap interval, the
null or control it is compared with, and a verdict by the rule of docs/FINDINGS.md.

Every row's `effect` is the statistic minus its control, bootstrapped over features (the unit
each row names): **supported** where the whole 95% interval of the effect lies above 0, **not
supported** where it lies at or below 0, **inconclusive** otherwise (or when not computable).
The verdicts are about the store's source (its model and SAEs): on `tiny` they say nothing of
GPT-2 small. Evidence: `featstore.analysis.evidence`; the table is
`{home}/findings/findings.parquet` (the `findings` SQL view), the page `findings.md`, one PNG
per conjecture.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from featstore.analysis import evidence
from featstore.analysis.gates import all_parent_sets, parent_sets
from featstore.analysis.passthrough import (
    flow_counts,
    flow_figure,
    pass_through_links,
    run_pass_through,
)
from featstore.defaults import MIN_BOTH
from featstore.errors import FeatstoreError
from featstore.figures import save
from featstore.files import atomic_file, output_folder, write_parquet_atomic
from featstore.stats.best import best_both
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store import spec
from featstore.store.local import Store
from featstore.store.sql import FINDINGS_SCHEMA

NULL = "null model: the later layer's sequences deranged (docs/MEASURES.md)"


@dataclass(frozen=True)
class FindingsConfig:
    """What the findings are computed on and with."""

    layers: tuple[int, ...]
    shards: tuple[str, ...] | None = None
    gate_threshold: float = 0.999  # necessity/sufficiency of a gate partner (spar-2024)
    gate_min_both: int = 10
    pass_pearson: float = 0.95
    vanishing_necessity: float = 0.4
    max_distance: int = 3
    n_boot: int = 1000
    seed: int = 0
    max_sequences: int = 16  # per shard, for C3a's forward passes
    max_features: int = 200  # vanishing features and controls each, for C3a
    concept_set: str | None = None  # C1's concepts (default: the set for the store's source)
    concept_sequences: int | None = None  # per shard, for C1's concept AUROC (None: all)

    def __post_init__(self) -> None:
        if len(self.layers) < 2 or list(self.layers) != sorted(set(self.layers)):
            raise FeatstoreError(f"findings need two or more increasing layers, got {self.layers}")
        if not (0 < self.gate_threshold <= 1 and 0 < self.pass_pearson <= 1):
            raise FeatstoreError("gate_threshold and pass_pearson must be in (0, 1]")
        if self.n_boot < 100:
            raise FeatstoreError(f"n_boot must be at least 100, got {self.n_boot}")
        if not 0 <= self.vanishing_necessity <= 1:
            raise FeatstoreError(f"vanishing_necessity must be in [0, 1], got "
                                 f"{self.vanishing_necessity}")  # fmt: skip
        counts = {"gate_min_both": self.gate_min_both, "max_distance": self.max_distance,
                  "max_sequences": self.max_sequences, "max_features": self.max_features,
                  "concept_sequences": self.concept_sequences or 1}  # fmt: skip
        for name, value in counts.items():
            if value < 1:
                raise FeatstoreError(f"{name} must be at least 1, got {value}")

    def checked_shards(self, store: Store) -> list[str]:
        """The shards to use (default: every shard of the first layer), each layer and shard
        checked to be in the store, before anything is computed or written."""
        have = store.layers()
        missing = [layer for layer in self.layers if layer not in have]
        if missing:
            raise FeatstoreError(f"layers {missing} are not in the store (it has {have})")
        shards = list(self.shards or store.shards(self.layers[0]))
        for layer in self.layers:
            absent = sorted(set(shards) - set(store.shards(layer)))
            if absent:
                raise FeatstoreError(f"layer {layer} has no shard {', '.join(absent)}")
        if not shards:
            raise FeatstoreError("the store has no shards")
        return shards


def verdict(lo: float, hi: float) -> str:
    """The rule of docs/FINDINGS.md on the effect's 95% interval."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    return "supported" if lo > 0 else "not supported" if hi <= 0 else "inconclusive"


Stat = Callable[[Sequence[np.ndarray]], float]


def bootstrap(samples: Sequence[np.ndarray], stat: Stat, n_boot: int, seed: int):
    """(statistic, 2.5% and 97.5% percentiles over `n_boot` resamples of each sample's rows)."""
    if any(len(s) == 0 for s in samples):
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    boots = [stat([s[rng.integers(0, len(s), len(s))] for s in samples]) for _ in range(n_boot)]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return float(stat(samples)), float(lo), float(hi)


def diff_of_means(samples: Sequence[np.ndarray]) -> float:
    return float(np.mean(samples[0]) - np.mean(samples[1]))


def paired_diff(samples: Sequence[np.ndarray]) -> float:
    return float(np.mean(samples[0][:, 0] - samples[0][:, 1]))


def row(conjecture, statistic, observed, control, control_value, effect, unit, n, plot) -> dict:
    value, lo, hi = effect
    return dict(
        conjecture=conjecture, statistic=statistic, observed=observed, control=control,
        control_value=control_value, effect=value, effect_lo=lo, effect_hi=hi,
        verdict=verdict(lo, hi), unit=unit, n=n, plot=plot,
    )  # fmt: skip


def c1_rows(store: Store, cfg: FindingsConfig, shards: list[str], out: Path) -> list[dict]:
    """C1: the current token explains more of early features' activity than of late ones';
    early layers detect syntax concepts better than late ones, beyond context concepts."""
    first, last = cfg.layers[0], cfg.layers[-1]
    excess = {}
    for layer in cfg.layers:
        data = evidence.token_explained(store, layer, shards)
        null = evidence.token_explained(store, layer, shards, shuffle_seed=cfg.seed)
        excess[layer] = data["eta2"].to_numpy() - null["eta2"].to_numpy()
    effect = bootstrap([excess[first], excess[last]], diff_of_means, cfg.n_boot, cfg.seed)
    plot = _bars(
        {f"L{k}": v for k, v in excess.items()}, "mean eta^2 on the token minus shuffled tokens",
        "C1: how much of a feature's activity the current token explains", out / "c1.png",
    )  # fmt: skip
    return [row(
        "C1", f"mean token eta^2 (above shuffled-token null) of L{first} minus L{last} features",
        float(np.mean(excess[first])), f"the same of L{last}", float(np.mean(excess[last])),
        effect, "features", int(excess[first].size + excess[last].size), plot.name,
    ), c1_concept_row(store, cfg, shards, out)]  # fmt: skip


def c1_concept_row(store: Store, cfg: FindingsConfig, shards: list[str], out: Path) -> dict:
    """C1 by concept kind: per concept, the best AUROC at the first layer minus at the last;
    syntax concepts against context concepts (their mean drop: the control for whatever makes
    every concept easier to detect early). Table `c1_concepts.parquet` (every layer), figure
    `c1_concepts.png`. Needs the store's vocabulary and a concept set for its source."""
    from featstore.analysis.concepts import default_set

    first, last = cfg.layers[0], cfg.layers[-1]
    try:
        if store.vocab() is None:
            raise FeatstoreError("the store has no vocabulary (decoded tokens)")
        concept_set = cfg.concept_set or default_set(source_of(store, first))
    except FeatstoreError as exc:
        return _missing("C1", f"concept AUROC by kind: not computable ({exc})")
    table = evidence.concept_auroc(store, cfg.layers, shards, concept_set, cfg.concept_sequences)
    write_parquet_atomic(table, out / "c1_concepts.parquet")
    wide = table.pivot(on="layer", index=["concept", "kind"], values="best_auroc")
    drop = {kind: (part[str(first)] - part[str(last)]).drop_nulls().to_numpy()
            for kind in ("syntax", "context")
            for part in [wide.filter(pl.col("kind") == kind)]}  # fmt: skip
    effect = bootstrap([drop["syntax"], drop["context"]], diff_of_means, cfg.n_boot, cfg.seed)
    plot = _kind_figure(table, cfg, out / "c1_concepts.png")
    return row(
        "C1", f"mean best concept AUROC (concept set {concept_set}) of syntax concepts, "
        f"L{first} minus L{last}", _mean(drop["syntax"]),
        f"the same of context concepts ({drop['context'].size})", _mean(drop["context"]), effect,
        "concepts", int(drop["syntax"].size + drop["context"].size), plot.name,
    )  # fmt: skip


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else np.nan


def _kind_figure(table: pl.DataFrame, cfg: FindingsConfig, path: Path) -> Path:
    """Mean best AUROC per layer of each concept kind, with 95% bootstrap intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (kind,), part in table.group_by("kind", maintain_order=True):
        layers = sorted(set(part["layer"].to_list()))
        stats = [_mean_interval(part.filter(pl.col("layer") == layer)["best_auroc"].to_numpy(),
                                cfg) for layer in layers]  # fmt: skip
        y = np.array([s[1] for s in stats])
        err = np.maximum([y - [s[2] for s in stats], np.array([s[3] for s in stats]) - y], 0)
        ax.errorbar(layers, y, yerr=err, marker="o", capsize=3, label=f"{kind} ({stats[0][0]})")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean best AUROC of the kind's concepts")
    ax.set_title("C1: concept AUROC by concept kind", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def successive(layers: Sequence[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(sorted(layers)))


def c2_rows(
    store: Store, cfg: FindingsConfig, shards: list[str], out: Path, parents: pl.DataFrame
) -> list[dict]:
    """C2: later features are joint combinations of two or more earlier ones (vs the null);
    `parents`: `all_parent_sets` of the data (the null's are computed here)."""
    pairs, per_pair = [], {}
    for a, b in successive(cfg.layers):
        kw = dict(threshold=cfg.gate_threshold, min_both=cfg.gate_min_both, shards=shards)
        null_parents = parent_sets(store, a, b, variant=Variant(null=True), **kw)
        alive = np.flatnonzero(merged_feature_stats(store, b, shards).count > 0)
        data = evidence.multi_parent(parents, b, alive)
        null = evidence.multi_parent(null_parents, b, alive)
        pairs.append(np.stack([data, null], axis=1))
        per_pair[f"L{a}→L{b}"] = data - null
    both = np.concatenate(pairs)
    effect = bootstrap([both], paired_diff, cfg.n_boot, cfg.seed)
    title = "C2: later features with two or more earlier partners"
    plot = _bars(per_pair, "share with >= 2 partners, data minus null", title, out / "c2.png")
    return [row(
        "C2", f"share of later features with >= 2 earlier partners of necessity or sufficiency "
        f">= {cfg.gate_threshold} (n_both >= {cfg.gate_min_both})", float(both[:, 0].mean()),
        NULL, float(both[:, 1].mean()), effect, "later features", int(both.shape[0]), plot.name,
    )]  # fmt: skip


def best_pearson(store: Store, cfg: FindingsConfig, shards: list[str]) -> dict:
    """Both sides' best Pearson partners (`best_both`, co-active on >= `MIN_BOTH` tokens) of
    every layer pair up to `max_distance` apart and of every two successive layers: one
    compiled pass each, shared by C3's curve, its paired row and the pass-through links."""
    layers = sorted(cfg.layers)
    pairs = {(a, b) for a in layers for b in layers if 0 < b - a <= cfg.max_distance}
    pairs |= set(successive(layers))
    return {
        (a, b): best_both(store, a, b, "pearson", min_both=MIN_BOTH, shards=shards)
        for a, b in sorted(pairs)
    }


def distance_curve(
    store: Store, cfg: FindingsConfig, shards: list[str], best: dict, out: Path
) -> pl.DataFrame:
    """C3's curve: mean best Pearson of a layer's alive features with any feature `distance`
    layers on, with a 95% bootstrap interval, per start layer and over all starts ("all");
    written to `c3_distance.parquet`, drawn in `c3_distance.png`."""
    rows, pooled = [], {}
    for (a, b), sides in sorted(best.items()):
        if b - a > cfg.max_distance:
            continue
        values = evidence.best_values(sides, _alive(store, a, shards))
        pooled.setdefault(b - a, []).append(values)
        rows.append((str(a), b - a, *_mean_interval(values, cfg)))
    for dist, parts in sorted(pooled.items()):
        rows.append(("all", dist, *_mean_interval(np.concatenate(parts), cfg)))
    cols = ["start", "distance", "n", "mean_best_pearson", "lo", "hi"]
    frame = pl.DataFrame(rows, schema=cols, orient="row")
    write_parquet_atomic(frame, out / "c3_distance.parquet")
    _curve_figure(frame, out / "c3_distance.png")
    return frame


def _mean_interval(values: np.ndarray, cfg: FindingsConfig) -> tuple[int, float, float, float]:
    mean, lo, hi = bootstrap([values], lambda s: float(np.mean(s[0])), cfg.n_boot, cfg.seed)
    return int(values.size), mean, lo, hi


def _curve_figure(frame: pl.DataFrame, path: Path) -> Path:
    """Mean best Pearson against layer distance: one line per start layer, all starts bold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (start,), part in frame.group_by("start", maintain_order=True):
        x, y = part["distance"].to_numpy(), part["mean_best_pearson"].to_numpy()
        err = [y - part["lo"].to_numpy(), part["hi"].to_numpy() - y]
        bold = start == "all"
        ax.errorbar(x, y, yerr=np.maximum(err, 0), marker="o", capsize=3,
                    lw=2.5 if bold else 1.0, color="black" if bold else None,
                    label="all starts" if bold else f"from L{start}")  # fmt: skip
    ax.set_xticks(sorted(set(frame["distance"].to_list())))
    ax.set_xlabel("layer distance")
    ax.set_ylabel("mean best Pearson (95% interval)")
    ax.set_title("C3: best-match similarity by layer distance", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def c3_rows(
    store: Store, cfg: FindingsConfig, shards: list[str], out: Path, best: dict
) -> tuple[list[dict], pl.DataFrame]:
    """C3: best matches fade with layer distance (the curve over 1..`max_distance`, and the
    paired row 1 vs the farthest); pass-through features beyond the null. Returns the rows
    and the pass-through links of the data."""
    far = min(cfg.max_distance, cfg.layers[-1] - cfg.layers[0])
    distance_curve(store, cfg, shards, best, out)
    starts = [a for a in cfg.layers if a + far in cfg.layers and a + 1 in cfg.layers]
    paired = [
        np.stack([evidence.best_values(best[(a, a + d)], _alive(store, a, shards))
                  for d in (1, far)], axis=1)  # fmt: skip
        for a in starts
    ]
    paired = np.concatenate(paired) if paired else np.zeros((0, 2))
    fade = bootstrap([paired], paired_diff, cfg.n_boot, cfg.seed)
    rows = [row(
        "C3", f"mean best-match Pearson 1 layer on minus {far} layers on (curve over 1-{far}: "
        "c3_distance)", float(paired[:, 0].mean()) if paired.size else np.nan,
        f"the same {far} layers on", float(paired[:, 1].mean()) if paired.size else np.nan,
        fade, "features", int(paired.shape[0]), "c3_distance.png",
    )]  # fmt: skip
    kw = dict(min_pearson=cfg.pass_pearson, shards=shards)
    links = pass_through_links(store, cfg.layers, best=best, **kw)
    null = pass_through_links(store, cfg.layers, variant=Variant(null=True), **kw)
    flags = [_pass_flags(store, a, shards, links, null) for a in cfg.layers[:-1]]
    flags = np.concatenate(flags)
    effect = bootstrap([flags], paired_diff, cfg.n_boot, cfg.seed)
    flow_figure(flow_counts(store, cfg.layers, links, shards), links, out / "c3_pass_through.png")
    rows.append(row(
        "C3", f"share of features passing through to the next layer (mutual best match, "
        f"Pearson >= {cfg.pass_pearson})", float(flags[:, 0].mean()), NULL,
        float(flags[:, 1].mean()), effect, "features", int(flags.shape[0]), "c3_pass_through.png",
    ))  # fmt: skip
    return rows, links


def _alive(store: Store, layer: int, shards: Sequence[str]) -> np.ndarray:
    return np.flatnonzero(merged_feature_stats(store, layer, shards).count > 0)


def _pass_flags(store: Store, a: int, shards, links: pl.DataFrame, null: pl.DataFrame):
    """(alive features of a, 2): passes through in the data, in the null."""
    alive = _alive(store, a, shards)
    sides = [f.filter(pl.col("layer_a") == a)["feature_a"].to_numpy() for f in (links, null)]
    return np.stack([np.isin(alive, s).astype(np.float64) for s in sides], axis=1)


def c3a_rows(
    store: Store, cfg: FindingsConfig, shards: list[str], out: Path, model, saes,
    successors: dict | None = None,
):  # fmt: skip
    """C3a: the change of vanishing features is dominated by one component that lowers them,
    more often than that of features with a good successor (`successors`: `best_successor`
    of each two successive layers, computed where not given)."""
    from featstore.analysis.vanishing import best_successor

    if model is None:
        return [_missing("C3a", "needs the source's model and SAEs (none for this store)")]
    rng = np.random.default_rng(cfg.seed)
    gone, kept = [], []
    for a in cfg.layers[:-1]:
        if a + 1 not in cfg.layers:
            continue
        best = (successors or {}).get((a, a + 1))
        best = best_successor(store, a, a + 1, shards=shards) if best is None else best
        best = best.filter(pl.col("n_active") >= evidence.MIN_ACTIVE)
        low = best["best_necessity"].to_numpy() <= cfg.vanishing_necessity
        for mask, into in ((low, gone), (~low, kept)):
            feats = best["feature"].to_numpy()[mask]
            feats = np.sort(rng.permutation(feats)[: cfg.max_features])
            if feats.size:
                d = evidence.dominance(model, saes[a], store, a, feats, shards, cfg.max_sequences)
                into.append((d < 0) & (np.abs(d) >= 0.5))
    gone_v = np.concatenate(gone).astype(float) if gone else np.zeros(0)
    kept_v = np.concatenate(kept).astype(float) if kept else np.zeros(0)
    effect = bootstrap([gone_v, kept_v], diff_of_means, cfg.n_boot, cfg.seed)
    plot = _bars({"vanishing": gone_v, "with successor": kept_v},
                 "share whose change one lowering component dominates (>= 50%)",
                 "C3a: erased by one head or MLP?", out / "c3a.png")  # fmt: skip
    return [row(
        "C3a", f"share of vanishing features (best necessity <= {cfg.vanishing_necessity}) whose "
        "change across the block one component that lowers them carries >= 50% of",
        float(gone_v.mean()) if gone_v.size else np.nan, "features with a good successor",
        float(kept_v.mean()) if kept_v.size else np.nan, effect, "features",
        int(gone_v.size + kept_v.size), plot.name,
    )]  # fmt: skip


def _missing(conjecture: str, why: str) -> dict:
    return row(conjecture, why, np.nan, "", np.nan, (np.nan,) * 3, "", 0, "")


def _bars(groups: dict[str, np.ndarray], ylabel: str, title: str, path: Path) -> Path:
    """Mean of each group with a 95% bootstrap interval."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for x, values in enumerate(groups.values()):
        mean, lo, hi = bootstrap(
            [np.asarray(values, float)], lambda s: float(np.mean(s[0])), 200, 0
        )
        ax.bar(x, mean, color="tab:blue")
        ax.errorbar(x, mean, yerr=[[max(mean - lo, 0)], [max(hi - mean, 0)]], color="black")
    ax.set_xticks(range(len(groups)), list(groups))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def source_of(store: Store, layer: int) -> str:
    shards = store.shards(layer)
    return str(store.info(layer, shards[0]).get("source", "unknown")) if shards else "unknown"


@dataclass
class Shared:
    """What the rows and the analyses' own tables share (each computed once)."""

    parents: pl.DataFrame  # `all_parent_sets` of the data (gates)
    links: pl.DataFrame  # pass-through links of the data
    successors: dict[tuple[int, int], pl.DataFrame]  # `best_successor` of successive layers


def findings_table(
    store: Store, cfg: FindingsConfig, out: Path, model=None, saes: dict | None = None
) -> tuple[pl.DataFrame, Shared]:
    """Every row of C1, C2, C3 and C3a, with the source and layers they are about, and what
    the analyses' own tables reuse."""
    from featstore.analysis.vanishing import best_successor

    shards = cfg.checked_shards(store)
    output_folder(out)
    parents = all_parent_sets(store, cfg.layers, threshold=cfg.gate_threshold,
                              min_both=cfg.gate_min_both, shards=shards)  # fmt: skip
    successors = {(a, b): best_successor(store, a, b, shards=shards)
                  for a, b in successive(cfg.layers)}  # fmt: skip
    c3, links = c3_rows(store, cfg, shards, out, best_pearson(store, cfg, shards))
    rows = [
        *c1_rows(store, cfg, shards, out),
        *c2_rows(store, cfg, shards, out, parents),
        *c3,
        *c3a_rows(store, cfg, shards, out, model, saes, successors),
    ]
    layers = "-".join(map(str, cfg.layers))
    frame = pl.DataFrame(rows).with_columns(
        source=pl.lit(source_of(store, cfg.layers[0])), layers=pl.lit(layers)
    )
    return frame.select(FINDINGS_SCHEMA.names), Shared(parents, links, successors)


def write_findings(frame: pl.DataFrame, out: Path) -> dict[str, Path]:
    """The table (for the `findings` SQL view) and the Markdown page."""
    path = out / spec.FINDINGS_FILE
    with atomic_file(path) as tmp:
        pq.write_table(frame.to_arrow().cast(FINDINGS_SCHEMA), tmp)
    page = out / "findings.md"
    with atomic_file(page) as tmp:
        Path(tmp).write_text(findings_page(frame), encoding="utf-8")
    return {"findings": path, "findings_page": page}


def findings_page(frame: pl.DataFrame) -> str:
    """The Markdown page: which source the verdicts are about, the rule, one row per finding."""
    source = frame["source"][0] if frame.height else "unknown"
    lines = [
        f"# Findings on source `{source}`", "",
        f"**These verdicts are about `{source}`** (its model, SAEs and text"
        + (", a 1.5 M-parameter model trained on Python source, not GPT-2 small" if source ==
           "tiny" else "") + "), layers " + (frame["layers"][0] if frame.height else "") + ".",
        "", "Rule (docs/FINDINGS.md): effect = statistic minus its control, 95% interval by "
        "bootstrap over the unit named; supported if the interval lies above 0, not supported "
        "if at or below 0, else inconclusive.", "",
        "| conjecture | statistic | observed | control | control value | effect [95%] | "
        "verdict | n | plot |", "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in frame.iter_rows(named=True):
        lines.append(
            f"| {r['conjecture']} | {r['statistic']} | {_num(r['observed'])} | {r['control']} | "
            f"{_num(r['control_value'])} | {_num(r['effect'])} [{_num(r['effect_lo'])}, "
            f"{_num(r['effect_hi'])}] | **{r['verdict']}** | {r['n']} {r['unit']} | {r['plot']} |"
        )
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.4g}"


def run_findings(store: Store, cfg: FindingsConfig, out: Path, model=None, saes=None):
    """`findings_table`, written with its page, and the analyses' own tables beside it (gates,
    pass-through chains, convergence with tokens, vanishing features), from the same passes;
    returns (table, paths incl. the plots)."""
    from featstore.analysis.convergence import run_convergence
    from featstore.analysis.gates import run_gates
    from featstore.analysis.vanishing import run_vanishing

    frame, shared = findings_table(store, cfg, out, model, saes)
    paths = write_findings(frame, out)
    plots = {p.stem: p for p in sorted(out.glob("c*.png"))}
    shards = cfg.shards
    extra = run_gates(store, cfg.layers, out, parents=shared.parents)
    extra |= run_pass_through(store, cfg.layers, out, shards=shards, links=shared.links)
    extra |= run_convergence(store, cfg.layers, out, shards=shards)
    extra |= run_vanishing(
        store, cfg.layers, out, shards=shards, max_best=cfg.vanishing_necessity, model=model,
        saes=saes, max_features=cfg.max_features, max_sequences=cfg.max_sequences,
        best=shared.successors,
    )  # fmt: skip
    return frame, {**paths, **plots, **extra}
