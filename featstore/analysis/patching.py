"""Causal effects of SAE features on later features, by activation patching.

Ablating feature i of layer L adds `-a_i(t) * W_dec[i]` to `blocks.L.hook_resid_pre` at every
token t where i is active (clamping to v adds `(v - a_i(t)) * W_dec[i]`), which leaves the SAE's
reconstruction error in place, and runs the model on. The effect on feature j of a later layer
L' is `f_j(patched) - f_j(clean)`, f_j the layer-L' SAE encoding of `blocks.L'.hook_resid_pre`.

Work is cut into (sequence, feature) rows: a row is a copy of one sequence with one feature
patched, and a forward pass carries `batch_rows` rows of many features (a sequence appears in as
many rows as it has active features). Two features never share a row, even on disjoint tokens:
a patch at token t reaches every later token through attention, so only features on different
rows are independent. The clean residual at L is computed once per pass for its sequences, the
patched rows start there (`start_at_layer=L`) and stop at the last target layer, and only the
patched tokens of each row are compared in full (the rest enter `total` as a sum).

`attribution_sums` is the first-order estimate of the same patch for every pair at once:
`sum_t (v - a_i(t)) W_dec[i] . d(sum_t' f_j(t'))/d resid_L(t)`, one batched backward pass per
chunk of target features. It estimates `EffectSums.total` (the change of f_j summed over every
position of the patched sequences), the quantity it is compared with. Its cost grows with the
number of target features, exact patching's with the active (sequence, feature) pairs: with a
small SAE where every sequence touches most features, exact patching is the cheaper one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

RESID_PRE = "blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class PatchConfig:
    """Which features of which layer to patch, to what value, and how to batch the work."""

    layer: int
    targets: tuple[int, ...]  # later layers whose features are measured
    features: tuple[int, ...] | None = None  # source features; None: every active one
    value: float = 0.0  # 0 ablates; another value clamps the feature where it is active
    batch_rows: int = 64  # (sequence, feature) rows per forward pass
    skip_positions: int = 1  # leading positions never patched nor measured (BOS: attention sink)

    def __post_init__(self) -> None:
        if not self.targets or min(self.targets) <= self.layer:
            raise FeatstoreError(
                f"target layers {list(self.targets)} must all lie above layer {self.layer}"
            )
        if self.batch_rows < 1:
            raise FeatstoreError(f"batch_rows must be positive, got {self.batch_rows}")
        if self.skip_positions < 0:
            raise FeatstoreError(f"skip_positions must be >= 0, got {self.skip_positions}")


@dataclass
class EffectSums:
    """Additive sums of exact patching effects of source features (rows) on targets (columns)."""

    features: np.ndarray  # (n_f,) source feature ids, the row order
    n_tokens: np.ndarray  # (n_f,) tokens where the source feature is active (and patched)
    effect: np.ndarray  # (n_f, d') sum over those tokens of f_j(patched) - f_j(clean)
    total: np.ndarray  # (n_f, d') the same over every position of the patched sequences
    clean: np.ndarray  # (n_f, d') sum over those tokens of f_j(clean)
    n_clean_on: np.ndarray  # (n_f, d') tokens where j is active in the clean run
    n_off: np.ndarray  # (n_f, d') ... and off once patched
    n_on: np.ndarray  # (n_f, d') tokens where j is off in the clean run and on once patched

    @staticmethod
    def zeros(features: np.ndarray, d_target: int) -> EffectSums:
        n = len(features)
        return EffectSums(
            features=np.asarray(features, dtype=np.int64),
            n_tokens=np.zeros(n, np.int64),
            **{k: np.zeros((n, d_target)) for k in ("effect", "total", "clean")},
            **{k: np.zeros((n, d_target), np.int64) for k in ("n_clean_on", "n_off", "n_on")},
        )

    def __add__(self, other: EffectSums) -> EffectSums:
        if not np.array_equal(self.features, other.features):
            raise FeatstoreError("cannot add effect sums of different source features")
        return EffectSums(
            self.features,
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)[1:]},
        )


@dataclass
class AttributionSums:
    """First-order estimates of `EffectSums.total` for every (source, target) feature pair."""

    features: np.ndarray  # (n_f,) source feature ids
    n_tokens: np.ndarray  # (n_f,) tokens where the source feature is active (and patched)
    total: np.ndarray  # (n_f, d') estimated change of f_j summed over all positions

    def __add__(self, other: AttributionSums) -> AttributionSums:
        if not np.array_equal(self.features, other.features):
            raise FeatstoreError("cannot add attribution sums of different source features")
        return AttributionSums(
            self.features, self.n_tokens + other.n_tokens, self.total + other.total
        )


def chosen_features(cfg: PatchConfig, d_source: int) -> np.ndarray:
    """The source features to patch, checked against the SAE's width."""
    if cfg.features is None:
        return np.arange(d_source)
    features = np.asarray(cfg.features, dtype=np.int64)
    if features.size and (features.min() < 0 or features.max() >= d_source):
        raise FeatstoreError(f"source features must lie in 0:{d_source}, got {list(cfg.features)}")
    return features


