"""Feature cards: what one SAE feature does and how it relates to the layers around it.

A card holds a feature's activation frequency and mean, its top-activating contexts (the tokens
around each activation, from the store's token table and vocabulary), and its predecessors (the
layer below) and successors (the layer above) with every measure of `featstore.measures` and
their 95% intervals, and its logit effects where `featstore.analysis.logits` wrote its table.
Partners are computed straight from the activations (the sparse engine on
the feature's column), so a card needs no saved pair sums. It prints as text (`featstore feature
LAYER:ID`) or renders as a self-contained HTML page (escaped text, inline CSS, no script).
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from featstore.analysis.logits import read_logit_effects
from featstore.defaults import MIN_BOTH
from featstore.errors import FeatstoreError
from featstore.files import atomic_file
from featstore.progress import Progress, Ticker
from featstore.sequences import token_texts
from featstore.stats.finish import finish_stats
from featstore.stats.kernel import sparse_pair_counts
from featstore.stats.measures import DATA_FREE, RANGES, with_intervals
from featstore.stats.shardsums import (
    BLOCK_TOKENS,
    PairCounts,
    merged_feature_stats,
    shards_of_pair,
)
from featstore.store.local import Store
from featstore.tables import render

Key = tuple[int, int]  # (layer, feature)
CONTEXT = (5, 2)  # tokens shown before and after an activation


@dataclass(frozen=True)
class FeatureCard:
    layer: int
    feature: int
    n_tokens: int
    count: int  # tokens where the feature is active
    total: float  # sum of its activations
    contexts: pl.DataFrame  # shard, seq, pos, value, before, token, after
    predecessors: pl.DataFrame  # layer, feature + every measure
    successors: pl.DataFrame
    logits: pl.DataFrame | None = None  # kind, rank, token, text, effect (None: no table)

    @property
    def frequency(self) -> float:
        return self.count / self.n_tokens if self.n_tokens else float("nan")

    @property
    def mean_active(self) -> float:
        return self.total / self.count if self.count else float("nan")


def parse_key(text: str) -> Key:
    """`LAYER:ID`, e.g. `7:123`."""
    layer, sep, feature = text.partition(":")
    try:
        return int(layer), int(feature if sep else "")
    except ValueError:
        raise FeatstoreError(f"expected LAYER:ID (e.g. 7:123), got {text!r}") from None


def check_feature(store: Store, layer: int, feature: int) -> None:
    if layer not in store.layers():
        raise FeatstoreError(f"layer {layer} not in store {store.home} (layers: {store.layers()})")
    d_sae = int(store.info(layer, store.shards(layer)[0])["d_sae"])
    if not 0 <= feature < d_sae:
        raise FeatstoreError(f"feature {feature} outside layer {layer}'s features 0:{d_sae}")


# -- contexts --------------------------------------------------------------------------------------


def _hits(store: Store, layer: int, shard: str, features: np.ndarray, top: int) -> pl.DataFrame:
    """The `top` strongest activations of each feature in a shard: feature, shard, row, value."""
    parts = []
    for start, block in store.iter_blocks(layer, shard, BLOCK_TOKENS["sparse"]):
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        hit = np.isin(block.indices, features) & (block.data > 0)
        parts.append(
            pl.DataFrame(
                {
                    "feature": block.indices[hit].astype(np.int64),
                    "row": rows[hit] + start,
                    "value": block.data[hit],
                }
            )
        )
    frame = pl.concat(parts).with_columns(shard=pl.lit(shard))
    return frame.sort("value", "row", descending=[True, False]).group_by(
        "feature", maintain_order=True).head(top)  # fmt: skip


def _windows(store: Store, shard: str, hits: pl.DataFrame, before: int, after: int) -> pl.DataFrame:
    """Each hit with its sequence, position and the text around it (same sequence only)."""
    table = store.tokens(shard)
    seq, pos, tok = (table[c].to_numpy() for c in ("seq", "pos", "token"))
    text = np.array(token_texts(tok, store.vocab()), dtype=object)
    rows = hits["row"].to_numpy()
    out = {"seq": seq[rows], "pos": pos[rows], "before": [], "token": text[rows].tolist(),
           "after": []}  # fmt: skip
    for r in rows:
        lo, hi = max(r - before, 0), min(r + after + 1, seq.size)
        same = seq[lo:hi] == seq[r]
        window = np.arange(lo, hi)[same]
        out["before"].append("".join(text[window[window < r]]))
        out["after"].append("".join(text[window[window > r]]))
    return hits.with_columns(pl.DataFrame(out))


def top_contexts(
    store: Store, layer: int, features: Sequence[int], top: int = 10, context: tuple = CONTEXT
) -> pl.DataFrame:
    """The `top` strongest activations of each feature over all shards, with their text:
    feature, shard, seq, pos, value, before, token, after (one pass over the layer; the layer
    and the token tables of one state: read again when a commit lands midway)."""
    return store.consistently(_top_contexts, store, layer, features, top, context)


def _top_contexts(
    store: Store, layer: int, features: Sequence[int], top: int, context: tuple
) -> pl.DataFrame:
    ids = np.unique(np.asarray(features, np.int64))
    hits = pl.concat([_hits(store, layer, s, ids, top) for s in store.shards(layer)])
    hits = hits.sort("value", descending=True).group_by("feature", maintain_order=True).head(top)
    with_text = [
        _windows(store, shard, group, *context)
        for (shard,), group in hits.group_by("shard", maintain_order=True)
        if shard in store.token_shards()
    ]
    columns = ["feature", "shard", "seq", "pos", "value", "before", "token", "after"]
    if not with_text:
        return pl.DataFrame(schema=dict.fromkeys(columns, pl.String)).clear()
    frame = pl.concat(with_text).sort("feature", "value", descending=[False, True])
    return frame.select(columns)


# -- partners --------------------------------------------------------------------------------------


def subset_pair_stats(
    store: Store,
    a: int,
    b: int,
    features_a: Sequence[int] | None = None,
    features_b: Sequence[int] | None = None,
) -> pl.DataFrame:
    """Every measure of the pairs (features_a x features_b; None: all) over all shards, straight
    from the activations by the sparse engine on those columns, with 95% intervals (both layers
    of one state: read again when a commit lands midway)."""
    return store.consistently(_subset_pair_stats, store, a, b, features_a, features_b)


def _subset_pair_stats(
    store: Store,
    a: int,
    b: int,
    features_a: Sequence[int] | None,
    features_b: Sequence[int] | None,
) -> pl.DataFrame:
    shards = shards_of_pair(store, a, b, None)
    stats_a, stats_b = (merged_feature_stats(store, lay, shards) for lay in (a, b))
    ids_a, ids_b = (np.arange(s.count.size) if f is None else np.unique(np.asarray(f, np.int64))
                    for s, f in ((stats_a, features_a), (stats_b, features_b)))  # fmt: skip
    parts = []
    for shard in shards:
        blocks = zip(
            store.iter_blocks(a, shard, BLOCK_TOKENS["sparse"]),
            store.iter_blocks(b, shard, BLOCK_TOKENS["sparse"]),
            strict=True,
        )
        for (_, block_a), (_, block_b) in blocks:
            c = sparse_pair_counts(
                block_a if features_a is None else block_a[:, ids_a],
                block_b if features_b is None else block_b[:, ids_b],
            )
            parts.append(
                PairCounts(
                    c.n_tokens,
                    stats_a.count.size,
                    stats_b.count.size,
                    ids_a[c.feature_a].astype(np.int32),
                    ids_b[c.feature_b].astype(np.int32),
                    c.n_both,
                    c.sum_xy,
                )
            )
    return with_intervals(finish_stats(PairCounts.total(parts), stats_a, stats_b), stats_a, stats_b)


def _partners(
    frame: pl.DataFrame, layer: int, side: str, sort_by: str, min_both: int, n: int
) -> pl.DataFrame:
    """The `n` strongest partners by `sort_by` (co-active on >= min_both tokens): the other
    layer and feature, then every measure."""
    other = "feature_b" if side == "a" else "feature_a"
    kept = frame.filter(pl.col("n_both") >= min_both)
    kept = kept.sort(sort_by, descending=True, nulls_last=True).head(n)
    measures = [c for c in kept.columns if c not in ("feature_a", "feature_b", "n_tokens")]
    return kept.select(
        pl.lit(layer, pl.Int64).alias("layer"), pl.col(other).cast(pl.Int64).alias("feature"),
        *measures,
    )  # fmt: skip


def feature_cards(
    store: Store,
    keys: Sequence[Key],
    *,
    top: int = 10,
    partners: int = 10,
    sort_by: str = "pearson",
    min_both: int = MIN_BOTH,
    progress: Progress | None = None,
) -> list[FeatureCard]:
    """The cards of `keys`, partners from the neighbouring layers of the store; per layer one
    pass for the contexts and one per neighbouring layer for the partners (`progress` hears
    each layer done)."""
    if sort_by not in RANGES or sort_by in DATA_FREE:
        data = [m for m in RANGES if m not in DATA_FREE]
        raise FeatstoreError(f"cards sort partners by a data measure ({', '.join(data)}), "
                             f"not {sort_by!r}")  # fmt: skip
    for layer, feature in keys:
        check_feature(store, layer, feature)
    layers, cards = store.layers(), {}
    chosen = sorted({k[0] for k in keys})
    ticker = Ticker(progress, f"feature cards ({len(keys)}), layers", len(chosen), every=0)
    for layer in chosen:
        mine = sorted({f for lay, f in keys if lay == layer})
        stats = merged_feature_stats(store, layer, store.shards(layer))
        below = [x for x in layers if x < layer][-1:]
        above = [x for x in layers if x > layer][:1]
        preds = {x: subset_pair_stats(store, x, layer, None, mine) for x in below}
        succs = {x: subset_pair_stats(store, layer, x, mine, None) for x in above}
        contexts = top_contexts(store, layer, mine, top)
        for f in mine:

            def near(frames: dict, side: str, f: int = f) -> pl.DataFrame:
                column = "feature_b" if side == "b" else "feature_a"
                found = [_partners(fr.filter(pl.col(column) == f), x, side, sort_by, min_both,
                                   partners) for x, fr in frames.items()]  # fmt: skip
                return found[0] if found else pl.DataFrame()

            cards[(layer, f)] = FeatureCard(
                layer, f, stats.n_tokens, int(stats.count[f]), float(stats.total[f]),
                contexts.filter(pl.col("feature") == f).drop("feature"),
                near(preds, "b"), near(succs, "a"), read_logit_effects(store, layer, f),
            )  # fmt: skip
        ticker.step(note=f" (layer {layer} done)")
    return [cards[k] for k in keys]


def feature_card(
    store: Store,
    layer: int,
    feature: int,
    *,
    top: int = 10,
    partners: int = 10,
    sort_by: str = "pearson",
    min_both: int = MIN_BOTH,
) -> FeatureCard:
    """The card of one feature (see `feature_cards`)."""
    return feature_cards(
        store, [(layer, feature)], top=top, partners=partners, sort_by=sort_by, min_both=min_both
    )[0]


# -- rendering -------------------------------------------------------------------------------------


def card_text(card: FeatureCard) -> str:
    """The card as plain text (aligned tables)."""
    lines = [
        f"feature {card.feature} of layer {card.layer}",
        f"active on {card.count} of {card.n_tokens} tokens (frequency {card.frequency:.4g}), "
        f"mean when active {card.mean_active:.4g}, mean {card.total / max(card.n_tokens, 1):.4g}",
        "", "top-activating contexts:", render(card.contexts),
        "", "predecessors:", render(card.predecessors) if card.predecessors.width else "(none)",
        "", "successors:", render(card.successors) if card.successors.width else "(none)",
    ]  # fmt: skip
    if card.logits is not None:
        lines += ["", "logit effects:", render(card.logits.drop("layer", "feature"))]
    return "\n".join(lines)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
.ctx{white-space:pre;font-family:monospace;text-align:left}mark{background:#fd6}"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def card_filename(key: Key) -> str:
    return f"L{key[0]}_{key[1]}.html"


def _partner_table(frame: pl.DataFrame, linked: set[Key]) -> str:
    if not frame.width or not frame.height:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = []
    for row in frame.iter_rows(named=True):
        key = (row["layer"], row["feature"])
        cells = [_cell(v) for v in row.values()]
        if key in linked:
            cells[1] = f'<a href="{card_filename(key)}">{cells[1]}</a>'
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _context_table(contexts: pl.DataFrame) -> str:
    rows = [
        f"<tr><td>{_cell(r['value'])}</td><td>{_cell(r['shard'])}</td><td>{_cell(r['seq'])}</td>"
        f"<td>{_cell(r['pos'])}</td><td class=ctx>{_cell(r['before'])}<mark>{_cell(r['token'])}"
        f"</mark>{_cell(r['after'])}</td></tr>"
        for r in contexts.iter_rows(named=True)
    ]
    head = "<tr><th>value</th><th>shard</th><th>seq</th><th>pos</th><th>context</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def card_html(card: FeatureCard, linked: Iterable[Key] = ()) -> str:
    """A self-contained page (no script, no external resource); partners in `linked` link to
    their own cards beside it."""
    linked = set(linked)
    title = f"Feature L{card.layer}:{card.feature}"
    summary = (f"active on {card.count} of {card.n_tokens} tokens (frequency "
               f"{card.frequency:.4g}); mean when active {card.mean_active:.4g}")  # fmt: skip
    return (
        f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{STYLE}</style></head><body><h1>{title}</h1><p id=summary>{summary}</p>"
        f"<h2>Top-activating contexts</h2>{_context_table(card.contexts)}"
        f"<h2>Predecessors</h2>{_partner_table(card.predecessors, linked)}"
        f"<h2>Successors</h2>{_partner_table(card.successors, linked)}"
        f"{_logits_table(card.logits)}</body></html>"
    )


def _logits_table(logits: pl.DataFrame | None) -> str:
    if logits is None:
        return ""
    rows = "".join(
        f"<tr><td>{_cell(k)}</td><td>{r}</td><td class=ctx>{_cell(t)}</td><td>{_cell(e)}</td></tr>"
        for k, r, t, e in logits.select("kind", "rank", "text", "effect").iter_rows()
    )
    head = "<tr><th>kind</th><th>rank</th><th>token</th><th>logit effect</th></tr>"
    return f"<h2>Logit effects</h2><table id=logits>{head}{rows}</table>"


def busiest_features(edges: pl.DataFrame | pl.LazyFrame, n: int) -> list[Key]:
    """The `n` features with the most edges (in + out) of a graph edge table, busiest first (a
    lazy scan of edges.parquet is read for its four key columns, never held whole)."""
    lazy = edges.lazy()
    ends = pl.concat([
        lazy.select(pl.col("layer_a").alias("layer"), pl.col("feature_a").alias("feature")),
        lazy.select(pl.col("layer_b").alias("layer"), pl.col("feature_b").alias("feature")),
    ])  # fmt: skip
    degree = ends.group_by("layer", "feature").len().sort(
        "len", "layer", "feature", descending=[True, False, False]).head(n)  # fmt: skip
    return [(int(x), int(f)) for x, f, _ in degree.collect(engine="streaming").iter_rows()]


def write_cards(
    store: Store,
    keys: Sequence[Key],
    out: str | os.PathLike[str],
    *,
    top: int = 10,
    partners: int = 10,
    sort_by: str = "pearson",
    min_both: int = MIN_BOTH,
    progress: Progress | None = None,
) -> list[Path]:
    """One page per feature plus index.html into `out`; pages link to each other."""
    out = Path(out)
    cards = feature_cards(
        store, keys, top=top, partners=partners, sort_by=sort_by, min_both=min_both,
        progress=progress,
    )  # fmt: skip
    paths = [out / "index.html"]
    for key, card in zip(keys, cards, strict=True):
        paths.append(out / card_filename(key))
        with atomic_file(paths[-1]) as tmp:
            tmp.write_text(card_html(card, keys), encoding="utf-8")
    items = "".join(f'<li><a href="{card_filename(k)}">L{k[0]}:{k[1]}</a></li>' for k in keys)
    page = (
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>Feature cards</title></head>"
        f"<body><h1>Feature cards</h1><ol>{items}</ol></body></html>"
    )
    with atomic_file(paths[0]) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return paths
