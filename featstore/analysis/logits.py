"""Logit effects: which next tokens a feature's decoder direction promotes and suppresses.

The direct path of feature f of layer L to the logits: its decoder direction W_dec[f] (d_model)
through the final LayerNorm's centring and scale (when the model has one; the per-token
normalisation, a positive factor, is left out as SAEDashboard and Neuronpedia do) and the
unembedding W_U (d_model x d_vocab). A feature's effect on token t is that product's entry t;
the table keeps each feature's `k` largest (promoted) and `k` smallest (suppressed).

Blocks of `block_rows` features: memory is block_rows x d_vocab floats (GPT-2: 256 x 50,257,
51 MB), never d_sae x d_vocab. Written as `{home}/logits/logit_effects.parquet`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from featstore.analysis.decoders import load_decoder, store_source
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.sequences import token_texts
from featstore.store import spec
from featstore.store.local import Store

KINDS = ("promoted", "suppressed")
SCHEMA = {
    "layer": pl.Int32, "feature": pl.Int32, "kind": pl.String, "rank": pl.Int32,
    "token": pl.Int32, "text": pl.String, "effect": pl.Float64,
}  # fmt: skip


def unembedding(model) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(W_U as d_model x d_vocab, the final norm's scale or None, whether it centres)."""
    w_u = model.W_U.detach().float().cpu().numpy()
    norm = getattr(model, "ln_final", None)
    scale = getattr(norm, "w", None)
    kind = str(getattr(model.cfg, "normalization_type", None))
    scale = None if scale is None else scale.detach().float().cpu().numpy()
    return w_u, scale, kind in ("LN", "LNPre")


def effect_matrix(w_dec: np.ndarray, w_u: np.ndarray, scale=None, centre=False) -> np.ndarray:
    """The direct logit effects of decoder rows w_dec (n x d_model): n x d_vocab."""
    d = np.asarray(w_dec, np.float32)
    if centre:
        d = d - d.mean(axis=1, keepdims=True)
    if scale is not None:
        d = d * np.asarray(scale, np.float32)
    return d @ np.asarray(w_u, np.float32)


def logit_effects(
    w_dec: np.ndarray,
    w_u: np.ndarray,
    *,
    scale: np.ndarray | None = None,
    centre: bool = False,
    k: int = 10,
    block_rows: int = 256,
) -> pl.DataFrame:
    """feature, kind (promoted / suppressed), rank (1 = strongest), token, effect."""
    if k < 1:
        raise FeatstoreError(f"k must be >= 1, got {k}")
    if w_dec.shape[1] != w_u.shape[0]:
        raise FeatstoreError(f"decoder width {w_dec.shape[1]} != unembedding rows {w_u.shape[0]}")
    k = min(k, w_u.shape[1])
    parts = []
    for lo in range(0, w_dec.shape[0], block_rows):
        block = effect_matrix(w_dec[lo : lo + block_rows], w_u, scale, centre)
        rows = np.arange(lo, lo + block.shape[0])
        for kind, signed in zip(KINDS, (block, -block), strict=True):
            top = np.argpartition(-signed, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(signed, top, 1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, 1)
            parts.append(pl.DataFrame({
                "feature": np.repeat(rows, k).astype(np.int32), "kind": kind,
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), rows.size),
                "token": top.ravel().astype(np.int32),
                "effect": np.take_along_axis(block, top, 1).ravel().astype(np.float64),
            }))  # fmt: skip
    return pl.concat(parts).sort("feature", "kind", "rank")


def store_logit_effects(
    store: Store,
    layers: Iterable[int],
    k: int = 10,
    *,
    model=None,
    decoders: dict[int, np.ndarray] | None = None,
) -> pl.DataFrame:
    """The logit effects of each layer's SAE: layer, feature, kind, rank, token, text, effect.
    Model and decoders (W_dec per layer) default to those of the store's source."""
    layers = sorted(set(layers))
    if not layers:
        raise FeatstoreError("no layers to compute logit effects for")
    if model is None:
        from featstore.sources.registry import get_source

        model = get_source(store_source(store, layers[0])).load_model()
    if decoders is None:
        decoders = {lay: load_decoder(store_source(store, lay), lay) for lay in layers}
    w_u, scale, centre = unembedding(model)
    vocab = store.vocab()
    frames = []
    for layer in layers:
        frame = logit_effects(decoders[layer], w_u, scale=scale, centre=centre, k=k)
        text = pl.Series(token_texts(frame["token"].to_numpy(), vocab), dtype=pl.String)
        frames.append(frame.with_columns(layer=pl.lit(layer, pl.Int32), text=text))
    return pl.concat(frames).select(list(SCHEMA)).cast(SCHEMA)


def logits_path(store: Store) -> Path:
    return store.home / spec.LOGITS_DIR / spec.LOGIT_EFFECTS_FILE


def write_logit_effects(store: Store, frame: pl.DataFrame) -> Path:
    return write_parquet_atomic(frame.select(list(SCHEMA)).cast(SCHEMA), logits_path(store))


def read_logit_effects(store: Store, layer: int, feature: int) -> pl.DataFrame | None:
    """One feature's rows of the stored table; None where no table was written."""
    path = logits_path(store)
    if not path.exists():
        return None
    try:
        mine = (pl.col("layer") == layer) & (pl.col("feature") == feature)
        return pl.scan_parquet(path).filter(mine).collect()
    except Exception as exc:  # a damaged table is reported, never read as empty
        why = " ".join(str(exc).split())
        raise FeatstoreError(f"cannot read logit effects {path}: {why}") from None
