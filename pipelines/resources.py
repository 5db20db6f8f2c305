"""The pipeline's one resource: where the store lives and what extraction reads."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from featstore.sources.extract import ExtractConfig
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
    source: str = Field(default="tiny", description="A source of featstore/sources/sources.yaml")
    layers: list[int] = Field(default=[6, 7, 8, 9], description="Layers to extract")
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
