"""Steering: clamp a feature to k x its typical activation and see what changes.

At every position past `skip_positions` of the sampled sequences, `blocks.L.hook_resid_pre` gets
`(v - a_i(t)) * W_dec[i]` with v = k x the feature's mean activation where active (the same
decoder-direction patch as `patching`, applied everywhere). Reported per steered feature: the mean
KL divergence KL(clean || steered) of the next-token distribution, the tokens whose mean
probability rises and falls most, and the later features (`targets`) whose mean activation
changes most. Every tensor is made on the model's device.

The sequences run `batch` at a time (`defaults.STEER_BATCH`), the clean run once a batch: each
feature's sums (KL, probability change per token, code change per target feature) are added up
over the batches and divided by the positions at the end, so memory is one batch's however many
shards are sampled, and the means equal the one-batch means to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from featstore.analysis.patching import RESID_PRE, device_of
from featstore.defaults import STEER_BATCH
from featstore.errors import FeatstoreError
from featstore.files import write_parquet_atomic
from featstore.sequences import sequence_batches, store_sequences, token_texts
from featstore.stats.shardsums import merged_feature_stats
from featstore.store import spec
from featstore.store.local import Store

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class SteerConfig:
    """Which features of which layer to clamp, how hard, and what to report."""

    layer: int
    features: tuple[int, ...]
    k: float = 5.0  # clamp to k x the feature's mean activation where active
    targets: tuple[int, ...] = ()  # later layers whose features are reported
    top: int = 10  # tokens gained / lost and later features reported
    skip_positions: int = 1

    def __post_init__(self) -> None:
        if not self.features:
            raise FeatstoreError("steering needs at least one feature")
        if any(t <= self.layer for t in self.targets):
            raise FeatstoreError(f"target layers {list(self.targets)} must lie above {self.layer}")
        if self.top < 1 or self.skip_positions < 0:
            raise FeatstoreError(f"top must be >= 1 and skip_positions >= 0, got {self.top}, "
                                 f"{self.skip_positions}")


def steered_run(model: HookedTransformer, saes: dict[int, SAE], tokens: torch.Tensor,
                cfg: SteerConfig, feature: int, value: float | None):
    """Log-probabilities (seq, pos, vocab) and each target's codes; value None: the clean run."""
    import torch

    sae, got = saes[cfg.layer], {}

    def clamp(resid, hook):
        a = sae.encode(resid)[..., feature]
        shift = (value - a)[..., None] * sae.W_dec[feature]
        shift[:, : cfg.skip_positions] = 0
        return resid + shift

    def keep(layer: int):
        return lambda resid, hook: got.update({layer: saes[layer].encode(resid)})

    hooks = [(RESID_PRE.format(layer=t), keep(t)) for t in cfg.targets]
    if value is not None:
        hooks.insert(0, (RESID_PRE.format(layer=cfg.layer), clamp))
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return torch.log_softmax(logits[:, cfg.skip_positions :].double(), -1), got


