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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from featstore.analysis import evidence
from featstore.analysis.passthrough import (
    flow_counts,
    flow_figure,
    pass_through_links,
    run_pass_through,
)
from featstore.errors import FeatstoreError
from featstore.files import atomic_file
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

    def __post_init__(self) -> None:
        if len(self.layers) < 2 or list(self.layers) != sorted(set(self.layers)):
            raise FeatstoreError(f"findings need two or more increasing layers, got {self.layers}")
        if not (0 < self.gate_threshold <= 1 and 0 < self.pass_pearson <= 1):
            raise FeatstoreError("gate_threshold and pass_pearson must be in (0, 1]")
        if self.n_boot < 100:
            raise FeatstoreError(f"n_boot must be at least 100, got {self.n_boot}")


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
    """C1: the current token explains more of early features' activity than of late ones'."""
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
    )]  # fmt: skip


def c2_rows(store: Store, cfg: FindingsConfig, shards: list[str], out: Path) -> list[dict]:
    """C2: later features are joint combinations of two or more earlier ones (vs the null)."""
    pairs, per_pair = [], {}
    for a, b in zip(cfg.layers[:-1], cfg.layers[1:], strict=True):
        kw = dict(threshold=cfg.gate_threshold, min_both=cfg.gate_min_both, shards=shards)
        data = evidence.multi_parent(store, a, b, **kw)
        null = evidence.multi_parent(store, a, b, variant=Variant(null=True), **kw)
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


def c3_rows(store: Store, cfg: FindingsConfig, shards: list[str], out: Path) -> list[dict]:
    """C3: best matches fade with layer distance; pass-through features beyond the null."""
    far = min(cfg.max_distance, cfg.layers[-1] - cfg.layers[0])
    starts = [a for a in cfg.layers if a + far in cfg.layers and a + 1 in cfg.layers]
    best = [evidence.best_by_distance(store, a, [1, far], shards=shards) for a in starts]
    paired = np.concatenate(best) if best else np.zeros((0, 2))
    fade = bootstrap([paired], paired_diff, cfg.n_boot, cfg.seed)
    rows = [row(
        "C3", f"mean best-match Pearson 1 layer on minus {far} layers on", float(
            paired[:, 0].mean()) if paired.size else np.nan, f"the same {far} layers on",
        float(paired[:, 1].mean()) if paired.size else np.nan, fade, "features",
        int(paired.shape[0]), "c3_pass_through.png",
    )]  # fmt: skip
    links = pass_through_links(store, cfg.layers, min_pearson=cfg.pass_pearson, shards=shards)
    null = pass_through_links(
        store, cfg.layers, min_pearson=cfg.pass_pearson, shards=shards, variant=Variant(null=True)
    )
    flags = [_pass_flags(store, a, shards, links, null) for a in cfg.layers[:-1]]
    flags = np.concatenate(flags)
    effect = bootstrap([flags], paired_diff, cfg.n_boot, cfg.seed)
    flow_figure(flow_counts(store, cfg.layers, links, shards), links, out / "c3_pass_through.png")
    rows.append(row(
        "C3", f"share of features passing through to the next layer (mutual best match, "
        f"Pearson >= {cfg.pass_pearson})", float(flags[:, 0].mean()), NULL,
        float(flags[:, 1].mean()), effect, "features", int(flags.shape[0]), "c3_pass_through.png",
    ))  # fmt: skip
    return rows


def _pass_flags(store: Store, a: int, shards, links: pl.DataFrame, null: pl.DataFrame):
    """(alive features of a, 2): passes through in the data, in the null."""
    alive = np.flatnonzero(merged_feature_stats(store, a, shards).count > 0)
    sides = [f.filter(pl.col("layer_a") == a)["feature_a"].to_numpy() for f in (links, null)]
    return np.stack([np.isin(alive, s).astype(np.float64) for s in sides], axis=1)


def c3a_rows(store: Store, cfg: FindingsConfig, shards: list[str], out: Path, model, saes):
    """C3a: the change of vanishing features is dominated by one component that lowers them,
    more often than that of features with a good successor."""
    from featstore.analysis.vanishing import best_successor

    if model is None:
        return [_missing("C3a", "needs the source's model and SAEs (none for this store)")]
    rng = np.random.default_rng(cfg.seed)
    gone, kept = [], []
    for a in cfg.layers[:-1]:
        if a + 1 not in cfg.layers:
            continue
        best = best_successor(store, a, a + 1, shards=shards)
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

    from featstore.figures import save

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


def findings_table(
    store: Store, cfg: FindingsConfig, out: Path, model=None, saes: dict | None = None
) -> pl.DataFrame:
    """Every row of C1, C2, C3 and C3a, with the source and layers they are about."""
    shards = list(cfg.shards or store.shards(cfg.layers[0]))
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        *c1_rows(store, cfg, shards, out),
        *c2_rows(store, cfg, shards, out),
        *c3_rows(store, cfg, shards, out),
        *c3a_rows(store, cfg, shards, out, model, saes),
    ]
    layers = "-".join(map(str, cfg.layers))
    frame = pl.DataFrame(rows).with_columns(
        source=pl.lit(source_of(store, cfg.layers[0])), layers=pl.lit(layers)
    )
    return frame.select(FINDINGS_SCHEMA.names)


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
    pass-through chains, convergence with tokens); returns (table, paths incl. the plots)."""
    from featstore.analysis.convergence import run_convergence
    from featstore.analysis.gates import run_gates
    from featstore.analysis.vanishing import run_vanishing

    frame = findings_table(store, cfg, out, model, saes)
    paths = write_findings(frame, out)
    plots = {p.stem: p for p in sorted(out.glob("c*.png"))}
    shards = cfg.shards
    extra = run_gates(store, cfg.layers, out, shards=shards, threshold=cfg.gate_threshold,
                      min_both=cfg.gate_min_both)  # fmt: skip
    extra |= run_pass_through(store, cfg.layers, out, shards=shards, min_pearson=cfg.pass_pearson)
    extra |= run_convergence(store, cfg.layers, out, shards=shards)
    extra |= run_vanishing(
        store,
        cfg.layers,
        out,
        shards=shards,
        max_best=cfg.vanishing_necessity,
        model=model,
        saes=saes,
        max_features=cfg.max_features,
        max_sequences=cfg.max_sequences,
    )
    return frame, {**paths, **plots, **extra}
