"""Sources generated on first use: a model of a given architecture with seeded random weights and
seeded random SAEs, written once into a cache folder in the embedded sources' layout.

The folder (`$FEATSTORE_CACHE`, else `~/.cache/featstore`, then `NAME-KEY` where KEY hashes the
sources.yaml entry) holds `model/` (config.json, model.safetensors, tokenizer.json) and
`saes/<sae id>/` (SAELens' own `cfg.json` + `sae_weights.safetensors`, loaded with
`SAE.load_from_disk`). It is built in a temporary sibling and renamed whole, under a file lock, so
concurrent first uses build it once and a crash never leaves half of it.

Each SAE's encoder bias is set per feature at the pre-activation quantile that makes the feature
fire on `sae.l0 / d_sae` of the calibration tokens (the first sequences of each of the source's
text shards, BOS excluded),
so the SAEs' L0 is about `sae.l0` on text like it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from featstore.sources.registry import Source

CACHE_ENV = "FEATSTORE_CACHE"
FORMAT = 2  # bump when what is generated changes, so old cache folders are not read
CALIBRATION_SEQUENCES = 32
CALIBRATION_SEQ_LEN = 128
FEATURE_CHUNK = 4096
DONE = "complete.json"


def cache_root() -> Path:
    """Where generated sources live: $FEATSTORE_CACHE, else ~/.cache/featstore."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "featstore"


def source_folder(source: Source) -> Path:
    """The source's generated folder, generated first when missing."""
    entry = {"model": source.model, "sae": source.sae, "hook": source.hook,
             "d_sae": source.d_sae, "layers": list(source.layers), "format": FORMAT}
    key = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]
    final = cache_root() / f"{source.name}-{key}"
    if (final / DONE).exists():
        return final
    with _locked(final.with_name(f".{final.name}.lock")):
        if not (final / DONE).exists():
            _generate_into(source, final)
    return final


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError as exc:
        raise FeatstoreError(f"cannot use the cache folder {path.parent}: {exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _generate_into(source: Source, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        model = _write_model(source, tmp / "model")
        residuals = calibration_residuals(source, model)
        for layer, x in residuals.items():
            _write_sae(source, x, layer, tmp / "saes" / source.sae_id(layer))
        (tmp / DONE).write_text(json.dumps({"source": source.name, "format": FORMAT}) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from an older build
        os.replace(tmp, final)
    except OSError as exc:
        raise FeatstoreError(f"cannot generate source {source.name} in {final}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_config(source: Source) -> dict[str, Any]:
    """The HookedTransformerConfig arguments of the source's model (sources.yaml model.config)."""
    return {**source.model["config"], "n_ctx": int(source.model["n_ctx"]),
            "model_name": source.model["name"], "seed": int(source.model["seed"])}


def make_model(source: Source, n_layers: int | None = None) -> HookedTransformer:
    """The source's model with its seeded random weights, in memory (with its tokenizer).

    `n_layers`: only that many blocks, for a rehearsal that never runs the rest (seeded the same,
    but its weights need not equal the full model's)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featstore.sources.registry import EMBEDDED
    from featstore.sources.tiny import load_tokenizer

    cfg = model_config(source)
    if n_layers is not None:
        cfg["n_layers"] = int(n_layers)
    torch.manual_seed(cfg["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    model.set_tokenizer(load_tokenizer(EMBEDDED / source.model["tokenizer"]),
                        default_padding_side="right")  # fmt: skip
    return model


def _write_model(source: Source, folder: Path) -> HookedTransformer:
    from safetensors.torch import save_file

    from featstore.sources.registry import EMBEDDED

    cfg = model_config(source)
    model = make_model(source)
    folder.mkdir(parents=True)
    # Loading needs no random init: the weights are read over it.
    (folder / "config.json").write_text(json.dumps({**cfg, "init_weights": False}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    tokenizer = EMBEDDED / source.model["tokenizer"] / "tokenizer.json"
    shutil.copyfile(tokenizer, folder / "tokenizer.json")
    return model


def _calibration_tokens(source: Source, sequences: int = CALIBRATION_SEQUENCES) -> torch.Tensor:
    """The first `sequences` sequences of each of the source's text shards.

    A random model's residual mostly says which token it is at: calibrating on one shard's few
    thousand tokens made the SAEs fire half as often again on other text (L0 96 for 60).
    """
    import torch

    from featstore.sources.extract import pack_sequences
    from featstore.sources.registry import EMBEDDED
    from featstore.sources.tiny import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED / source.model["tokenizer"])
    rows = []
    for shard in source.shard_names():
        texts = source.load_texts(shard)
        docs = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
        rows.append(pack_sequences(docs, CALIBRATION_SEQ_LEN, tokenizer.bos_token_id, sequences))
    return torch.as_tensor(np.concatenate(rows), dtype=torch.long)


def calibration_residuals(
    source: Source,
    model: HookedTransformer,
    sequences: int = CALIBRATION_SEQUENCES,
    layers: tuple[int, ...] | None = None,
) -> dict[int, torch.Tensor]:
    """Each layer's (tokens, d_model) residual at its hook on the calibration text (the first
    `sequences` sequences of each text shard), BOS excluded (as SAEs are trained): one forward
    pass for all layers (`layers`: some of the source's; None: all)."""
    import torch

    hooks = {layer: source.hook_name(layer) for layer in layers or source.layers}
    with torch.inference_mode():
        _, cache = model.run_with_cache(_calibration_tokens(source, sequences), names_filter=list(
            hooks.values()), stop_at_layer=max(hooks) + 1)  # fmt: skip
    return {layer: cache[h][:, 1:].reshape(-1, model.cfg.d_model).clone()
            for layer, h in hooks.items()}  # fmt: skip


def _write_sae(source: Source, x: torch.Tensor, layer: int, folder: Path) -> None:
    sae = make_sae(source, x, layer)
    folder.mkdir(parents=True)
    sae.save_model(folder)


def make_sae(source: Source, x: torch.Tensor, layer: int):
    """The layer's seeded random SAE (a SAELens StandardSAE), in memory, its encoder biases set so
    that each feature fires on `sae.l0 / d_sae` of the calibration residuals `x`."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    hook = source.hook_name(layer)
    cfg = StandardSAEConfig(d_in=x.shape[1], d_sae=source.d_sae)
    meta = {"model_name": source.model["name"], "hook_name": hook, "hook_head_index": None,
            "context_size": CALIBRATION_SEQ_LEN, "prepend_bos": True,
            "dataset_path": f"random (featstore.sources.generated, seed {source.model['seed']})"}
    for key, value in meta.items():
        cfg.metadata[key] = value
    torch.manual_seed(int(source.model["seed"]) + layer)
    sae = StandardSAE(cfg).eval()
    # Each feature fires on the k calibration tokens above its bias: L0 = d_sae * k / n.
    k = max(1, round(len(x) * float(source.sae["l0"]) / source.d_sae))
    with torch.no_grad():
        for lo in range(0, source.d_sae, FEATURE_CHUNK):
            # (tokens, FEATURE_CHUNK) float32: about 12,000 x 4,096 x 4 bytes = 200 MB
            pre = (x - sae.b_dec) @ sae.W_enc[:, lo : lo + FEATURE_CHUNK]
            sae.b_enc[lo : lo + FEATURE_CHUNK] = -pre.kthvalue(len(pre) - k, dim=0).values
    return sae
