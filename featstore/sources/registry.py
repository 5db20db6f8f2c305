"""Model, SAEs and text behind one interface; the list of sources is data (sources.yaml)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from featstore.defaults import DEFAULT_SOURCE
from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

EMBEDDED = Path(str(resources.files("featstore") / "embedded"))
# Model and SAE kinds read from local folders: shipped in featstore/embedded, or generated on
# first use into the cache (featstore.sources.generated).
LOCAL_KINDS = ("embedded", "generated")


@functools.cache
def registry() -> dict[str, dict[str, Any]]:
    """The sources of featstore/sources/sources.yaml, by name."""
    text = (resources.files("featstore.sources") / "sources.yaml").read_text()
    return yaml.safe_load(text)


def is_network_error(exc: BaseException) -> bool:
    """True for the errors the hub clients raise when there is no network."""
    names = {type(e).__name__ for e in _chain(exc)}
    hints = ("connect", "resolve", "offline", "network", "timed out", "max retries", "hub")
    text = " ".join(str(e).lower() for e in _chain(exc))
    return bool(
        names
        & {
            "ConnectionError",
            "ConnectError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "MaxRetryError",
            "NameResolutionError",
            "Timeout",
            "ReadTimeout",
        }
    ) or any(h in text for h in hints)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _download(what: str, fn, *args, **kwargs):
    """Call a hub loader; a missing network becomes one line instead of a deep traceback."""
    try:
        return fn(*args, **kwargs)
    except FeatstoreError:
        raise
    except Exception as exc:
        if is_network_error(exc):
            raise FeatstoreError(
                f"cannot download {what}: no network access to the Hugging Face hub "
                f"({type(exc).__name__}); use --source tiny offline"
            ) from None
        raise FeatstoreError(f"cannot load {what}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class Source:
    """One entry of sources.yaml: how to get the model, each layer's SAE and the text."""

    name: str
    model: dict[str, Any]
    sae: dict[str, Any]
    hook: str
    d_sae: int
    layers: tuple[int, ...]
    text: dict[str, Any]
    text_dir: Path | None = field(default=None)

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)

    def sae_id(self, layer: int) -> str:
        return self.sae["id"].format(layer=layer)

    def check_layers(self, layers: tuple[int, ...] | list[int]) -> None:
        unknown = [layer for layer in layers if layer not in self.layers]
        if unknown:
            raise FeatstoreError(
                f"source {self.name} has no SAE for layer(s) {unknown} (it has {list(self.layers)})"
            )

    def check_seq_len(self, seq_len: int) -> None:
        n_ctx = self.model.get("n_ctx")
        if n_ctx is not None and seq_len > int(n_ctx):
            raise FeatstoreError(
                f"seq_len {seq_len} exceeds the context of {n_ctx} tokens of source "
                f"{self.name}'s model {self.model['name']}"
            )

    def load_model(self, device: str = "cpu") -> HookedTransformer:
        from transformer_lens import HookedTransformer

        if self.model["kind"] in LOCAL_KINDS:
            from featstore.sources.tiny import load_model

            return load_model(self.embedded_model_folder(), device=device)
        return _download(
            f"model {self.model['name']}",
            HookedTransformer.from_pretrained,
            self.model["name"],
            device=device,
        )

    def embedded_model_folder(self) -> Path:
        """The model's folder: in featstore/embedded, or generated on first use into the cache."""
        if self.model["kind"] == "generated":
            from featstore.sources.generated import source_folder

            return source_folder(self) / "model"
        folder = EMBEDDED / self.model["name"]
        if not (folder / "config.json").exists():
            raise FeatstoreError(
                f"embedded model of source {self.name} missing at {folder}; "
                "retrain it with `python -m featstore.sources.train_tiny`"
            )
        return folder

    def load_tokenizer(self):
        """The model's tokenizer alone (a transformers tokenizer), without the weights."""
        if self.model["kind"] in LOCAL_KINDS:
            from featstore.sources.tiny import load_tokenizer

            if self.model["kind"] == "generated":  # an embedded one: no need to generate
                return load_tokenizer(EMBEDDED / self.model["tokenizer"])
            return load_tokenizer(self.embedded_model_folder())
        from transformers import AutoTokenizer

        return _download(
            f"tokenizer of {self.model['name']}", AutoTokenizer.from_pretrained, self.model["name"]
        )

    def load_sae(self, layer: int, device: str = "cpu") -> SAE:
        from sae_lens import SAE

        self.check_layers([layer])
        if self.sae["kind"] in LOCAL_KINDS:
            path = self.embedded_model_folder().parent / "saes" / self.sae_id(layer)
            if not path.exists():
                raise FeatstoreError(f"embedded SAE {self.sae_id(layer)} missing at {path}")
            return SAE.load_from_disk(path, device=device)
        return _download(
            f"SAE {self.sae['release']}/{self.sae_id(layer)}",
            SAE.from_pretrained,
            release=self.sae["release"],
            sae_id=self.sae_id(layer),
            device=device,
        )

    def shard_names(self) -> list[str]:
        """Shards known without reading the text: one per file for `files` sources."""
        if self.text["kind"] == "files":
            return [p.stem for p in self.text_files()]
        raise FeatstoreError(
            f"source {self.name} streams its text; name shards as {self.name}-NNNNN"
        )

    def text_folder(self) -> Path:
        if self.text_dir is not None:
            return self.text_dir
        folder = Path(self.text["dataset"])
        return folder if folder.is_absolute() else EMBEDDED.parent / folder

    def text_files(self) -> list[Path]:
        folder = self.text_folder()
        if not folder.is_dir():
            raise FeatstoreError(f"text folder {folder} of source {self.name} does not exist")
        return sorted(folder.glob("*.txt"))

    def load_texts(self, shard: str):
        """The documents of one shard, read through `datasets` (local files or hub streaming)."""
        import datasets

        if self.text["kind"] == "files":
            path = self.text_folder() / f"{shard}.txt"
            if not path.exists():
                raise FeatstoreError(f"shard {shard}: no text file {path}")
            ds = datasets.load_dataset(
                "text", data_files=str(path), split="train", sample_by="document"
            )
            return (row[self.text["field"]] for row in ds)
        index = stream_shard_index(self.name, shard)
        per = int(self.text["documents_per_shard"])
        ds = _download(
            f"dataset {self.text['dataset']}",
            datasets.load_dataset,
            self.text["dataset"],
            split=self.text["split"],
            streaming=True,
        )
        # Shard k is documents [k * per, (k + 1) * per) of the stream: a deterministic cut
        # that needs no index of the whole stream.
        return (row[self.text["field"]] for row in ds.skip(index * per).take(per))


def stream_shard_index(source: str, shard: str) -> int:
    prefix = f"{source}-"
    tail = shard[len(prefix) :] if shard.startswith(prefix) else ""
    if not tail.isdigit():
        raise FeatstoreError(
            f"shard {shard!r} of streaming source {source}: expected {prefix}NNNNN"
        )
    return int(tail)


def get_source(name: str, text_dir: str | Path | None = None) -> Source:
    """The named source, or a one-line error listing the known ones."""
    entries = registry()
    if name not in entries:
        raise FeatstoreError(
            f"unknown source {name!r}; known sources: {', '.join(sorted(entries))}"
        )
    e = entries[name]
    return Source(
        name=name,
        model=e["model"],
        sae=e["sae"],
        hook=e["hook"],
        d_sae=int(e["d_sae"]),
        layers=tuple(e["layers"]),
        text=e["text"],
        text_dir=Path(text_dir) if text_dir is not None else None,
    )


def default_layers(source: str = DEFAULT_SOURCE) -> tuple[int, ...]:
    """The layers a source has SAEs for (its `sources.yaml` entry): every layer default."""
    return get_source(source).layers
