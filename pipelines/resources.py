"""The pipeline's one resource: where the store lives and what extraction reads.

`from_env` builds it from the environment, so a user points the pipeline at their own text,
store, source and layers without editing code (README, "Your own text, store and layers").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from featstore.defaults import DEFAULT_SOURCE
from featstore.errors import FeatstoreError
from featstore.sources.extract import ExtractConfig
from featstore.sources.registry import default_layers, get_source
from featstore.store.home import default_home, open_store
from featstore.store.local import Store


class FeatstoreResource(dg.ConfigurableResource):
    """A featstore home plus the extraction configuration (source, layers, sequence shape)."""

    home: str | None = Field(
        default=None, description="Store folder; unset: $FEATSTORE_HOME, else ./featstore-data"
    )
    store_url: str | None = Field(
        default=None,
        description="fsspec URL of the Zarr store shared by all workers (s3://bucket/prefix); "
        "unset: $FEATSTORE_STORE_URL, else the folder store.zarr in the home",
    )
    source: str = Field(
        default=DEFAULT_SOURCE, description="A source of featstore/sources/sources.yaml"
    )
    layers: list[int] = Field(
        default_factory=lambda: list(default_layers()),
        description="Layers to extract (default: the default source's, from sources.yaml)",
    )
    seq_len: int = Field(default=128, description="Tokens per sequence, BOS included")
    batch_size: int = Field(default=32, description="Sequences per forward pass")
    device: str = "cpu"
    text_dir: str | None = Field(
        default=None, description="Folder of *.txt shards replacing the source's own text"
    )
    max_sequences: int | None = Field(default=None, description="Cap per shard; unset: all")

    def home_path(self) -> Path:
        # Resolved when used, not when the definitions load, so FEATSTORE_HOME set later counts.
        return Path(self.home) if self.home is not None else default_home()

    def open(self) -> Store:
        """The store, created on first use."""
        return open_store(self.home_path(), create=True, url=self.store_url)

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig.of(self)

    def text_folder(self) -> Path:
        """The folder of *.txt shards a `files` source reads."""
        return self.extract_config().get_source().text_folder()


# Resource fields read from the environment as Dagster `EnvVar`s: resolved when a run starts
# and shown as variables in the UI.
ENV_VARS = {
    "home": "FEATSTORE_HOME",
    "store_url": "FEATSTORE_STORE_URL",
    "source": "FEATSTORE_SOURCE",
    "text_dir": "FEATSTORE_TEXT_DIR",
    "device": "FEATSTORE_DEVICE",
}
# Read when the definitions load: the layers shape the runs (which partitions a run covers).
LAYERS_VAR = "FEATSTORE_LAYERS"


def from_env(environ: Mapping[str, str] | None = None, **fields: Any) -> FeatstoreResource:
    """The resource configured by the environment (`ENV_VARS`, `LAYERS_VAR`: "6,7,8,9" or
    "6 7 8 9"; unset: the source's layers), then `fields`. A bad source or layer list is one
    line naming the variable."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {k: dg.EnvVar(v) for k, v in ENV_VARS.items() if env.get(v)}
    if "layers" not in fields:
        found["layers"] = env_layers(env)
    return FeatstoreResource(**(found | fields))


def env_layers(env: Mapping[str, str]) -> list[int]:
    """`LAYERS_VAR`, checked against the source of `FEATSTORE_SOURCE` (default: its layers)."""
    name = env.get(ENV_VARS["source"]) or DEFAULT_SOURCE
    try:
        source = get_source(name)
    except FeatstoreError as exc:
        raise FeatstoreError(f"{ENV_VARS['source']}: {exc}") from None
    text = env.get(LAYERS_VAR, "").strip()
    if not text:
        return list(source.layers)
    if not re.fullmatch(r"\d+([ ,]+\d+)*", text):
        raise FeatstoreError(f"{LAYERS_VAR} must list layer numbers such as 6,7,8,9; got {text!r}")
    layers = [int(x) for x in re.split(r"[ ,]+", text)]
    try:
        source.check_layers(layers)
    except FeatstoreError as exc:
        raise FeatstoreError(f"{LAYERS_VAR}: {exc}") from None
    return layers
