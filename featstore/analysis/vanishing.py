"""Vanishing (disappearing) features: a feature of layer L with no good successor at L+1 (its
best necessity over the features of L+1 is <= 0.4), and how much of its decoder direction
survives in the layer-L+1 SAE's reconstruction error (spar-2024's projected errors).

Survival of feature i: at the tokens t where i is active at L (past each sequence's BOS),
`sum_t e(t) . d_i / |d_i|` over `sum_t a_i(t) |d_i|`, where e = resid_pre_{L+1} - SAE_{L+1}(resid)
is the next SAE's reconstruction error and a_i d_i what i wrote into resid_pre_L. Near 1: the
direction is still in the residual stream but the next SAE misses it (the feature went "dark");
near 0: it was erased, or the next SAE represents it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.defaults import MIN_BOTH, MODEL_BATCH
from featstore.files import write_parquet_atomic
from featstore.stats.best import best_partners
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store.local import Store

MAX_BEST = 0.4  # best necessity at or below this: no good successor (spar-2024)
MEASURE = "necessity"  # P(a active | b active) (docs/MEASURES.md)
CHUNK_FEATURES = 1024  # features projected at once (tokens x chunk floats)


def best_successor(
    store: Store, a: int, b: int, *, shards: Sequence[str] | None = None,
    min_both: int = MIN_BOTH, variant: Variant | None = None,
) -> pl.DataFrame:  # fmt: skip
    """Per alive feature of layer a: layer, feature, tokens active, its best successor at b
    by necessity and that value (0, successor -1, where co-active with none on `min_both`
    tokens: at 24,576 features a later feature firing once, on one of a's tokens, has
    necessity 1 by chance and would hide a vanishing feature)."""
    chosen = list(shards or store.shards(a))
    count = merged_feature_stats(store, a, chosen).count
    alive = np.flatnonzero(count > 0)
    best = best_partners(store, a, b, MEASURE, min_both=min_both, shards=chosen, variant=variant)
    frame = pl.DataFrame({"feature": alive.astype(np.int32), "n_active": count[alive]})
    return (
        frame.join(best, on="feature", how="left")
        .with_columns(
            layer=pl.lit(a, pl.Int32),
            successor=pl.col("partner").fill_null(-1),
            best_necessity=pl.col("value").fill_null(0.0),
        )
        .select("layer", "feature", "n_active", "successor", "best_necessity")
    )


def vanishing(best: pl.DataFrame, max_best: float = MAX_BEST) -> pl.DataFrame:
    """The rows of `best_successor` with no good successor."""
    return best.filter(pl.col("best_necessity") <= max_best)


def run_vanishing(
    store: Store, layers: Sequence[int], out: Path, *, shards: Sequence[str] | None = None,
    max_best: float = MAX_BEST, model=None, saes: dict | None = None,
    max_features: int = 200, max_sequences: int | None = 16,
    best: dict[tuple[int, int], pl.DataFrame] | None = None,
) -> dict[str, Path]:  # fmt: skip
    """Per pair of successive layers, the vanishing features of the earlier one with their best
    successor (`best_successor`, unless in `best`), and (given the store's model and SAEs) the
    survival of the first `max_features` of each in the next SAE's error; written to
    `{out}/vanishing.parquet`."""
    layers, parts = sorted(layers), []
    chosen = list(shards or store.shards(layers[0]))
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        found = (best or {}).get((a, b))
        gone = vanishing(best_successor(store, a, b, shards=chosen) if found is None else found,
                         max_best)  # fmt: skip
        if model is not None and b == a + 1 and gone.height:
            feats = gone["feature"].to_numpy()[:max_features]
            kept = decoder_survival(store, model, saes, a, feats, chosen, max_sequences)
            gone = gone.join(kept.drop("layer"), on="feature", how="left")
        else:
            gone = gone.with_columns(survival=pl.lit(None, pl.Float64))
        parts.append(gone)
    return {"vanishing": write_parquet_atomic(pl.concat(parts), out / "vanishing.parquet")}


def survival(codes: sp.csr_matrix, w_dec: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """(n,) share of each feature's written direction found in the next SAE's error.

    `codes` (tokens x n): the features' activations at L; `w_dec` (n x d_model): their decoder
    rows; `errors` (tokens x d_model): the next SAE's reconstruction error at those tokens."""
    return share(found_sums(codes, w_dec, errors), written_sums(codes, w_dec))


def written_sums(codes: sp.csr_matrix, w_dec: np.ndarray) -> np.ndarray:
    """(n,) `sum_t a_i(t) |d_i|` over the tokens of `codes` (tokens x n)."""
    codes = sp.csr_matrix(codes, dtype=np.float64)
    return np.asarray(codes.sum(axis=0)).ravel() * np.linalg.norm(w_dec, axis=1)


def found_sums(codes: sp.csr_matrix, w_dec: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """(n,) `sum_t e(t) . d_i / |d_i|` over the tokens where feature i is active in `codes`
    (tokens x n), `errors` (tokens x d_model) at the same tokens: a sum over tokens, so batches
    of tokens add up."""
    norms = np.linalg.norm(w_dec, axis=1)
    active = (sp.csr_matrix(codes, dtype=np.float64) > 0).astype(np.float64).tocsc()
    found = np.zeros(norms.size)
    for lo in range(0, norms.size, CHUNK_FEATURES):
        hi = min(lo + CHUNK_FEATURES, norms.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = w_dec[lo:hi] / norms[lo:hi, None]
        proj = np.asarray(errors, np.float64) @ unit.T  # (tokens, chunk)
        found[lo:hi] = np.asarray(active[:, lo:hi].multiply(proj).sum(axis=0)).ravel()
    return found


def share(found: np.ndarray, written: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(written > 0, found / written, np.nan)


def next_errors(model, sae_next, tokens: np.ndarray, layer_next: int) -> np.ndarray:
    """(n_seq * seq_len, d_model) reconstruction errors of the layer-`layer_next` SAE on the
    residual stream it reads (`blocks.L.hook_resid_pre`), the sequences `tokens` in one run."""
    import torch

    hook = f"blocks.{layer_next}.hook_resid_pre"
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            torch.as_tensor(tokens), names_filter=[hook], stop_at_layer=layer_next + 1
        )
        x = cache[hook].flatten(0, 1)
        return (x - sae_next.decode(sae_next.encode(x))).float().cpu().numpy()


def decoder_survival(
    store: Store, model, saes: dict, a: int, features: np.ndarray, shards: Sequence[str],
    max_sequences: int | None = 32, batch: int = MODEL_BATCH,
) -> pl.DataFrame:  # fmt: skip
    """`survival` of `features` of layer a in the layer-(a+1) SAE's error, on the first
    `max_sequences` sequences of each shard, BOS positions left out; the model runs on `batch`
    sequences at a time and each batch's projected errors are summed (never all tokens' errors
    at once)."""
    from featstore.sequences import sequence_batches, stacked_codes, store_sequences

    seqs = store_sequences(store, shards, max_sequences)
    tokens = np.concatenate(seqs)
    codes = stacked_codes(store, a, shards, seqs)[:, features]
    keep = sp.diags((np.arange(codes.shape[0]) % tokens.shape[1] >= 1).astype(np.float64))
    codes = sp.csr_matrix(keep @ codes)
    w_dec = saes[a].W_dec.detach().float().cpu().numpy()[features]
    found = np.zeros(len(features))
    for part, rows in sequence_batches(tokens, batch):
        found += found_sums(codes[rows], w_dec, next_errors(model, saes[a + 1], part, a + 1))
    return pl.DataFrame(
        {"layer": np.full(len(features), a, np.int32), "feature": np.asarray(features, np.int32),
         "survival": share(found, written_sums(codes, w_dec))}
    )  # fmt: skip