# -- model plumbing ------------------------------------------------------------------------------


def check_sae(sae: SAE, layer: int) -> None:
    """Patching adds decoder rows in residual space: the SAE must read the raw residual."""
    cfg = sae.cfg
    if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
        raise FeatstoreError(
            f"SAE of layer {layer} normalises or reshapes its input "
            f"({cfg.normalize_activations}/{cfg.reshape_activations}): patching needs raw input"
        )


def capture(
    model: HookedTransformer, x: torch.Tensor, layers: Sequence[int], start: int | None = None
) -> dict[int, torch.Tensor]:
    """`blocks.L.hook_resid_pre` for each of `layers`, running from tokens (start None) or from
    the residual `x` at layer `start`; the pass stops at the last layer asked for."""
    last = max(layers)
    got: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(resid: torch.Tensor, hook) -> None:
            got[layer] = resid

        return hook

    hooks = [(RESID_PRE.format(layer=layer), keep(layer)) for layer in layers if layer != last]
    with model.hooks(fwd_hooks=hooks):
        got[last] = model(x, start_at_layer=start, stop_at_layer=last)
    return got


def column_values(
    codes: sp.csr_matrix, seqs: np.ndarray, feats: np.ndarray, seq_len: int
) -> np.ndarray:
    """(rows, seq_len) activations of feature feats[r] over the tokens of sequence seqs[r]."""
    rows = (seqs[:, None] * seq_len + np.arange(seq_len)).ravel()
    cols = np.repeat(feats, seq_len)
    return np.asarray(codes[rows, cols], dtype=np.float32).reshape(len(seqs), seq_len)


