"""The erasure conjecture: what in block L removes features that have no successor at L+1; and
the gradual-change conjecture: how close each feature's best match is 1, 2, 3 layers on.

Erasure. For a feature i of layer L with no graph edge to layer L+1, take the change of its
encoder pre-activation across block L, read with layer L's encoder direction:
`W_enc_L[:, i] . (resid_pre_{L+1}(t) - resid_pre_L(t))` (b_enc and b_dec cancel), at the tokens
t where i is active at L. Block L writes `resid_pre_{L+1} - resid_pre_L = sum_h head_h + b_O +
mlp_out` (head_h = z_h W_O[h] from `blocks.L.attn.hook_z`, mlp_out from `blocks.L.hook_mlp_out`),
so the change splits exactly into one direct contribution per head, the attention bias and the
MLP. The same split of `W_enc_{L+1}[:, j] . (...)` at the tokens where j is active at L+1, for
features j of L+1 with no graph edge from L ("new" features), shows what writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.analysis.decoders import best_of_top_k, saved_decoder_cosine
from featstore.analysis.graph import Graph, as_edges
from featstore.defaults import DECODER_K, MODEL_BATCH
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.sequences import sequence_batches
from featstore.stats.best import best_partners
from featstore.stats.shardsums import merged_feature_stats
from featstore.store.local import Store


def component_names(model) -> list[str]:
    return [f"head {h}" for h in range(model.cfg.n_heads)] + ["attn bias", "mlp"]


def block_components(model, tokens, layer: int):
    """(batch, pos, n_components, d_model) direct outputs of block `layer` (heads, attention bias,
    MLP), and the residual change `resid_pre_{L+1} - resid_pre_L` they sum to."""
    import torch

    names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
    names += [f"blocks.{k}.hook_resid_pre" for k in (layer, layer + 1)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            torch.as_tensor(tokens), names_filter=names, stop_at_layer=layer + 2
        )
        attn = model.blocks[layer].attn
        heads = torch.einsum("bphk,hkd->bphd", cache[names[0]], attn.W_O)
        bias = attn.b_O.expand(*heads.shape[:2], 1, -1)
        comps = torch.cat([heads, bias, cache[names[1]][:, :, None, :]], dim=2)
        return comps, cache[names[3]] - cache[names[2]]


@dataclass
class ComponentSums:
    """Per feature: sums over its active tokens of each block component's contribution to its
    encoder pre-activation, and of the whole residual change."""

    features: np.ndarray  # (n,)
    n_tokens: np.ndarray  # (n,)
    activation: np.ndarray  # (n,) sum of the feature's activation
    contrib: np.ndarray  # (n, C)
    total: np.ndarray  # (n,)


def project_sums(x: np.ndarray, active: sp.csr_matrix, w_enc: np.ndarray) -> np.ndarray:
    """(n, C): sum over each feature's active tokens of `w_enc[:, i] . x[t, c]`; x (t, C, d)."""
    t, c, d = x.shape
    per_feature = (active.T @ x.reshape(t, c * d)).reshape(-1, c, d)  # (n, C, d)
    return np.einsum("ncd,dn->nc", per_feature, w_enc)


def component_sums(
    model, sae, sequences: np.ndarray, codes: sp.csr_matrix, features: np.ndarray, block: int,
    batch: int = MODEL_BATCH,
) -> ComponentSums:  # fmt: skip
    """Contributions of block `block`'s components to `features` of `sae` (whose stored codes of
    the `sequences` tokens are `codes`), at the tokens where each is active past BOS; the model
    runs on `batch` sequences at a time."""
    seq_len = sequences.shape[1]
    keep = sp.diags((np.arange(codes.shape[0]) % seq_len >= 1).astype(np.float32))
    values = sp.csr_matrix(keep @ codes[:, features])
    active = (values > 0).astype(np.float32)
    w_enc = sae.W_enc.detach().float().cpu().numpy()[:, features]
    n_comp = model.cfg.n_heads + 2
    out = ComponentSums(features, np.asarray(active.sum(0)).ravel().astype(np.int64),
                        np.asarray(values.sum(0)).ravel(), np.zeros((len(features), n_comp)),
                        np.zeros(len(features)))  # fmt: skip
    for tokens, rows in sequence_batches(sequences, batch):
        comps, delta = block_components(model, tokens, block)
        part = active[rows]
        out.contrib += project_sums(comps.flatten(0, 1).cpu().numpy(), part, w_enc)
        out.total += project_sums(delta.flatten(0, 1)[:, None].cpu().numpy(), part, w_enc)[:, 0]
    return out


