"""Causal effects of SAE features on later features, by activation patching, for asked edges.

Ablating feature i of layer L adds `-a_i(t) * W_dec[i]` to `blocks.L.hook_resid_pre` at every
token t where i is active (clamping to v adds `(v - a_i(t)) * W_dec[i]`), which leaves the SAE's
reconstruction error in place, and runs the model on. The effect on feature j of a later layer
L' is `f_j(patched) - f_j(clean)`, f_j the layer-L' SAE encoding of `blocks.L'.hook_resid_pre`.

The work is what the user asks for: `Edges`, (i, j) pairs of a source and a target layer. Only
the source features of the asked edges are patched, and only the asked target features are read
(`columns.encode_columns`, k columns of the later SAE instead of its 24,576), into accumulators
with one entry per asked edge: memory and time grow with the edges, not with features x features.

Work is cut into (sequence, feature) rows: a row is a copy of one sequence with one source
feature patched, and a forward pass carries up to `batch_rows` rows of many features (two
features never share a row: a patch at token t reaches every later token through attention). A
pass also holds at most `max_cells` gathered target codes (rows x positions x target columns).
The clean residual at L is computed once per pass for its sequences, the patched rows start there
(`start_at_layer=L`) and stop at the last target layer. Every tensor is made on the model's
device; only the per-edge sums come back to the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from featstore.analysis.columns import check_columnwise, encode_columns
from featstore.errors import FeatstoreError
from featstore.progress import Progress, Ticker

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

RESID_PRE = "blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class PatchConfig:
    """Which layer to patch, to what value, and how to batch the work."""

    layer: int
    value: float = 0.0  # 0 ablates; another value clamps the feature where it is active
    batch_rows: int = 64  # (sequence, feature) rows per forward pass
    skip_positions: int = 1  # leading positions never patched nor measured (BOS: attention sink)
    max_cells: int = 1 << 25  # gathered target codes per pass (rows x positions x columns)

    def __post_init__(self) -> None:
        if self.batch_rows < 1 or self.max_cells < 1:
            raise FeatstoreError(
                f"batch_rows and max_cells must be positive, got {self.batch_rows}, "
                f"{self.max_cells}"
            )
        if self.skip_positions < 0:
            raise FeatstoreError(f"skip_positions must be >= 0, got {self.skip_positions}")


@dataclass(frozen=True)
class Edges:
    """Asked (source feature, target feature) pairs from the patched layer to `target`, sorted
    by source then target, no pair twice."""

    target: int
    feature_a: np.ndarray  # (n,) int64
    feature_b: np.ndarray  # (n,) int64

    @staticmethod
    def of(target: int, feature_a, feature_b) -> Edges:
        a, b = np.asarray(feature_a, np.int64), np.asarray(feature_b, np.int64)
        if a.shape != b.shape or a.ndim != 1:
            raise FeatstoreError(f"edges need two equal 1-d arrays, got {a.shape} and {b.shape}")
        pairs = np.unique(np.stack([a, b], 1), axis=0).reshape(-1, 2)
        return Edges(int(target), pairs[:, 0].copy(), pairs[:, 1].copy())

    def __len__(self) -> int:
        return len(self.feature_a)

    def check(self, layer: int, d_source: int, d_target: int) -> None:
        if self.target <= layer:
            raise FeatstoreError(f"target layer {self.target} must lie above layer {layer}")
        for what, f, d in (
            ("source", self.feature_a, d_source),
            ("target", self.feature_b, d_target),
        ):
            if f.size and (f.min() < 0 or f.max() >= d):
                raise FeatstoreError(f"{what} features must lie in 0:{d}, got {f.min()}..{f.max()}")

    def of_rows(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For rows patching source `feats[r]`: (row, edge id) of every asked edge of it."""
        lo = np.searchsorted(self.feature_a, feats, "left")
        n = np.searchsorted(self.feature_a, feats, "right") - lo
        rows = np.repeat(np.arange(len(feats)), n)
        starts = np.repeat(np.cumsum(n) - n, n)
        return rows, lo[rows] + np.arange(len(rows)) - starts