def patch_shift(a: torch.Tensor, value: float, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each feature is active (positions on the last axis, past `skip`), and the change
    `v - a` patching makes there."""
    import torch

    active = a > 0
    active[..., :skip] = False
    return active, torch.where(active, value - a, torch.zeros_like(a))


def patch_jobs(
    codes: sp.csr_matrix, seq_len: int, features: np.ndarray, skip: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, feature) pairs where a chosen feature is active past `skip`, by sequence."""
    coo = codes.tocoo()
    keep = (coo.row % seq_len >= skip) & (coo.data > 0) & np.isin(coo.col, features)
    key = np.unique((coo.row[keep] // seq_len).astype(np.int64) * codes.shape[1] + coo.col[keep])
    return key // codes.shape[1], key % codes.shape[1]


# -- exact patching ------------------------------------------------------------------------------


def effect_sums(
    model: HookedTransformer,
    saes: dict[int, SAE],
    sequences: np.ndarray,
    codes: sp.csr_matrix,
    cfg: PatchConfig,
) -> dict[int, EffectSums]:
    """Exact patching effects of `cfg.features` of `cfg.layer` on every feature of each target.

    `sequences` (n_seq, seq_len) are token ids; `codes` the clean layer-L SAE codes of their
    tokens in row-major order (as `Store.read` gives them).
    """
    import torch

    for layer in (cfg.layer, *cfg.targets):
        check_sae(saes[layer], layer)
    d_source = saes[cfg.layer].cfg.d_sae
    features = chosen_features(cfg, d_source)
    if codes.shape != (sequences.size, d_source):
        raise FeatstoreError(
            f"codes of shape {codes.shape} do not match {sequences.size} tokens x {d_source}"
        )
    row_of = np.full(d_source, -1)
    row_of[features] = np.arange(len(features))
    sums = {t: EffectSums.zeros(features, saes[t].cfg.d_sae) for t in cfg.targets}
    seqs, feats = patch_jobs(codes.tocsr(), sequences.shape[1], features, cfg.skip_positions)
    with torch.inference_mode():
        for lo in range(0, len(seqs), cfg.batch_rows):
            part = slice(lo, lo + cfg.batch_rows)
            _patch_rows(model, saes, sequences, codes, cfg, seqs[part], feats[part], sums, row_of)
    return sums


def _patch_rows(model, saes, sequences, codes, cfg, seqs, feats, sums, row_of) -> None:
    """One forward pass: rows of (sequence, feature), each patched alone, added to `sums`."""
    import torch

    uniq, inverse = np.unique(seqs, return_inverse=True)
    clean = capture(model, torch.as_tensor(sequences[uniq]), (cfg.layer, *cfg.targets))
    a = torch.as_tensor(column_values(codes, seqs, feats, sequences.shape[1]))
    active, shift = patch_shift(a, cfg.value, cfg.skip_positions)
    w_dec = saes[cfg.layer].W_dec[torch.as_tensor(feats)]  # (rows, d_model)
    start = clean[cfg.layer][inverse] + shift[..., None] * w_dec[:, None, :]
    patched = capture(model, start, cfg.targets, start=cfg.layer)
    index = row_of[feats]
    for t in cfg.targets:
        np.add.at(sums[t].n_tokens, index, active.sum(1).numpy())
        before = saes[t].encode(clean[t])  # (sequences, pos, d'): one per sequence, not per row
        after = saes[t].encode(patched[t])  # (rows, pos, d')
        _add_effects(sums[t], index, inverse, active, cfg.skip_positions, before, after)


def _add_effects(s: EffectSums, index, inverse, active, skip: int, before, after) -> None:
    """Add one pass's codes to the sums: row r patched sequence inverse[r] for feature index[r]."""
    import torch

    rows, pos = active.nonzero(as_tuple=True)  # the patched tokens, few per row
    b, a = before[torch.as_tensor(inverse)[rows], pos], after[rows, pos]  # (n_active, d')
    on_b, on_a = b > 0, a > 0
    per_row = {
        "effect": a - b,
        "clean": b,
        "n_clean_on": on_b,
        "n_off": on_b & ~on_a,
        "n_on": ~on_b & on_a,
    }
    zeros = torch.zeros(len(index), after.shape[-1], dtype=torch.float64)
    for name, value in per_row.items():
        summed = zeros.clone().index_add_(0, rows, value.double())
        np.add.at(getattr(s, name), index, summed.numpy())
    clean_total = before[:, skip:].sum(1, dtype=torch.float64)[torch.as_tensor(inverse)]
    total = after[:, skip:].sum(1, dtype=torch.float64) - clean_total
    np.add.at(s.total, index, total.numpy())


# -- attribution patching ------------------------------------------------------------------------


def attribution_sums(
    model: HookedTransformer,
    saes: dict[int, SAE],
    sequences: np.ndarray,
    codes: sp.csr_matrix,
    cfg: PatchConfig,
    batch_sequences: int = 8,
    chunk: int = 64,
) -> dict[int, AttributionSums]:
    """First-order estimates of the patch of every chosen source feature on every target feature.

    Per batch of sequences: one forward pass from layer L with gradients, then, per target layer
    and chunk of `chunk` target features, one batched backward pass of sum_t f_j(t).
    """
    d_source = saes[cfg.layer].cfg.d_sae
    features = chosen_features(cfg, d_source)
    n_f = len(features)
    out = {
        t: AttributionSums(features, np.zeros(n_f, np.int64), np.zeros((n_f, saes[t].cfg.d_sae)))
        for t in cfg.targets
    }
    seq_len = sequences.shape[1]
    for lo in range(0, len(sequences), batch_sequences):
        idx = np.arange(lo, min(lo + batch_sequences, len(sequences)))
        rows = (idx[:, None] * seq_len + np.arange(seq_len)).ravel()
        a = codes[rows][:, features].toarray().reshape(len(idx), seq_len, len(features))
        _attribute(model, saes, sequences[idx], a, cfg, features, out, chunk)
    return out


def _attribute(model, saes, tokens, a, cfg, features, out, chunk) -> None:
    import torch

    a = torch.as_tensor(a, dtype=torch.float32)  # (seq, pos, n_f)
    active, shift = patch_shift(a.transpose(1, 2), cfg.value, cfg.skip_positions)
    shift = shift.transpose(1, 2).reshape(-1, len(features))  # (seq*pos, n_f)
    w_dec = saes[cfg.layer].W_dec[torch.as_tensor(features)].detach()  # (n_f, d_model)
    with torch.no_grad():
        resid = capture(model, torch.as_tensor(tokens), [cfg.layer])[cfg.layer]
    resid.requires_grad_(True)
    with torch.enable_grad():
        later = capture(model, resid, cfg.targets, start=cfg.layer)
        for t in cfg.targets:
            out[t].n_tokens += active.sum((0, 2)).numpy()
            score = saes[t].encode(later[t])[:, cfg.skip_positions :].sum((0, 1))  # (d',)
            for lo in range(0, score.numel(), chunk):
                js = torch.arange(lo, min(lo + chunk, score.numel()))
                eye = torch.zeros(len(js), score.numel()).index_put_(
                    (torch.arange(len(js)), js), torch.tensor(1.0)
                )
                (grad,) = torch.autograd.grad(
                    score, resid, eye, retain_graph=True, is_grads_batched=True
                )  # (n_j, seq, pos, d_model)
                per_dir = shift.T @ grad.permute(1, 2, 0, 3).reshape(shift.shape[0], -1)
                est = (per_dir.view(len(features), len(js), -1) * w_dec[:, None, :]).sum(-1)
                out[t].total[:, lo : lo + len(js)] += est.double().numpy()
