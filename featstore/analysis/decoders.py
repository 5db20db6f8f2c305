"""Data-free matching of features across layers: the cosine of their SAE decoder directions.

`decoder_cosine` compares the decoder rows (W_dec, d_sae x d_model) of two layers' SAEs blockwise
and keeps each feature's top k in either direction (the data-free matching of Feature Flow and
SAE Match), so it never holds a d_a x d_b matrix. `store_decoder_cosine` loads the SAEs of the
source a store's activations came from; no activations are read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import polars as pl

from featstore.defaults import DECODER_K
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.store import spec
from featstore.store.local import Store


def _unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)


def _top_k(block: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Indices of the k largest values along `axis` (any order).

    torch's top-k: at GPT-2 size (1,024 x 24,576 blocks) numpy's argpartition took 4x the
    block's matrix product (6.0 s against 1.5 s a block on the shared 2 cores), torch 0.7 s."""
    import torch

    k = min(k, block.shape[axis])
    values = torch.from_numpy(np.ascontiguousarray(block))
    return torch.topk(values, k, dim=axis, sorted=False).indices.numpy()


def _cosine_blocks(
    u_a: np.ndarray, u_b: np.ndarray, block_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    for lo in range(0, u_a.shape[0], block_rows):
        yield lo, u_a[lo : lo + block_rows] @ u_b.T


def decoder_cosine(
    w_a: np.ndarray,
    w_b: np.ndarray,
    k: int = 10,
    block_rows: int = 1024,
) -> pl.DataFrame:
    """Cosine of the decoder directions (rows of W_dec, d_sae x d_model) of every pair, kept
    where it is among the k largest of its feature_a's row or of its feature_b's column.

    Blocks of `block_rows` rows: memory is block_rows x d_b floats plus k per feature.
    """
    if k < 1:
        raise FeatstoreError(f"k must be >= 1, got {k}")
    if w_a.shape[1] != w_b.shape[1]:
        raise FeatstoreError(f"decoders differ in width: {w_a.shape[1]} vs {w_b.shape[1]}")
    u_a, u_b = _unit_rows(w_a), _unit_rows(w_b)
    rows, col_best, col_rows = [], None, None  # running top-k of each column
    for lo, block in _cosine_blocks(u_a, u_b, block_rows):
        top = _top_k(block, k, 1)
        rows.append((np.repeat(np.arange(lo, lo + block.shape[0]), top.shape[1]), top.ravel()))
        cand = _top_k(block, k, 0)  # (k', d_b)
        values, ids = np.take_along_axis(block, cand, 0), cand + lo
        if col_best is not None:
            values, ids = np.vstack([col_best, values]), np.vstack([col_rows, ids])
        keep = _top_k(values, k, 0)
        col_best, col_rows = np.take_along_axis(values, keep, 0), np.take_along_axis(ids, keep, 0)
    fa = np.concatenate([r[0] for r in rows] + [col_rows.ravel()])
    fb = np.concatenate(
        [r[1] for r in rows] + [np.tile(np.arange(u_b.shape[0]), col_rows.shape[0])]
    )
    pairs = np.unique(fa.astype(np.int64) * u_b.shape[0] + fb)
    fa, fb = np.divmod(pairs, u_b.shape[0])
    cos = np.einsum("ij,ij->i", u_a[fa], u_b[fb], dtype=np.float64)
    return pl.DataFrame(
        {"feature_a": fa.astype(np.int32), "feature_b": fb.astype(np.int32), "decoder_cosine": cos}
    )


def store_source(store: Store, layer: int) -> str:
    """The source a layer's activations were extracted with."""
    shards = store.shards(layer)
    if not shards:
        raise FeatstoreError(f"layer {layer} has no activations in store {store.home}")
    return str(store.info(layer, shards[0]).get("source", "tiny"))


def load_decoder(source: str, layer: int) -> np.ndarray:
    """W_dec (d_sae x d_model, float32) of a source's SAE; a missing SAE is one line."""
    from featstore.sources.registry import get_source

    try:
        sae = get_source(source).load_sae(layer)
    except OSError as exc:
        raise FeatstoreError(
            f"cannot load the SAE of source {source} layer {layer}: {exc}"
        ) from None
    return sae.W_dec.detach().float().cpu().numpy()


def store_decoders(store: Store, layers: Iterable[int]) -> dict[int, np.ndarray]:
    """W_dec of each layer's SAE, from the source its activations came from."""
    return {lay: load_decoder(store_source(store, lay), lay) for lay in sorted(set(layers))}


def store_decoder_cosine(store: Store, a: int, b: int, k: int = DECODER_K) -> pl.DataFrame:
    """`decoder_cosine` of two layers' SAEs, from the source their activations came from."""
    w = store_decoders(store, (a, b))
    return saved_decoder_cosine(store, w[a], w[b], k)


COSINE_SCHEMA = {"feature_a": pl.Int32, "feature_b": pl.Int32, "decoder_cosine": pl.Float64}


def saved_decoder_cosine(store: Store, w_a: np.ndarray, w_b: np.ndarray, k: int) -> pl.DataFrame:
    """`decoder_cosine`, kept in `{home}/decoders/` under a digest of the two decoders and k:
    at GPT-2 size a pair is a 464 GFLOP product, asked for by the decoder stage, the comparison
    and erasure's gradual change alike. A file that is missing, unreadable or of another schema
    is computed again (and replaced)."""
    digest = hashlib.sha256(f"{w_a.shape} {w_b.shape} {k}".encode())
    for w in (w_a, w_b):
        digest.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    path = store.home / spec.DECODERS_DIR / f"{digest.hexdigest()[:32]}.parquet"
    if path.is_file():
        try:
            found = pl.read_parquet(path)
            if found.schema == pl.Schema(COSINE_SCHEMA):
                return found
        except (OSError, pl.exceptions.PolarsError):
            pass
    frame = decoder_cosine(w_a, w_b, k)
    write_parquet_atomic(frame, path)
    return frame


def best_of_top_k(frame: pl.DataFrame, d_a: int) -> tuple[np.ndarray, np.ndarray]:
    """From a `decoder_cosine` frame (each feature_a's top k among its rows): each feature_a's
    largest cosine and its feature_b (ties: the lower one); NaN and -1 where it has no row."""
    best = frame.sort(["feature_a", "decoder_cosine", "feature_b"], descending=[False, True, False])
    best = best.unique("feature_a", keep="first")
    cos, match = np.full(d_a, np.nan), np.full(d_a, -1, np.int64)
    rows = best["feature_a"].to_numpy()
    cos[rows], match[rows] = best["decoder_cosine"].to_numpy(), best["feature_b"].to_numpy()
    return cos, match