@dataclass
class EdgeSums:
    """Additive sums of exact patching effects, one entry per asked edge."""

    n_tokens: np.ndarray  # tokens where the source feature is active (and patched)
    effect: np.ndarray  # sum over those tokens of f_j(patched) - f_j(clean)
    total: np.ndarray  # the same over every position (past the skipped) of the patched sequences
    clean: np.ndarray  # sum over those tokens of f_j(clean)
    n_clean_on: np.ndarray  # tokens where j is active in the clean run
    n_off: np.ndarray  # ... and off once patched
    n_on: np.ndarray  # tokens where j is off in the clean run and on once patched

    @staticmethod
    def zeros(n: int) -> EdgeSums:
        ints = ("n_tokens", "n_clean_on", "n_off", "n_on")
        return EdgeSums(
            **{
                f.name: np.zeros(n, np.int64 if f.name in ints else np.float64)
                for f in fields(EdgeSums)
            }
        )

    def __add__(self, other: EdgeSums) -> EdgeSums:
        return EdgeSums(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


# -- model plumbing ------------------------------------------------------------------------------


def check_sae(sae: SAE, layer: int) -> None:
    """Patching adds decoder rows in residual space: the SAE must read the raw residual."""
    cfg = sae.cfg
    if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
        raise FeatstoreError(
            f"SAE of layer {layer} normalises or reshapes its input "
            f"({cfg.normalize_activations}/{cfg.reshape_activations}): patching needs raw input"
        )
    check_columnwise(sae, layer)


def device_of(sae: SAE) -> torch.device:
    return sae.W_dec.device


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


def row_batches(widths: np.ndarray, seq_len: int, cfg: PatchConfig) -> Iterator[slice]:
    """Consecutive rows, at most `batch_rows`, whose gathered codes (rows x seq_len x the sum of
    their edge counts, a bound on the union of their targets) fit in `max_cells`."""
    lo, n = 0, len(widths)
    while lo < n:
        hi, width = lo + 1, int(widths[lo])
        while hi < n and hi - lo < cfg.batch_rows:
            if (hi - lo + 1) * seq_len * (width + widths[hi]) > cfg.max_cells:
                break
            width += int(widths[hi])
            hi += 1
        yield slice(lo, hi)
        lo = hi


# -- exact patching ------------------------------------------------------------------------------


def edge_effects(
    model: HookedTransformer,
    saes: dict[int, SAE],
    sequences: np.ndarray,
    codes: sp.csr_matrix,
    cfg: PatchConfig,
    edges: Sequence[Edges],
    progress: Progress | None = None,
) -> list[EdgeSums]:
    """Exact patching effects of each asked edge from `cfg.layer` (one `EdgeSums` per `Edges`).

    `sequences` (n_seq, seq_len) are token ids; `codes` the clean layer-L SAE codes of their
    tokens in row-major order (as `Store.read` gives them). `progress` hears the patched rows.
    """
    import torch

    d_source = saes[cfg.layer].cfg.d_sae
    check_sae(saes[cfg.layer], cfg.layer)
    for e in edges:
        check_sae(saes[e.target], e.target)
        e.check(cfg.layer, d_source, saes[e.target].cfg.d_sae)
    if codes.shape != (sequences.size, d_source):
        raise FeatstoreError(
            f"codes of shape {codes.shape} do not match {sequences.size} tokens x {d_source}"
        )
    sums = [EdgeSums.zeros(len(e)) for e in edges]
    sources = np.unique(np.concatenate([e.feature_a for e in edges] or [np.zeros(0, np.int64)]))
    seqs, feats = patch_jobs(codes.tocsr(), sequences.shape[1], sources, cfg.skip_positions)
    widths = sum(np.bincount(e.of_rows(feats)[0], minlength=len(feats)) for e in edges)
    targets = ", ".join(str(e.target) for e in edges)
    ticker = Ticker(progress, f"patching layer {cfg.layer} -> {targets}, rows", len(seqs))
    with torch.inference_mode():
        for part in row_batches(np.asarray(widths), sequences.shape[1], cfg):
            _patch_rows(model, saes, sequences, codes, cfg, seqs[part], feats[part], edges, sums)
            ticker.step(part.stop - part.start)
    return sums


def _patch_rows(model, saes, sequences, codes, cfg, seqs, feats, edges, sums) -> None:
    """One forward pass: rows of (sequence, feature), each patched alone, added to `sums`."""
    import torch

    dev = device_of(saes[cfg.layer])
    uniq, inverse = np.unique(seqs, return_inverse=True)
    inverse = torch.as_tensor(inverse, device=dev)
    targets = sorted({e.target for e in edges})
    clean = capture(model, torch.as_tensor(sequences[uniq], device=dev), (cfg.layer, *targets))
    a = torch.as_tensor(column_values(codes, seqs, feats, sequences.shape[1]), device=dev)
    active, shift = patch_shift(a, cfg.value, cfg.skip_positions)
    w_dec = saes[cfg.layer].W_dec[torch.as_tensor(feats, device=dev)]  # (rows, d_model)
    start = clean[cfg.layer][inverse] + shift[..., None] * w_dec[:, None, :]
    patched = capture(model, start, targets, start=cfg.layer)
    for e, s in zip(edges, sums, strict=True):
        rows, ids = e.of_rows(feats)
        if not len(ids):
            continue
        cols, col_of = np.unique(e.feature_b[ids], return_inverse=True)
        cols = torch.as_tensor(cols, device=dev)
        before = encode_columns(saes[e.target], clean[e.target], cols)[inverse]  # (rows, pos, k)
        after = encode_columns(saes[e.target], patched[e.target], cols)
        at = (torch.as_tensor(rows, device=dev), torch.as_tensor(col_of, device=dev))
        _add_effects(s, ids, at, active, cfg.skip_positions, before, after)


def _add_effects(s: EdgeSums, ids: np.ndarray, at, active, skip: int, before, after) -> None:
    """Add one pass's codes to the sums: edge ids[k] is (row at[0][k], column at[1][k])."""
    import torch

    rows, pos = active.nonzero(as_tuple=True)  # the patched tokens, few per row
    b, a = before[rows, pos], after[rows, pos]  # (n_active, k)
    on_b, on_a = b > 0, a > 0
    per_token = {
        "effect": a - b,
        "clean": b,
        "n_clean_on": on_b,
        "n_off": on_b & ~on_a,
        "n_on": ~on_b & on_a,
    }
    zeros = torch.zeros(before.shape[0], before.shape[-1], dtype=torch.float64, device=b.device)
    per_row = {k: zeros.index_add(0, rows, v.double()) for k, v in per_token.items()}
    per_row["total"] = (after - before)[:, skip:].sum(1, dtype=torch.float64)
    np.add.at(s.n_tokens, ids, active.sum(1)[at[0]].cpu().numpy())
    for name, value in per_row.items():
        summed = value[at].cpu().numpy()
        np.add.at(getattr(s, name), ids, summed.astype(getattr(s, name).dtype))