def unlinked(graph: Graph, layer: int, other: int, alive: np.ndarray, out: bool) -> np.ndarray:
    """Alive features of `layer` with no graph edge to (`out`) or from `other`."""
    here, there = ("a", "b") if out else ("b", "a")
    # The feature graph: a networkx graph or its edge table, in memory or lazy (a scan of
    # graph/edges.parquet: only this layer pair's linked features are read).
    step = (pl.col(f"layer_{here}") == layer) & (pl.col(f"layer_{there}") == other)
    linked = as_edges(graph).lazy().filter(step).select(f"feature_{here}").unique().collect()
    linked = linked.to_series().to_numpy()
    return np.setdiff1d(np.asarray(alive, dtype=np.int64), linked.astype(np.int64))


# -- tables --------------------------------------------------------------------------------------


def feature_table(s: ComponentSums, names: list[str], block: int, role: str, layer: int):
    """One row per (feature, component): mean contribution per active token (long format)."""
    live = s.n_tokens > 0
    n, d = int(live.sum()), len(names)
    per_token = s.n_tokens[live].astype(np.float64)
    return pl.DataFrame(
        {
            "block": np.full(n * d, block),
            "role": np.full(n * d, role),
            "layer": np.full(n * d, layer),
            "feature": np.repeat(s.features[live], d),
            "n_tokens": np.repeat(s.n_tokens[live], d),
            "mean_activation": np.repeat(s.activation[live] / per_token, d),
            "mean_change": np.repeat(s.total[live] / per_token, d),
            "component": np.tile(names, n),
            "mean_contribution": (s.contrib[live] / per_token[:, None]).ravel(),
        }
    )


def component_table(features: pl.DataFrame) -> pl.DataFrame:
    """Per block and component: how many erased features it lowers (and is the main eraser of),
    how many new features it raises (and is the main writer of), and whether it does both."""
    c = pl.col("mean_contribution")
    group = ["block", "role", "feature"]
    marked = features.with_columns(
        main_eraser=(c == c.min().over(group)) & (c < 0) & (pl.col("role") == "erased"),
        main_writer=(c == c.max().over(group)) & (c > 0) & (pl.col("role") == "new"),
        erased=pl.col("role") == "erased",
    )
    out = marked.group_by("block", "component", maintain_order=True).agg(
        erased_features=pl.col("erased").sum(),
        lowers=(pl.col("erased") & (c < 0)).sum(),
        main_eraser=pl.col("main_eraser").sum(),
        mean_contribution_erased=c.filter(pl.col("erased")).mean(),
        new_features=(~pl.col("erased")).sum(),
        raises=(~pl.col("erased") & (c > 0)).sum(),
        main_writer=pl.col("main_writer").sum(),
        mean_contribution_new=c.filter(~pl.col("erased")).mean(),
    )
    counts = ["erased_features", "lowers", "main_eraser", "new_features", "raises", "main_writer"]
    both = (pl.col("main_eraser") > 0) & (pl.col("main_writer") > 0)
    return (
        out.cast({c: pl.Int64 for c in counts}).with_columns(erases_and_writes=both).sort("block")
    )


def best_cosine(store: Store, w_a, w_b) -> tuple[np.ndarray, np.ndarray]:
    """Per row of w_a (a torch W_dec): the largest cosine with any row of w_b, and that row; from
    the decoder cosines' top k (`decoders.saved_decoder_cosine`, shared with the decoder stage
    and the comparison: a GPT-2-sized pair is computed once)."""
    a, b = (w.detach().float().cpu().numpy() for w in (w_a, w_b))
    return best_of_top_k(saved_decoder_cosine(store, a, b, DECODER_K), a.shape[0])


def best_pearson(store: Store, a: int, b: int, shards: Sequence[str] | None) -> pl.DataFrame:
    """`feature, best_pearson`: each co-active feature of `a`'s largest Pearson with a feature of
    `b` (`stats.best.best_partners`: one compiled pass that keeps each feature's best, writing no
    pair out; no table of all pairs is held or saved)."""
    found = best_partners(store, a, b, "pearson", min_both=1, shards=shards)
    return found.select(pl.col("feature").cast(pl.Int64), pl.col("value").alias("best_pearson"))


def gradual_change(
    store: Store, saes: dict, layers: Sequence[int], shards: Sequence[str] | None = None,
    max_distance: int = 3,
) -> pl.DataFrame:  # fmt: skip
    """Per alive feature of each layer and distance 1..max_distance: the best Pearson with any
    feature of the later layer (null if co-active with none) and the best decoder cosine."""
    layers, parts = sorted(layers), []
    chosen = list(shards or store.shards(layers[0]))
    for a, b in ((a, b) for a in layers for b in layers if 0 < b - a <= max_distance):
        alive = np.flatnonzero(merged_feature_stats(store, a, chosen).count > 0)
        pearson = best_pearson(store, a, b, shards)
        cos, match = best_cosine(store, saes[a].W_dec, saes[b].W_dec)
        frame = pl.DataFrame(
            {
                "layer": a,
                "feature": alive,
                "distance": b - a,
                "best_cosine": cos[alive],
                "best_cosine_feature": match[alive],
            }  # fmt: skip
        )
        parts.append(frame.join(pearson, on="feature", how="left"))
    if not parts:
        raise FeatstoreError(f"no two layers within {max_distance} of each other in {layers}")
    return pl.concat(parts, how="vertical_relaxed")


