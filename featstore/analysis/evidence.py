"""The per-feature evidence behind each conjecture of the study (`featstore.analysis.findings`
turns it into statistics, intervals and verdicts).

- C1 `token_explained`: how much of a feature's activity the current token alone explains: the
  correlation ratio eta^2 = between-token / total sum of squares of its activation (zeros
  included), from one sparse product per shard (token one-hot x activations), never dense.
- C1 `concept_auroc`: per concept and layer, the best AUROC of any feature as a detector of the
  concept (`featstore.analysis.concepts`: a Mann-Whitney statistic), with the concept's kind
  (syntax, lexical, context).
- C2 `multi_parent`: whether a later feature has two or more earlier partners of necessity or
  sufficiency >= the gate threshold (`featstore.analysis.gates.parent_sets`).
- C3 `best_values`: each feature's best Pearson 1..3 layers on (`featstore.stats.best`).
- C3a `dominance`: how much of a feature's change across a block one component (a head, the
  attention bias or the MLP) carries (`featstore.analysis.erasure.component_sums`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.analysis.erasure import component_sums
from featstore.stats.shardsums import merged_feature_stats
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


def concept_auroc(
    store: Store, layers: Sequence[int], shards: Sequence[str], concept_set: str,
    max_sequences: int | None = None,
) -> pl.DataFrame:  # fmt: skip
    """Per concept of `concept_set` and layer: kind, the best AUROC among the features firing on
    >= 1 scored token (BOS left out) and that feature (ties: the lower)."""
    from featstore.analysis.concepts import load_concepts, score_store

    concepts = load_concepts(concept_set)
    kinds = pl.DataFrame({"concept": [c.name for c in concepts],
                          "kind": [c.kind for c in concepts]})  # fmt: skip
    scores = score_store(store, concepts, sorted(layers), list(shards), max_sequences)
    best = (
        scores.filter((pl.col("n_fire") >= 1) & pl.col("auroc").is_not_null())
        .sort("concept", "layer", "auroc", "feature", descending=[False, False, True, False])
        .unique(["concept", "layer"], keep="first", maintain_order=True)
        .select("concept", "layer", best_auroc="auroc", feature="feature")
    )
    return kinds.join(best, on="concept").sort("concept", "layer")


def multi_parent(parents: pl.DataFrame, b: int, alive: np.ndarray) -> np.ndarray:
    """Per feature of layer b in `alive` (in order): 1 where `parents` (`parent_sets`: partners
    of necessity or sufficiency >= the gate threshold) gives it >= 2 partners, else 0."""
    mine = parents.filter((pl.col("layer_b") == b) & (pl.col("n_parents") >= 2))
    return np.isin(alive, mine["feature_b"].unique().to_numpy()).astype(np.float64)


def best_values(sides: dict, alive: np.ndarray) -> np.ndarray:
    """Each feature of `alive`'s best value on side a of `best_both`'s `sides`, floored at 0
    (a feature co-active with none, or only below 0, counts 0: below any positive Pearson)."""
    value, partner = sides["a"]
    return np.where(partner[alive] >= 0, np.maximum(value[alive], 0.0), 0.0)


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
