"""Reduced precision for extraction: how far bf16 codes are from float32 codes (tolerance only).

The GPT-2-sized model with random weights and four random 24,576-feature SAEs of
`bench/extraction.py` encodes the same tokens in float32 and with the model and/or the encoders
in bfloat16; the codes are compared where they are stored: which (token, feature) pairs are
active in one and not the other, and the relative error of the values active in both. Speed is
not measured here (bf16 on a CPU says nothing about a GPU).

    .venv/bin/python bench/precision.py [--device cpu|cuda] [--sequences 4]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from extraction import LAYERS, gpt2_sized

from featstore.sources.extract import encode_batch


def compare(ref, got) -> str:
    """Agreement of two CSR code matrices of one layer: active sets, then values on both."""
    a, b = ref.tocoo(), got.tocoo()
    key_a = a.row.astype(np.int64) * a.shape[1] + a.col
    key_b = b.row.astype(np.int64) * b.shape[1] + b.col
    both, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    rel = np.abs(b.data[ib].astype(np.float64) / a.data[ia] - 1.0)
    lost = a.data[np.setdiff1d(np.arange(a.nnz), ia)]
    return (
        f"active f32 {a.nnz:>8,}  bf16 {b.nnz:>8,}  both {both.size / max(a.nnz, 1):7.2%}  "
        f"rel. error median {np.median(rel):.2e} p99 {np.quantile(rel, 0.99):.2e} max "
        f"{rel.max():.2e}  f32 values lost: max {lost.max() if lost.size else 0:.3g} "
        f"(f32 median {np.median(a.data):.3g})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequences", type=int, default=4)
    args = p.parse_args()
    model, saes = gpt2_sized(args.device)
    hooks = {layer: f"blocks.{layer}.hook_resid_pre" for layer in LAYERS}
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, model.cfg.d_vocab, (args.sequences, 128), generator=gen)
    tokens = tokens.to(args.device)
    ref = encode_batch(model, saes, hooks, tokens)
    half = {layer: copy.deepcopy(sae).to(dtype=torch.bfloat16) for layer, sae in saes.items()}
    for what in ("encoders", "model", "model+encoders"):
        if what == "model":  # from here on the model runs in bf16 (converted in place)
            model = model.to(torch.bfloat16)
        got = encode_batch(model, half if "encoders" in what else saes, hooks, tokens)
        for layer in LAYERS:
            print(f"bf16 {what:<15} layer {layer}: {compare(ref[layer], got[layer])}", flush=True)


if __name__ == "__main__":
    main()