# -- plots and the whole run ---------------------------------------------------------------------


def plot_erasure(components: pl.DataFrame, path: Path) -> Path:
    """Per block: features each component is the main eraser of (down) and main writer of (up)."""
    from matplotlib.figure import Figure

    from featstore.figures import no_data, save

    blocks = components["block"].unique().sort().to_list()
    fig = Figure(figsize=(3.8 * max(len(blocks), 1) + 0.5, 4.2), layout="constrained")
    fig.suptitle("components of block L: main eraser of unlinked features of L (below 0), "
                 "main writer of new features of L+1 (above 0)")  # fmt: skip
    if not blocks:
        no_data(fig, "no unlinked features")
        return save(fig, path)
    for ax, block in zip(fig.subplots(1, len(blocks), squeeze=False)[0], blocks, strict=True):
        part = components.filter(pl.col("block") == block)
        x = np.arange(part.height)
        ax.bar(x, -part["main_eraser"].to_numpy(), color="tab:red", label="erases")
        ax.bar(x, part["main_writer"].to_numpy(), color="tab:green", label="writes")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, part["component"].to_list(), rotation=45, ha="right", fontsize=8)
        ax.set_title(f"block {block} (L{block} → L{block + 1})", fontsize=10)
        ax.set_ylabel("features")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_gradual(frame: pl.DataFrame, path: Path) -> Path:
    """Histograms of the best Pearson and the best decoder cosine, one line per distance."""
    from matplotlib.figure import Figure

    from featstore.figures import save

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle("gradual change: each feature's best match 1, 2, 3 layers on")
    for ax, col in zip(fig.subplots(1, 2), ("best_pearson", "best_cosine"), strict=True):
        edges = np.linspace(-0.2 if col == "best_pearson" else 0.0, 1.0, 49)
        for (dist,), part in frame.sort("distance").group_by("distance", maintain_order=True):
            values = part[col].drop_nulls().to_numpy()
            counts, _ = np.histogram(values, bins=edges)
            ax.stairs(counts, edges, lw=1.4, label=f"+{dist} ({values.size} features)")
        ax.set_xlabel(col.replace("_", " "))
        ax.set_ylabel("features")
        ax.legend(fontsize=8)
    return save(fig, path)


def erasure_features(
    store: Store, model, saes: dict, graph: Graph, block: int, shards: Sequence[str],
    max_sequences: int | None = 32,
) -> pl.DataFrame:  # fmt: skip
    """`feature_table` rows of block L's unlinked features of L ("erased") and of L+1 ("new")."""
    from featstore.sequences import stacked_codes, store_sequences

    seqs = store_sequences(store, shards, max_sequences)
    tokens, names, parts = np.concatenate(seqs), component_names(model), []
    for layer, other, role in ((block, block + 1, "erased"), (block + 1, block, "new")):
        alive = np.flatnonzero(merged_feature_stats(store, layer, shards).count > 0)
        feats = unlinked(graph, layer, other, alive, out=role == "erased")
        codes = stacked_codes(store, layer, shards, seqs)
        sums = component_sums(model, saes[layer], tokens, codes, feats, block)
        parts.append(feature_table(sums, names, block, role, layer))
    return pl.concat(parts)


def run_erasure(
    store: Store, model, saes: dict, graph: Graph, layers: Sequence[int], out: Path,
    *, shards: Sequence[str] | None = None, max_sequences: int | None = 32,
) -> dict[str, Path]:  # fmt: skip
    """Erasure tables and plot for each block L with L and L+1 in `layers`, and the
    gradual-change table and histogram; written under `out`."""
    layers = sorted(layers)
    chosen = list(shards or store.shards(layers[0]))
    blocks = [a for a in layers if a + 1 in layers]
    if not blocks:
        raise FeatstoreError(f"no adjacent layers in {layers}: erasure looks at block L -> L+1")
    features = pl.concat(
        [erasure_features(store, model, saes, graph, b, chosen, max_sequences) for b in blocks]
    )
    components = component_table(features)
    gradual = gradual_change(store, saes, layers, shards)
    return {
        "erasure_features": write_parquet_atomic(features, out / "erasure_features.parquet"),
        "erasure_components": write_parquet_atomic(components, out / "erasure_components.parquet"),
        "gradual_change": write_parquet_atomic(gradual, out / "gradual_change.parquet"),
        "erasure_plot": plot_erasure(components, out / "erasure.png"),
        "gradual_plot": plot_gradual(gradual, out / "gradual_change.png"),
    }
