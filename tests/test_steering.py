"""Steering in batches of sequences on the toy (`tiny` source) model: the batched sums equal the
one-batch formula written here with torch and scipy, over sequences of two shards; the largest
torch memory held during a run does not grow with the number of sequences."""

from __future__ import annotations

import weakref

import numpy as np
import polars as pl
import pytest
import scipy.special
import torch
from helpers import model_store, one_torch_thread
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from featstore.analysis.steering import SteerConfig, run_steering, steer
from featstore.errors import FeatstoreError
from featstore.sources.extract import ExtractConfig, load_model_and_saes

LAYER, TARGETS, SEQ_LEN = 6, (7, 9), 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def toy():
    return load_model_and_saes(ExtractConfig(source="tiny", layers=(LAYER, *TARGETS)))


def toy_tokens(model, n_seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, model.cfg.d_vocab, (n_seq, SEQ_LEN))


@pytest.fixture(scope="module")
def two_shards(toy, tmp_path_factory):
    """A store of the toy's codes on two shards of 3 and 4 sequences."""
    model, saes = toy
    home = tmp_path_factory.mktemp("steer")
    parts = {"s0": toy_tokens(model, 3, 1), "s1": toy_tokens(model, 4, 2)}
    for shard, tokens in parts.items():
        store = model_store(home, model, saes, tokens, shard)
    return store, parts


def one_batch(model, saes, tokens: np.ndarray, feature: int, value: float) -> dict:
    """The steering formula on all sequences at once (BOS position left out): the mean KL(clean ||
    steered), the mean probability change per token, the mean code change per target feature."""
    sae = saes[LAYER]

    def clamp(resid, hook):
        change = (value - sae.encode(resid)[..., feature])[..., None] * sae.W_dec[feature]
        change[:, 0] = 0
        return resid + change

    names = {t: f"blocks.{t}.hook_resid_pre" for t in TARGETS}
    x = torch.as_tensor(tokens)
    seen = {}
    save = [(names[t], lambda r, hook, t=t: seen.update({t: r})) for t in TARGETS]
    with torch.no_grad():
        clean, cache = model.run_with_cache(x, names_filter=list(names.values()))
        steered = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_pre", clamp),
                                                     *save])  # fmt: skip
        p = torch.softmax(clean[:, 1:].double(), -1).numpy()
        q = torch.softmax(steered[:, 1:].double(), -1).numpy()
        codes = {t: (saes[t].encode(seen[t]) - saes[t].encode(cache[names[t]]))[:, 1:].double()
                 for t in TARGETS}  # fmt: skip
    return {
        "kl": scipy.special.rel_entr(p, q).sum(-1).mean(),
        "change": (q - p).mean((0, 1)),
        **{t: codes[t].mean((0, 1)).numpy() for t in TARGETS},
    }


def ranked(frame: pl.DataFrame, kind: str, **keys) -> pl.DataFrame:
    mine = pl.all_horizontal(pl.col(k) == v for k, v in {"kind": kind, **keys}.items())
    return frame.filter(mine).sort("rank")


def test_batches_across_shards_equal_the_one_batch_formula(toy, two_shards):
    model, saes = toy
    store, parts = two_shards
    dense = np.vstack([store.read(LAYER, s).toarray() for s in parts]).astype(np.float64)
    count = (dense > 0).sum(0)
    features = tuple(int(f) for f in np.argsort(-count, kind="stable")[:2])
    cfg = SteerConfig(LAYER, features, k=3.0, targets=TARGETS, top=8)
    # 7 sequences in batches of 3, 3 and 1: the first batch holds sequences of both shards
    paths = run_steering(store, model, saes, cfg, max_sequences=None, batch=3)
    frames = {k: pl.read_parquet(v) for k, v in paths.items()}
    tokens = np.concatenate(list(parts.values()))
    for f in features:
        value = 3.0 * dense[:, f].sum() / count[f]  # k x the mean activation where active
        want = one_batch(model, saes, tokens, f, value)
        row = frames["summary"].filter(pl.col("feature") == f).row(0, named=True)
        assert row["value"] == pytest.approx(value, rel=1e-6)
        assert row["kl"] == pytest.approx(want["kl"], rel=1e-5)
        for kind, sign in (("gained", -1), ("lost", 1)):
            got = ranked(frames["tokens"], kind, feature=f)
            order = np.argsort(sign * want["change"], kind="stable")[:8]
            assert got["token"].to_list() == order.tolist()
            np.testing.assert_allclose(got["change"], want["change"][order], rtol=1e-4, atol=1e-9)
            for t in TARGETS:
                got = ranked(frames["features"], kind, feature=f, layer_b=t)
                order = np.argsort(sign * want[t], kind="stable")[:8]
                np.testing.assert_allclose(got["change"], want[t][order], rtol=1e-4, atol=1e-6)


def test_batch_size_is_checked(toy):
    model, saes = toy
    cfg = SteerConfig(LAYER, (1,), targets=TARGETS)
    with pytest.raises(FeatstoreError, match="batch"):
        steer(model, saes, toy_tokens(model, 2, 0), np.ones(512), cfg, batch=0)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the torch storages made (not viewed or written in place) inside the block and
    still alive, and their peak: each new storage is counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self.counted and key not in given:
                self.counted.add(key)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(model, saes, n_seq: int, batch: int) -> int:
    cfg = SteerConfig(LAYER, (1, 2), targets=TARGETS)
    tokens = toy_tokens(model, n_seq, 3)
    with LiveTensorBytes() as watch:
        steer(model, saes, tokens, np.ones(512), cfg, batch=batch)
    assert watch.live == 0  # nothing made inside is kept
    return watch.peak


def test_peak_memory_does_not_grow_with_the_sequences(toy):
    model, saes = toy
    few, many = peak_bytes(model, saes, 4, 2), peak_bytes(model, saes, 12, 2)
    assert many == pytest.approx(few, rel=0.01)
    assert peak_bytes(model, saes, 12, 12) > 3 * many  # the watch sees a batch's size
