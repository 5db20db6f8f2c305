"""Data versions: what an asset's output depends on besides its code, hashed for Dagster.

Dagster marks an asset stale when its code version or an upstream data version changed. The
extraction assets report a data version built from their code version, the configuration that
shapes their output (source, model, SAE release and ids, layers, sequence shape) and their input
(text files, token tables), so the UI marks exactly the assets a change touches as stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from featstore.store.local import Store
from pipelines.resources import FeatstoreResource


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Hash of a file's bytes (text shards are small; a large one streams in 1 MiB pieces)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()[:16]


def tokens_config(featstore: FeatstoreResource) -> dict[str, Any]:
    """What tokenisation depends on: the source (its tokenizer) and the sequence shape."""
    source = featstore.extract_config().get_source()
    return {
        "source": source.name,
        "model": source.model["name"],
        "seq_len": featstore.seq_len,
        "max_sequences": featstore.max_sequences,
    }


def encoder_settings(featstore: FeatstoreResource, layers: Iterable[int] | None = None) -> dict:
    """What encoding depends on besides the tokens: model, SAE release and ids, hooks, layers."""
    source = featstore.extract_config().get_source()
    layers = sorted(featstore.layers if layers is None else layers)
    return {
        "model": source.model["name"],
        "sae_release": source.sae["release"],
        "sae_ids": [source.sae_id(n) for n in layers],
        "hooks": [source.hook_name(n) for n in layers],
        "layers": layers,
    }


def activations_config(featstore: FeatstoreResource, layers: Iterable[int]) -> dict[str, Any]:
    """Everything the stored activations of `layers` depend on besides the text."""
    return {**tokens_config(featstore), **encoder_settings(featstore, layers)}


def tokens_version(
    featstore: FeatstoreResource, shards: Iterable[str], code: str
) -> dg.DataVersion:
    """Code, configuration and the bytes of the run's text files (missing: the shard name)."""
    folder = featstore.text_folder()
    files = {}
    for shard in sorted(shards):
        path = folder / f"{shard}.txt"
        files[shard] = file_digest(path) if path.is_file() else shard
    return dg.DataVersion(digest(code, tokens_config(featstore), files))


def activations_version(
    featstore: FeatstoreResource, store: Store, by_shard: dict[str, list[str]], code: str
) -> dg.DataVersion:
    """Code, configuration and the stored token tables of the run's shards."""
    tables = {
        shard: hashlib.sha256(
            np.ascontiguousarray(store.tokens(shard)["token"]).tobytes()
        ).hexdigest()[:16]
        for shard in sorted(by_shard)
    }
    layers = {int(k) for keys in by_shard.values() for k in keys}
    return dg.DataVersion(digest(code, activations_config(featstore, layers), tables))
