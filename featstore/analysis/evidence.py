"""The per-feature evidence behind each conjecture of the study (`featstore.analysis.findings`
turns it into statistics, intervals and verdicts).

- C1 `token_explained`: how much of a feature's activity the current token alone explains: the
  correlation ratio eta^2 = between-token / total sum of squares of its activation (zeros
  included), from one sparse product per shard (token one-hot x activations), never dense.
- C2 `multi_parent`: whether a later feature has two or more earlier partners of necessity or
  sufficiency >= the gate threshold (`featstore.analysis.gates`).
- C3 `best_by_distance`: each feature's best Pearson 1..3 layers on (`featstore.stats.best`).
- C3a `dominance`: how much of a feature's change across a block one component (a head, the
  attention bias or the MLP) carries (`featstore.analysis.erasure.component_sums`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.analysis.erasure import component_sums
from featstore.analysis.gates import parent_sets
from featstore.stats.best import best_partners
from featstore.stats.shardsums import Variant, merged_feature_stats
from featstore.store.local import Store

MIN_ACTIVE = 20  # tokens a feature must fire on to enter C1's and C3a's averages


def _between_sums(store: Store, layer: int, shard: str, tokens: np.ndarray) -> sp.csr_matrix:
    """(distinct token ids, d): per token id, the sum of each feature's activation."""
    ids, inverse = np.unique(tokens, return_inverse=True)
    onehot = sp.csr_matrix(
        (np.ones(tokens.size), (inverse, np.arange(tokens.size))), shape=(ids.size, tokens.size)
    )
    return (onehot @ store.read(layer, shard).astype(np.float64)).tocsr(), ids


def token_explained(
    store: Store, layer: int, shards: Sequence[str], *, shuffle_seed: int | None = None
) -> pl.DataFrame:
    """Per feature active on >= `MIN_ACTIVE` tokens: eta^2 of its activation on the token id.
    With `shuffle_seed`, the token ids are permuted within each shard first (the null: what
    eta^2 reaches by chance with that many distinct tokens)."""
    stats = merged_feature_stats(store, layer, shards)
    between = np.zeros(stats.count.size)
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for shard in shards:
        tokens = store.tokens(shard)["token"].to_numpy()
        tokens = tokens if rng is None else rng.permutation(tokens)
        sums, ids = _between_sums(store, layer, shard, tokens)
        n_per = np.bincount(np.searchsorted(ids, tokens), minlength=ids.size).astype(np.float64)
        sq = sums.multiply(sums).multiply(1.0 / n_per[:, None]).tocsr()  # S_v^2 / n_v
        between += np.asarray(sq.sum(axis=0)).ravel()
    n = float(stats.n_tokens)
    mean_sq = stats.total**2 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        eta2 = (between - mean_sq) / (stats.sumsq - mean_sq)
    keep = np.flatnonzero(stats.count >= MIN_ACTIVE)
    return pl.DataFrame({"layer": layer, "feature": keep, "eta2": np.clip(eta2[keep], 0, 1)})


def multi_parent(
    store: Store, a: int, b: int, *, threshold: float, min_both: int,
    shards: Sequence[str] | None = None, variant: Variant | None = None,
) -> np.ndarray:  # fmt: skip
    """Per alive feature of layer b (in order): 1 where >= 2 features of layer a have necessity
    or sufficiency >= `threshold` with it (on >= `min_both` tokens), else 0."""
    chosen = list(shards or store.shards(b))
    alive = np.flatnonzero(merged_feature_stats(store, b, chosen).count > 0)
    parents = parent_sets(
        store, a, b, threshold=threshold, min_both=min_both, shards=chosen, variant=variant
    )
    many = parents.filter(pl.col("n_parents") >= 2)["feature_b"].unique().to_numpy()
    return np.isin(alive, many).astype(np.float64)


def best_by_distance(
    store: Store, a: int, distances: Sequence[int], *, shards: Sequence[str] | None = None,
    min_both: int = 2,
) -> np.ndarray:  # fmt: skip
    """(alive features of a, len(distances)): each one's best Pearson with layer a + distance
    (0 where co-active with none on `min_both` tokens: below any positive Pearson)."""
    chosen = list(shards or store.shards(a))
    alive = np.flatnonzero(merged_feature_stats(store, a, chosen).count > 0)
    out = np.zeros((alive.size, len(distances)))
    for k, dist in enumerate(distances):
        best = best_partners(store, a, a + dist, "pearson", min_both=min_both, shards=chosen)
        value = dict(zip(best["feature"].to_list(), best["value"].to_list(), strict=True))
        out[:, k] = [max(value.get(int(f), 0.0), 0.0) for f in alive]
    return out


def dominance(
    model, sae, store: Store, layer: int, features: np.ndarray, shards: Sequence[str],
    max_sequences: int | None,
) -> np.ndarray:  # fmt: skip
    """Per feature of `layer` (active past BOS in the sequences read): the share of the sum of
    |mean contribution| of block `layer`'s components carried by the largest one, signed
    negative where that component lowers the feature (erases it)."""
    from featstore.sequences import stacked_codes, store_sequences

    seqs = store_sequences(store, shards, max_sequences)
    codes = stacked_codes(store, layer, shards, seqs)
    sums = component_sums(model, sae, np.concatenate(seqs), codes, features, layer)
    live = sums.n_tokens > 0
    contrib = sums.contrib[live] / sums.n_tokens[live, None]
    size = np.abs(contrib)
    top = size.argmax(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = size.max(axis=1) / size.sum(axis=1)
    return np.where(contrib[np.arange(top.size), top] < 0, -share, share)
