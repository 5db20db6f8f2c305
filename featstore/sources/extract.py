"""Text in, sparse SAE feature activations out: tokenise shards, run the model, encode, store."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore import settings
from featstore.defaults import DEFAULT_SOURCE
from featstore.errors import FeatstoreError
from featstore.sources.registry import Source, get_source
from featstore.store import blockpass, spec
from featstore.store.local import ActivationWriter, Store

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
Logger = Callable[[str], None]


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract: source, layers, sequence shape and where the text comes from."""

    source: str = DEFAULT_SOURCE
    layers: tuple[int, ...] | None = None  # None: every layer of the source (sources.yaml)
    seq_len: int = 128
    batch_size: int = 32
    device: str = "cpu"
    text_dir: str | None = None
    max_sequences: int | None = None  # per shard; None takes the whole shard

    of = classmethod(settings.of)  # from CLI arguments or a resource, in one call

    def __post_init__(self) -> None:
        source = get_source(self.source)
        object.__setattr__(
            self, "layers", source.layers if self.layers is None else tuple(self.layers)
        )
        if not self.layers:
            raise FeatstoreError("no layers given")
        if self.seq_len < 2:
            raise FeatstoreError(
                f"seq_len must be at least 2 (BOS + one token), got {self.seq_len}"
            )
        if self.batch_size < 1:
            raise FeatstoreError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise FeatstoreError(f"max_sequences must be positive, got {self.max_sequences}")
        source.check_layers(self.layers)
        source.check_seq_len(self.seq_len)

    def get_source(self) -> Source:
        return get_source(self.source, self.text_dir)


