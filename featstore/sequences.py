"""Reading whole sequences back from a store: token ids by shard, the codes of their tokens, and
the text of token ids (ground floor: takes any store, imports nothing of featstore)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from featstore.store.local import Store


def store_sequences(
    store: Store, shards: Sequence[str], max_sequences: int | None = None
) -> list[np.ndarray]:
    """Per shard, the token ids of its first `max_sequences` sequences (n_seq, seq_len)."""
    return [store.sequences(shard)[:max_sequences] for shard in shards]


def stacked_codes(
    store: Store, layer: int, shards: Sequence[str], sequences: list[np.ndarray]
) -> sp.csr_matrix:
    """A layer's codes of those sequences' tokens, shards stacked in order."""
    parts = [store.read(layer, sh, 0, s.size) for sh, s in zip(shards, sequences, strict=True)]
    return sp.vstack(parts, format="csr")


def sequence_batches(sequences: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, slice]]:
    """Consecutive batches of at most `batch` of `sequences` (n_seq, seq_len), in order: each
    batch's token ids and the rows its tokens take in codes stacked the same way
    (`stacked_codes`). A model run over one batch at a time holds memory for `batch` sequences
    whatever the number of shards; sums over the batches equal the one-batch sums."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1 sequence, got {batch}")
    seq_len = sequences.shape[1]
    for lo in range(0, len(sequences), batch):
        hi = min(lo + batch, len(sequences))
        yield sequences[lo:hi], slice(lo * seq_len, hi * seq_len)


def token_text(token: int, vocab: Sequence[str] | None) -> str:
    """A token id's text, or `<id>` where the vocabulary lacks it: a store's vocabulary may be
    shorter than the model's output vocabulary (gpt2-random: 2,048 of 50,257), and ingested
    tables hold -1 for unknown tokens."""
    return vocab[token] if vocab is not None and 0 <= token < len(vocab) else f"<{token}>"


def token_texts(tokens: np.ndarray | Sequence[int], vocab: Sequence[str] | None) -> list[str]:
    """`token_text` of each id."""
    return [token_text(t, vocab) for t in np.asarray(tokens).tolist()]
