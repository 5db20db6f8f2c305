"""The embedded default source: loaders of the tiny GPT-2-style model and its SAEs (trained on the
stdlib by `featstore.sources.train_tiny`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerFast

MODEL_NAME = "featstore-tiny"
SPECIAL = "<|endoftext|>"
CTX = 128
VOCAB = 2048
D_SAE = 512
SEED = 0
MODEL_CONFIG: dict[str, Any] = {
    "model_name": MODEL_NAME,
    "n_layers": 10,
    "d_model": 96,
    "d_head": 24,
    "n_heads": 4,
    "d_mlp": 384,
    "d_vocab": VOCAB,
    "n_ctx": CTX,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "default_prepend_bos": True,
    "seed": SEED,
}


def load_tokenizer(folder: str | Path, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """The tokenizer of folder/tokenizer.json; like GPT-2 in transformer_lens it prepends BOS."""
    from transformers import PreTrainedTokenizerFast

    # add_bos_token=True also keeps transformer_lens from re-loading the tokenizer by name.
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(folder) / "tokenizer.json"),
        name_or_path=str(folder),
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        add_bos_token=add_bos,
    )
    tok.padding_side = "right"
    return tok


def load_model(folder: str | Path, device: str = "cpu") -> HookedTransformer:
    """The saved model of folder (config.json, model.safetensors, tokenizer.json)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(
            HookedTransformerConfig(**cfg, device=device), tokenizer=load_tokenizer(folder)
        )
    model.load_state_dict(load_file(folder / "model.safetensors", device=device))
    return model.eval()


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"