@dataclass
class ExtractReport:
    """What one shard's extraction produced, for logs and Dagster metadata."""

    shard: str
    n_tokens: int = 0
    seconds: float = 0.0
    nnz: dict[int, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def l0(self) -> dict[int, float]:
        return {layer: n / max(self.n_tokens, 1) for layer, n in self.nnz.items()}

    def summary(self) -> str:
        l0 = ", ".join(f"L{layer} {v:.1f}" for layer, v in self.l0.items())
        return (
            f"shard {self.shard}: {self.n_tokens} tokens in {self.seconds:.1f}s "
            f"({self.tokens_per_second:.0f} tok/s); L0 {l0}"
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "tokens": self.n_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            **{f"nnz_layer_{k}": v for k, v in self.nnz.items()},
            **{f"l0_layer_{k}": round(v, 3) for k, v in self.l0.items()},
        }


# -- tokenisation ------------------------------------------------------------------------------


def pack_sequences(
    docs: Iterable[list[int]], seq_len: int, bos: int, max_sequences: int | None = None
) -> np.ndarray:
    """Concatenate documents (EOS-separated) and cut into [BOS] + (seq_len - 1) token rows."""
    body = seq_len - 1
    buffer: list[int] = []
    rows: list[list[int]] = []
    for ids in docs:
        buffer.extend(ids)
        buffer.append(bos)  # GPT-2 style: BOS and EOS are the same end-of-text token
        while len(buffer) >= body:
            rows.append([bos, *buffer[:body]])
            del buffer[:body]
            if max_sequences is not None and len(rows) >= max_sequences:
                return np.asarray(rows, dtype=np.int32)
    return np.asarray(rows, dtype=np.int32).reshape(-1, seq_len)


def token_table(sequences: np.ndarray) -> pl.DataFrame:
    """One row per token: (seq, pos, token), row-major over the sequences."""
    n_seq, seq_len = sequences.shape
    return pl.DataFrame(
        {
            "seq": np.repeat(np.arange(n_seq, dtype=np.int32), seq_len),
            "pos": np.tile(np.arange(seq_len, dtype=np.int32), n_seq),
            "token": sequences.reshape(-1).astype(np.int32),
        }
    )


def tokenize_shard(store: Store, cfg: ExtractConfig, shard: str, keep: bool = False) -> Any:
    """Tokenise one text shard into the store's token table; returns the number of tokens (with
    `keep`, the sequences themselves: inside a transaction they are not readable until it
    commits)."""
    source = cfg.get_source()
    tokenizer = source.load_tokenizer()
    bos = tokenizer.bos_token_id
    if bos is None:
        raise FeatstoreError(f"tokenizer of source {source.name} has no BOS token")
    docs = (
        tokenizer(text, add_special_tokens=False)["input_ids"] for text in source.load_texts(shard)
    )
    sequences = pack_sequences(docs, cfg.seq_len, bos, cfg.max_sequences)
    if len(sequences) == 0:
        raise FeatstoreError(f"shard {shard} has less text than one sequence of {cfg.seq_len}")
    if store.vocab() is None:
        store.write_vocab(
            [tokenizer.decode([i]) for i in range(len(tokenizer))], {"source": source.name}
        )
    store.write_tokens(
        shard,
        token_table(sequences),
        {
            "source": source.name,
            "dataset": source.text["dataset"],
            "seq_len": cfg.seq_len,
            "n_sequences": int(len(sequences)),
        },
    )
    return sequences if keep else int(sequences.size)


# -- extraction --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _model_and_saes(source_name: str, layers: tuple[int, ...], device: str):
    source = get_source(source_name)
    model = source.load_model(device)
    model.eval()
    too_deep = [layer for layer in layers if layer >= model.cfg.n_layers]
    if too_deep:
        raise FeatstoreError(
            f"model of source {source_name} has {model.cfg.n_layers} layers; no layer {too_deep}"
        )
    saes = {layer: source.load_sae(layer, device) for layer in layers}
    for layer, sae in saes.items():
        if sae.cfg.d_in != model.cfg.d_model:
            raise FeatstoreError(
                f"SAE {source.sae_id(layer)}: d_in {sae.cfg.d_in} != model d_model "
                f"{model.cfg.d_model}"
            )
    return model, saes


def load_model_and_saes(cfg: ExtractConfig, layers: tuple[int, ...] | None = None):
    """The (cached) model and one SAE per layer, checked against each other."""
    return _model_and_saes(cfg.source, tuple(sorted(layers or cfg.layers)), cfg.device)


def dense_to_csr(acts: torch.Tensor) -> sp.csr_matrix:
    """(tokens, d_sae) dense tensor -> scipy CSR holding only its nonzeros.

    The nonzeros are found on the tensor's device, so only they cross to the host: copying the
    dense codes off a GPU first made extraction 20-60x slower than the forward pass. Codes in
    host memory go through `blockpass.dense_csr`.
    """
    acts = acts.detach()
    if acts.device.type == "cpu":  # one compiled pass: torch's nonzero is ~10x slower here
        return blockpass.dense_csr(acts.float().numpy())
    return device_csr(acts)


def device_csr(acts: torch.Tensor) -> sp.csr_matrix:
    """`dense_to_csr` on the tensor's own device (torch ops; what a GPU runs, testable on CPU):
    only the nonzeros, their int32 ids and the row pointers cross to the host."""
    import torch

    rows, cols = torch.nonzero(acts, as_tuple=True)  # row-major order, as CSR wants
    values = acts[rows, cols].float()
    bounds = torch.arange(acts.shape[0] + 1, device=acts.device, dtype=rows.dtype)
    indptr = torch.searchsorted(rows, bounds)
    # Feature ids cross as int32 (the store's type; half the bytes of nonzero's int64).
    ids = cols.to(torch.int32) if acts.shape[1] < 2**31 else cols
    return sp.csr_matrix(
        (values.cpu().numpy(), ids.cpu().numpy(), indptr.cpu().numpy()),
        shape=tuple(acts.shape),
    )


def encode_batch(
    model, saes: dict, hooks: dict[int, str], tokens: torch.Tensor
) -> dict[int, sp.csr_matrix]:
    """SAE codes of one batch at each layer's hook; the forward pass stops after the last."""
    import torch

    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens,
            names_filter=list(hooks.values()),
            stop_at_layer=max(saes) + 1,
        )
        out = {}
        for layer, sae in saes.items():
            resid = cache[hooks[layer]].reshape(-1, model.cfg.d_model)
            out[layer] = dense_to_csr(sae.encode(resid.to(sae.dtype)))
    return out


def encode_and_store(
    model,
    saes: dict,
    hooks: dict[int, str],
    batches: Iterable[torch.Tensor],
    writers: dict[int, ActivationWriter],
) -> Iterator[dict[int, sp.csr_matrix]]:
    """Encode each batch, append its codes to the layers' writers and yield them.

    Storing batch k (CPU: checks, statistics, compression, file writes; one thread per layer,
    the compiled passes and blosc release the GIL) runs while the model encodes batch k + 1, so
    a GPU is not kept waiting for the disk.
    """
    with ThreadPoolExecutor(max(len(writers), 1), "featstore-store") as background:
        stored: list[Future[None]] = []
        for batch in batches:
            codes = encode_batch(model, saes, hooks, batch)
            for done in stored:
                done.result()
            stored = [background.submit(writers[layer].append, csr) for layer, csr in codes.items()]
            yield codes
        for done in stored:
            done.result()


