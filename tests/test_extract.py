"""Extraction on the `tiny` source equals an independent transformer_lens + sae_lens run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featstore import FeatstoreError, open_store
from featstore.sources.extract import ExtractConfig, extract_shard, pack_sequences
from featstore.sources.registry import get_source

CFG = ExtractConfig(source="tiny", layers=(6, 7, 8, 9), max_sequences=6, batch_size=4)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("x") / "home", create=True)
    shard = get_source("tiny").shard_names()[0]
    report = extract_shard(store, CFG, shard)
    return store, shard, report


def test_activations_equal_independent_hooks(extracted):
    store, shard, _ = extracted
    source = get_source("tiny")
    model = source.load_model()
    tokens = torch.as_tensor(store.tokens(shard)["token"].to_numpy().reshape(-1, CFG.seq_len))
    captured: dict[str, torch.Tensor] = {}

    def keep(resid, hook):
        captured[hook.name] = resid.detach().clone()

    hooks = [(f"blocks.{layer}.hook_resid_pre", keep) for layer in CFG.layers]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        for layer in CFG.layers:
            sae = source.load_sae(layer)
            expected = sae.encode(captured[f"blocks.{layer}.hook_resid_pre"]).reshape(
                -1, sae.cfg.d_sae
            )
            stored = store.read(layer, shard).toarray()
            assert stored.shape == tuple(expected.shape)
            assert np.abs(stored - expected.numpy()).max() <= 1e-5
            assert store.info(layer, shard)["nnz"] == int((expected != 0).sum())


def test_token_table_starts_every_sequence_with_bos(extracted):
    store, shard, _ = extracted
    table = store.tokens(shard)
    bos = get_source("tiny").load_tokenizer().bos_token_id
    assert table.height == CFG.max_sequences * CFG.seq_len
    assert set(table.filter(table["pos"] == 0)["token"].to_list()) == {bos}


def test_report_matches_store(extracted):
    store, shard, report = extracted
    for layer in CFG.layers:
        info = store.info(layer, shard)
        assert report.nnz[layer] == info["nnz"]
        assert info["hook"] == f"blocks.{layer}.hook_resid_pre"
        assert info["source"] == "tiny"
        assert 5 <= report.l0[layer] <= 100


def test_pack_sequences_matches_plain_reference():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    stream = [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 9, 0]
    got = pack_sequences(docs, seq_len=4, bos=0)
    expected = [[0, *stream[i : i + 3]] for i in range(0, len(stream) - 2, 3)]
    assert got.tolist() == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"source": "nope"}, "unknown source", id="unknown-source"),
        pytest.param({"layers": (6, 10)}, r"no SAE for layer\(s\) \[10\]", id="layer-without-sae"),
        pytest.param({"seq_len": 1}, "seq_len must be at least 2", id="seq-len"),
        pytest.param({"batch_size": 0}, "batch_size must be positive", id="batch"),
        pytest.param({"seq_len": 200}, "exceeds the context of 128", id="over-context"),
    ],
)
def test_bad_configuration_is_one_line(kwargs, message):
    with pytest.raises(FeatstoreError, match=message):
        ExtractConfig(**kwargs)
