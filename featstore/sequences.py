"""Reading whole sequences back from a store: token ids by shard, the codes of their tokens, and
the text of token ids (ground floor: takes any store, imports nothing of featstore)."""

from __future__ import annotations

from collections.abc import Sequence
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


def token_text(token: int, vocab: Sequence[str] | None) -> str:
    """A token id's text, or `<id>` where the vocabulary lacks it: a store's vocabulary may be
    shorter than the model's output vocabulary (gpt2-random: 2,048 of 50,257), and ingested
    tables hold -1 for unknown tokens."""
    return vocab[token] if vocab is not None and 0 <= token < len(vocab) else f"<{token}>"


def token_texts(tokens: np.ndarray | Sequence[int], vocab: Sequence[str] | None) -> list[str]:
    """`token_text` of each id."""
    return [token_text(t, vocab) for t in np.asarray(tokens).tolist()]