def extract_shard(
    store: Store,
    cfg: ExtractConfig,
    shard: str,
    layers: tuple[int, ...] | None = None,
    progress: Logger | None = None,
    retokenize: bool = False,
) -> ExtractReport:
    """Encode one shard at each layer and store it; memory bounded by one batch.

    The shard is tokenised first when it has no token table yet, or when `retokenize` is set.
    Its token table and every layer become visible together when all are written, or, on an
    error or a kill, not at all (`Store.transaction`).
    """
    layers = tuple(sorted(layers or cfg.layers))
    source = cfg.get_source()
    source.check_layers(layers)
    # One extraction of a shard at a time: a second one would re-tokenise under the first.
    with store.lock(f"extract/{shard}"), store.transaction():
        sequences = None
        if retokenize or shard not in store.token_shards():
            sequences = tokenize_shard(store, cfg, shard, keep=True)
        return _extract_tokenised(store, cfg, shard, source, layers, progress, sequences)


def _extract_tokenised(
    store: Store,
    cfg: ExtractConfig,
    shard: str,
    source: Source,
    layers: tuple[int, ...],
    progress: Logger | None,
    sequences: np.ndarray | None = None,
) -> ExtractReport:
    import torch

    sequences = store.sequences(shard) if sequences is None else sequences
    model, saes = load_model_and_saes(cfg, layers)
    if sequences.shape[1] > model.cfg.n_ctx:
        raise FeatstoreError(
            f"shard {shard}: sequences of {sequences.shape[1]} tokens exceed the model's "
            f"context of {model.cfg.n_ctx}"
        )
    hooks = {layer: source.hook_name(layer) for layer in layers}
    report = ExtractReport(shard=shard, nnz=dict.fromkeys(layers, 0))
    say = progress or log.info
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = {
            layer: stack.enter_context(
                store.activation_writer(
                    layer, shard, saes[layer].cfg.d_sae, _attrs(source, layer, cfg)
                )
            )
            for layer in layers
        }
        n_batches = -(-len(sequences) // cfg.batch_size)
        batches = (
            torch.tensor(sequences[lo : lo + cfg.batch_size], device=cfg.device)
            for lo in range(0, len(sequences), cfg.batch_size)
        )
        for b, codes in enumerate(encode_and_store(model, saes, hooks, batches, writers)):
            for layer, csr in codes.items():
                report.nnz[layer] += csr.nnz
            report.n_tokens += next(iter(codes.values())).shape[0]  # rows: the batch's tokens
            report.seconds = time.perf_counter() - start
            if b % 10 == 9 or b == n_batches - 1:
                left = (n_batches - b - 1) * report.seconds / (b + 1)
                say(
                    f"shard {shard}: batch {b + 1}/{n_batches}, {report.tokens_per_second:.0f} "
                    f"tok/s, about {left:.0f}s left"
                )
        for layer, writer in writers.items():
            writer.group.attrs.update({"seconds": round(report.seconds, 3), "l0": report.l0[layer]})
    return report


def _attrs(source: Source, layer: int, cfg: ExtractConfig) -> dict[str, Any]:
    return {
        "featstore-spec-version": spec.SPEC_VERSION,
        "source": source.name,
        "model": source.model["name"],
        "sae_release": source.sae["release"],
        "sae_id": source.sae_id(layer),
        "hook": source.hook_name(layer),
        "dataset": source.text["dataset"],
        "seq_len": cfg.seq_len,
    }


def list_shards(cfg: ExtractConfig) -> list[str]:
    """The text shards a source offers (one per file for local text)."""
    return cfg.get_source().shard_names()


def extract_all(
    store: Store, cfg: ExtractConfig, shards: list[str] | None = None
) -> Iterator[ExtractReport]:
    """Tokenise and extract every shard (or the given ones), one at a time."""
    for shard in shards or list_shards(cfg):
        yield extract_shard(store, cfg, shard, retokenize=True)
