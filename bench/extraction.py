"""Extraction throughput: tokens/second of `featstore.extract.encode_batch` against a bare forward.

The baseline, measured in the same run, is the model's forward pass alone, stopped after the last
hooked layer (the least any extraction must do). `stored` is `featstore.extract.encode_and_store`
into a temporary store: encoding plus writing the codes through the store's `activation_writer`
(checks, feature statistics, Zarr appends, in a thread overlapping the next batch's encoding),
i.e. everything `extract_shard` does per batch. Models: the embedded `tiny` source and a
GPT-2-small-sized model with random weights and four random 24,576-feature SAEs (layers 6-9).

    .venv/bin/python bench/extraction.py [--device cpu|cuda] [--batches 3] [--batch-size 8]
    .venv/bin/python bench/extraction.py --host [--batches 16] [--batch-size 32]

`--host` measures the host path alone, in nonzeros per second per core (process CPU time) and
per second of wall time: synthetic dense codes of four 24,576-feature layers (L0 ~140, values
as a ReLU SAE's), from the codes to committed Zarr chunks of a temporary store. Two entry
points: `from csr` starts where a GPU hands over (the nonzeros found on the device,
`dense_to_csr` already run: checks, per-feature statistics, compression, commit), `from dense`
starts from dense codes in host memory (CPU extraction: `dense_to_csr` included). Run it once
with `PYTHONPATH` at a worktree of the baseline commit and once at this one, back to back.
`--repeat N` runs `from csr` N times in the process, each printed (the first run is the one
earlier sections report; one run is ~0.5 CPU-s, at the mercy of a moment's load).
`--values store blosc` measures the store's codecs for activation values (`VALUE_CODECS`: none
but the CRC-32C) against blosc-lz4 with bit shuffle, as the other arrays, in one run (the codec
patched for the run; not with the baseline, which has no `VALUE_CODECS`), with the bytes stored
per nonzero.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from featstore.sources.extract import dense_to_csr, encode_and_store, encode_batch
from featstore.sources.registry import get_source
from featstore.store.home import open_store

LAYERS = (6, 7, 8, 9)
GPT2_D_SAE = 24576
GPT2 = dict(
    n_layers=12,
    d_model=768,
    n_heads=12,
    d_head=64,
    d_mlp=3072,
    n_ctx=128,
    d_vocab=50257,
    act_fn="gelu_new",
    normalization_type="LN",
)


def gpt2_sized(device: str):
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**GPT2, device=device)).eval()
    calibration = torch.randint(1, GPT2["d_vocab"], (8, 128), device=device)
    _, cache = model.run_with_cache(calibration, stop_at_layer=max(LAYERS) + 1)
    saes = {}
    for layer in LAYERS:
        sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=GPT2_D_SAE, device=device)).eval()
        x = cache[f"blocks.{layer}.hook_resid_pre"].reshape(-1, 768)
        with torch.no_grad():
            # A random SAE fires on half its features; a per-feature bias at the pre-activation's
            # top quantile gives each about 2 active tokens in 1,024, an L0 near 50 as in GPT-2's.
            pre = (x - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-pre.kthvalue(len(pre) - 2, dim=0).values)
        saes[layer] = sae
    return model, saes


def tiny(device: str):
    source = get_source("tiny")
    return source.load_model(device), {layer: source.load_sae(layer, device) for layer in LAYERS}


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(run, tokens: torch.Tensor, batches: int) -> float:
    """Tokens/second of `run(tokens, n)`, which processes n batches, after one warm-up batch."""
    run(tokens, 1)
    sync(str(tokens.device))
    start = time.perf_counter()
    run(tokens, batches)
    sync(str(tokens.device))
    return batches * tokens.numel() / (time.perf_counter() - start)


def each(fn):
    """A `rate` run that calls `fn` on every batch."""
    return lambda tokens, n: [fn(tokens) for _ in range(n)]


def measure(name: str, model, saes, args) -> None:
    tokens = torch.randint(1, model.cfg.d_vocab, (args.batch_size, 128), device=args.device)
    hooks = {layer: f"blocks.{layer}.hook_resid_pre" for layer in saes}

    def forward(t):
        with torch.inference_mode():
            model(t, stop_at_layer=max(saes) + 1)

    def extract(t):
        codes = encode_batch(model, saes, hooks, t)
        return sum(c.nnz for c in codes.values())

    base = rate(each(forward), tokens, args.batches)
    full = rate(each(extract), tokens, args.batches)
    with tempfile.TemporaryDirectory() as home, contextlib.ExitStack() as stack:
        store = open_store(home, create=True)
        writers = {
            layer: stack.enter_context(store.activation_writer(layer, "bench", sae.cfg.d_sae))
            for layer, sae in saes.items()
        }

        def stored(t, n):  # one stream of n batches: storing overlaps the next encoding
            for _ in encode_and_store(model, saes, hooks, [t] * n, writers):
                pass

        kept = rate(stored, tokens, args.batches)
    l0 = extract(tokens) / tokens.numel() / len(saes)
    print(
        f"{name:<12} {args.device:<5} forward {base:>9.0f} tok/s  extraction {full:>9.0f} tok/s  "
        f"stored {kept:>9.0f} tok/s  forward/stored {base / kept:5.2f}x  (L0 {l0:.0f}, batch "
        f"{args.batch_size}x128, threads {torch.get_num_threads()})"
    )


HOST_L0 = 140  # nonzeros per token and layer, as the GPT-2-sized SAEs above give


def synthetic_codes(batch_tokens: int, d_sae: int = GPT2_D_SAE, seed: int = 0) -> torch.Tensor:
    """Dense (tokens, d_sae) float32 codes with ~HOST_L0 positive values per row (ReLU-like)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.zeros(batch_tokens, d_sae)
    cols = torch.randint(0, d_sae, (batch_tokens, HOST_L0), generator=gen)
    codes.scatter_(1, cols, torch.rand(batch_tokens, HOST_L0, generator=gen) * 4 + 1e-3)
    return codes


