"""Training the embedded `tiny` source: tokenizer, model and SAEs on CPython's standard library.

`python -m featstore.sources.train_tiny --out featstore/embedded/tiny` (seeded; about 10 minutes on
2 cores). The loaders the source needs at run time live in `featstore.sources.tiny`.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from featstore.sources.registry import default_layers
from featstore.sources.tiny import (
    CTX,
    D_SAE,
    MODEL_CONFIG,
    MODEL_NAME,
    SEED,
    SPECIAL,
    VOCAB,
    hook_name,
    load_model,
    load_tokenizer,
)

if TYPE_CHECKING:
    from sae_lens import StandardTrainingSAE
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerFast

LAYERS = default_layers("tiny")  # the layers SAEs are trained for: sources.yaml
HELDOUT_EVERY = 20  # every 20th file (5%) is held out from all training
SKIP_PARTS = {
    "site-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "lib2to3",
    "turtledemo",
}
MAX_FILE_BYTES = 150_000  # drops a couple of huge generated-looking modules


@dataclass
class Corpus:
    """Stdlib sources by relative path, split into training and held-out files."""

    train: dict[str, str]
    heldout: dict[str, str]


def build_corpus() -> Corpus:
    """Python's own standard library sources, sorted, with every 20th file held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p
        for p in root.rglob("*.py")
        if not set(p.relative_to(root).parts) & SKIP_PARTS and p.stat().st_size <= MAX_FILE_BYTES
    )
    corpus = Corpus(train={}, heldout={})
    for i, p in enumerate(paths):
        part = corpus.heldout if i % HELDOUT_EVERY == 0 else corpus.train
        part[p.relative_to(root).as_posix()] = p.read_text(encoding="utf-8", errors="replace")
    return corpus


def write_text_shards(
    corpus: Corpus, folder: Path, n: int = 3, lo: int = 24_000, hi: int = 40_000
) -> list[Path]:
    """Write n demo shards, each whole held-out files joined up to lo..hi bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    files = iter(sorted(corpus.heldout.items()))
    out = []
    for k in range(n):
        parts: list[str] = []
        size = 0
        for _, text in files:
            if size + len(text) > hi:
                continue
            parts.append(text)
            size += len(text)
            if size >= lo:
                break
        path = folder / f"shard-{k:03d}.txt"
        path.write_text("\n\n".join(parts), encoding="utf-8")
        out.append(path)
    return out


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int = VOCAB) -> Path:
    """Train a GPT-2-like byte-level BPE and save it as folder/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def new_model() -> HookedTransformer:
    """A freshly initialised (seeded) model of MODEL_CONFIG, without tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG))


def save_model(model: HookedTransformer, folder: Path) -> None:
    """Write config.json and model.safetensors (the tokenizer is saved by train_tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")


def chunk_tokens(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], ctx: int = CTX
) -> torch.Tensor:
    """Texts joined by EOS and cut into rows of BOS + ctx-1 tokens (the ragged tail is dropped)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat = torch.tensor([t for doc in ids for t in [*doc, eos]], dtype=torch.long)
    rows = flat[: len(flat) // (ctx - 1) * (ctx - 1)].view(-1, ctx - 1)
    bos = torch.full((len(rows), 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


@torch.no_grad()
def eval_loss(model: HookedTransformer, tokens: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy over all rows of tokens."""
    losses = [
        model(tokens[i : i + batch], return_type="loss").item() * len(tokens[i : i + batch])
        for i in range(0, len(tokens), batch)
    ]
    return sum(losses) / len(tokens)


def train_model(
    model: HookedTransformer,
    tokens: torch.Tensor,
    steps: int = 1200,
    batch: int = 16,
    lr: float = 4e-3,
    warmup: int = 50,
) -> list[float]:
    """AdamW with warmup and cosine decay on random rows of tokens; returns the loss curve."""
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    order = torch.randperm(len(tokens), generator=gen)
    curve = []
    model.train()
    for step in range(steps):
        idx = order[torch.arange(step * batch, (step + 1) * batch) % len(order)]
        loss = model(tokens[idx], return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = curve[-100:]
            print(f"model step {step:4d} loss {sum(recent) / len(recent):.3f}", flush=True)
    return curve


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def residuals(
    model: HookedTransformer,
    tokens: torch.Tensor,
    layers: tuple[int, ...] = LAYERS,
    batch: int = 64,
) -> dict[int, torch.Tensor]:
    """resid_pre activations of each layer, flattened to (tokens, d_model), BOS position dropped."""
    names = {hook_name(layer) for layer in layers}
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(tokens), batch):
        _, cache = model.run_with_cache(
            tokens[i : i + batch], names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1
        )
        for layer in layers:
            # position 0 (BOS) is an attention sink with a huge norm: SAEs skip it
            acts[layer].append(cache[hook_name(layer)][:, 1:].reshape(-1, model.cfg.d_model))
    return {layer: torch.cat(a) for layer, a in acts.items()}