def steer(model: HookedTransformer, saes: dict[int, SAE], sequences: np.ndarray,
          typical: np.ndarray, cfg: SteerConfig, vocab: Sequence[str] | None = None,
          batch: int = STEER_BATCH) -> dict[str, pl.DataFrame]:
    """`summary` (one row per feature), `tokens` (gained and lost), `features` (later ones);
    the model runs on `batch` sequences at a time. Memory a sequence in the batch: about
    (seq_len - 1) x d_vocab x 36 bytes (float64 clean and steered log-probabilities, clean
    probabilities and one temporary; float32 logits) plus 8 x seq_len x d_sae bytes a target
    layer (its codes clean and steered): ~0.3 GB a 128-token sequence at GPT-2 dims with three
    targets (measured 0.25-0.38 GB, bench/RESULTS.md)."""
    import torch

    d_sae = saes[cfg.layer].cfg.d_sae
    if min(cfg.features) < 0 or max(cfg.features) >= d_sae:
        raise FeatstoreError(f"features must lie in 0:{d_sae}, got {list(cfg.features)}")
    never = [f for f in cfg.features if not np.isfinite(typical[f])]
    if never:
        raise FeatstoreError(f"feature {cfg.layer}:{never[0]} never fires: no typical activation")
    if batch < 1:
        raise FeatstoreError(f"batch must be at least 1 sequence, got {batch}")
    if len(sequences) == 0:
        raise FeatstoreError("no sequences to steer on")
    device = device_of(saes[cfg.layer])
    values = {f: cfg.k * float(typical[f]) for f in cfg.features}
    # Sums over (sequence, position): ("kl", f), ("change", f) per token, ("delta", f, t) per
    # feature of target t; float64 on the model's device.
    sums: dict[tuple, torch.Tensor] = {}
    positions = 0

    def add(key: tuple, value: torch.Tensor) -> None:
        sums[key] = sums[key].add_(value) if key in sums else value

    for part, _ in sequence_batches(np.asarray(sequences), batch):
        tokens = torch.tensor(part, device=device)  # a copy: store arrays are read-only
        clean, clean_codes = steered_run(model, saes, tokens, cfg, 0, None)
        p = clean.exp()
        positions += clean.shape[0] * clean.shape[1]
        for f in cfg.features:
            logp, codes = steered_run(model, saes, tokens, cfg, f, values[f])
            add(("kl", f), torch.sub(clean, logp).mul_(p).sum())
            add(("change", f), logp.exp_().sub_(p).sum((0, 1)))  # logp turned into q - p
            for t in cfg.targets:
                diff = (codes[t] - clean_codes[t])[:, cfg.skip_positions :]
                add(("delta", f, t), diff.sum((0, 1), dtype=torch.float64))
            del logp, codes  # freed before the next run: one steered run's memory at a time
        del clean, p, clean_codes
    mean = {k: (v / positions).cpu() for k, v in sums.items()}
    summary, gained, later = [], [], []
    for f in cfg.features:
        summary.append({"layer": cfg.layer, "feature": f, "k": cfg.k, "value": values[f],
                        "kl": float(mean["kl", f])})
        gained.append(_top(mean["change", f].numpy(), cfg.top,
                           {"layer": cfg.layer, "feature": f}, "token"))  # fmt: skip
        for t in cfg.targets:
            keys = {"layer": cfg.layer, "feature": f, "layer_b": t}
            later.append(_top(mean["delta", f, t].numpy(), cfg.top, keys, "feature_b"))
    tokens_frame = pl.concat(gained)
    if vocab is not None:
        text = pl.Series(token_texts(tokens_frame["token"].to_numpy(), vocab), dtype=pl.String)
        tokens_frame = tokens_frame.with_columns(text=text)
    empty = pl.DataFrame(schema={"feature_b": pl.Int64, "change": pl.Float64})
    return {"summary": pl.DataFrame(summary), "tokens": tokens_frame,
            "features": pl.concat(later) if later else empty}


def _top(change: np.ndarray, n: int, keys: dict, name: str) -> pl.DataFrame:
    """The n largest rises (kind `gained`) and falls (`lost`) of `change`, ranked from 1."""
    order = np.argsort(change, kind="stable")
    up, down = order[::-1][:n], order[:n]
    ids = np.concatenate([up, down])
    return pl.DataFrame({
        **{k: [v] * len(ids) for k, v in keys.items()},
        "kind": ["gained"] * len(up) + ["lost"] * len(down),
        "rank": np.concatenate([np.arange(1, len(up) + 1), np.arange(1, len(down) + 1)]),
        name: ids.astype(np.int64),
        "change": change[ids].astype(np.float64),
    })


def run_steering(store: Store, model, saes: dict, cfg: SteerConfig,
                 max_sequences: int | None = 8, batch: int = STEER_BATCH) -> dict[str, Path]:
    """Steer over the first `max_sequences` sequences of each shard, `batch` at a time; write
    `{home}/steering/`."""
    shards = store.shards(cfg.layer)
    if not shards:
        raise FeatstoreError(f"layer {cfg.layer} has no activations in store {store.home}")
    sequences = np.concatenate(store_sequences(store, shards, max_sequences))
    stats = merged_feature_stats(store, cfg.layer, shards)
    with np.errstate(invalid="ignore", divide="ignore"):
        typical = stats.total / stats.count
    frames = steer(model, saes, sequences, typical, cfg, store.vocab(), batch)
    folder = store.home / spec.STEERING_DIR
    return {k: write_parquet_atomic(v, folder / f"{k}.parquet") for k, v in frames.items()}