def host_rate(batches: list, to_csr: bool) -> tuple[float, float, int, int]:
    """(nonzeros per CPU second, per wall second, nonzeros, bytes stored) of storing `batches`
    (dense codes, or their CSR with `to_csr` False) into four layers of a fresh store, commit
    included."""
    nnz = 0
    with tempfile.TemporaryDirectory() as home:
        store = open_store(home, create=True)
        cpu, wall = time.process_time(), time.perf_counter()
        for layer in LAYERS:
            with store.activation_writer(layer, "bench", GPT2_D_SAE) as writer:
                for codes in batches:
                    csr = dense_to_csr(codes) if to_csr else codes
                    nnz += csr.nnz
                    writer.append(csr)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stored = sum(f.stat().st_size for f in Path(home).rglob("*") if f.is_file())
    return nnz / cpu, nnz / wall, nnz, stored


def value_codecs(name: str | None) -> tuple | None:
    """The codecs `--values name` stores activation values with (None: the store's, unpatched)."""
    if name in (None, "store"):
        return None
    from zarr.codecs import BloscCodec, Crc32cCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()


def measure_host(args) -> None:
    tokens = args.batch_size * 128
    # Two distinct batches, cycled: dense codes take 0.4 GB per 4,096 tokens.
    dense = [synthetic_codes(tokens, seed=i) for i in range(2)] * (args.batches // 2)
    csrs = [dense_to_csr(codes) for codes in dense[:2]] * (args.batches // 2)
    host_rate(csrs[:1], False)  # warm-up: imports, compilation
    for values in args.values or [None]:
        patched = value_codecs(values)
        if patched is not None:  # the store's codec for values patched (not in the baseline)
            from featstore.store import writers

            original, writers.VALUE_CODECS = writers.VALUE_CODECS, patched
        for name, batches, to_csr in (("from csr", csrs, False), ("from dense", dense, True)):
            for run in range(args.repeat if not to_csr else 1):
                per_cpu, per_wall, nnz, stored = host_rate(batches, to_csr)
                print(
                    f"host {name:<10} {values or 'store':<5} run {run + 1} "
                    f"{per_cpu / 1e6:7.1f} M nonzeros/CPU-s  "
                    f"{per_wall / 1e6:7.1f} M nonzeros/s  {stored / nnz:5.2f} B/nonzero  "
                    f"({nnz:,} nonzeros, 4 layers x {args.batches} batches x {tokens} tokens, "
                    f"L0 {nnz / (4 * args.batches * tokens):.0f}, torch threads "
                    f"{torch.get_num_threads()})",
                    flush=True,
                )
        if patched is not None:
            writers.VALUE_CODECS = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--host", action="store_true", help="the host path alone (see above)")
    p.add_argument("--repeat", type=int, default=1,
                   help="--host: runs from csr in one process, each printed")  # fmt: skip
    p.add_argument("--values", nargs="+", choices=["store", "blosc"], default=None,
                   help="--host: codecs of activation values to compare")  # fmt: skip
    args = p.parse_args()
    if args.host:
        measure_host(args)
        return
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    measure("tiny", *tiny(args.device), args)
    measure("gpt2-sized", *gpt2_sized(args.device), args)


if __name__ == "__main__":
    main()