def new_sae(d_in: int, layer: int, l1: float) -> StandardTrainingSAE:
    """A standard (ReLU + L1) training SAE whose metadata describes where it reads from."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=D_SAE, l1_coefficient=l1)
    meta = {
        "model_name": MODEL_NAME,
        "hook_name": hook_name(layer),
        "hook_head_index": None,
        "context_size": CTX,
        "prepend_bos": True,
        "seqpos_slice": [1, None],
        "dataset_path": "cpython-stdlib (featstore.sources.train_tiny.build_corpus)",
        "model_from_pretrained_kwargs": {},
    }
    for key, value in meta.items():
        cfg.metadata[key] = value
    torch.manual_seed(SEED + layer)
    return StandardTrainingSAE(cfg)


def train_sae(
    model: HookedTransformer,
    layer: int,
    acts: torch.Tensor,
    steps: int = 1500,
    batch: int = 2048,
    lr: float = 3e-3,
    l1: float = 1.0,
) -> StandardTrainingSAE:
    """Fit an SAE to one layer's activations; l1 is relative to the activations' RMS scale."""
    from sae_lens.saes.sae import TrainStepInput

    # The loss is MSE (~scale^2) + l1 * |f| (~scale): scaling l1 by the scale makes it unitless.
    scale = acts.norm(dim=-1).mean().item() / math.sqrt(acts.shape[1])
    sae = new_sae(model.cfg.d_model, layer, l1 * scale)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    gen = torch.Generator().manual_seed(SEED + layer)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 5 * (steps - s) / steps))
    warm = steps // 10
    for step in range(steps):
        x = acts[torch.randint(len(acts), (batch,), generator=gen)]
        coef = sae.cfg.l1_coefficient * min(1.0, (step + 1) / warm)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={"l1": coef},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            l0 = (out.feature_acts > 0).float().sum(-1).mean().item()
            print(
                f"sae L{layer} step {step:4d} mse {out.losses['mse_loss'].item():.3f} L0 {l0:.1f}",
                flush=True,
            )
    return sae.eval()


@torch.no_grad()
def sae_metrics(sae: Any, acts: torch.Tensor) -> dict[str, float]:
    """L0 (mean active features per token) and explained variance of the reconstruction."""
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    resid = (acts - recon).pow(2).sum()
    total = (acts - acts.mean(0)).pow(2).sum()
    return {
        "l0": round((feats > 0).float().sum(-1).mean().item(), 3),
        "explained_variance": round(1 - (resid / total).item(), 4),
        "dead_fraction": round(((feats > 0).sum(0) == 0).float().mean().item(), 4),
    }


def main(argv: list[str] | None = None) -> None:
    """Retrain tokenizer, model and SAEs from scratch (seeded) and write them under --out."""
    p = argparse.ArgumentParser(
        prog="python -m featstore.sources.train_tiny", description=main.__doc__
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "embedded" / "tiny")
    p.add_argument(
        "--text-out",
        type=Path,
        default=None,
        help="where the demo shards go (default: <out>/../text)",
    )
    p.add_argument("--model-steps", type=int, default=1200)
    p.add_argument("--sae-steps", type=int, default=1500)
    p.add_argument("--l1", type=float, default=1.0)
    args = p.parse_args(argv)
    from sae_lens import SAE

    torch.set_num_threads(2)
    # the embedding gradient is summed in a thread-dependent order unless this is on
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    t0 = time.time()
    corpus = build_corpus()
    write_text_shards(corpus, args.text_out or args.out.parent / "text")
    model_dir = args.out / "model"
    train_tokenizer(list(corpus.train.values()), model_dir)
    tok = load_tokenizer(model_dir)
    train_tokens = chunk_tokens(tok, list(corpus.train.values()))
    heldout_tokens = chunk_tokens(tok, list(corpus.heldout.values()))
    print(
        f"corpus: {len(corpus.train)} train files ({train_tokens.numel()} tokens), "
        f"{len(corpus.heldout)} held-out ({heldout_tokens.numel()} tokens)",
        flush=True,
    )
    model = new_model()
    curve = train_model(model, train_tokens, steps=args.model_steps)
    model.eval()
    save_model(model, model_dir)
    model = load_model(model_dir)
    t1 = time.time()
    gen = torch.Generator().manual_seed(SEED)
    sae_rows = train_tokens[torch.randperm(len(train_tokens), generator=gen)[:1024]]
    metrics: dict[str, Any] = {
        "model": {
            "heldout_loss": round(eval_loss(model, heldout_tokens), 4),
            "train_loss_last100": round(sum(curve[-100:]) / len(curve[-100:]), 4),
            "steps": args.model_steps,
            "heldout_sequences": len(heldout_tokens),
            "n_params": sum(p.numel() for p in model.parameters()),
        },
        "sae_training": {
            "steps": args.sae_steps,
            "l1_relative": args.l1,
            "train_tokens": len(sae_rows) * (CTX - 1),
        },
        "saes": {},
        "notes": "SAE metrics on held-out sequences, BOS position excluded; explained variance "
        "= 1 - sum|x - sae(x)|^2 / sum|x - mean(x)|^2",
    }
    print(f"model trained in {t1 - t0:.0f}s: {metrics['model']}", flush=True)
    train_acts = residuals(model, sae_rows)
    test_acts = residuals(model, heldout_tokens[:256])
    for layer in LAYERS:
        sae = train_sae(model, layer, train_acts[layer], steps=args.sae_steps, l1=args.l1)
        path = args.out / "saes" / hook_name(layer)
        sae.save_inference_model(path)
        metrics["saes"][hook_name(layer)] = sae_metrics(SAE.load_from_disk(path), test_acts[layer])
        print(f"{hook_name(layer)}: {metrics['saes'][hook_name(layer)]}", flush=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"done in {time.time() - t0:.0f}s (SAEs {time.time() - t1:.0f}s)")


if __name__ == "__main__":
    main()
