"""The shipped tiny model, its SAEs and metrics load and behave like real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featstore.sources import tiny, train_tiny

ROOT = Path(tiny.__file__).parent.parent / "embedded"
TINY = ROOT / "tiny"
SAMPLE_SEQS = 16


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return tiny.load_model(TINY / "model")


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((TINY / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sample(model) -> torch.Tensor:
    text = (ROOT / "text" / "shard-000.txt").read_text()
    return train_tiny.chunk_tokens(model.tokenizer, [text])[:SAMPLE_SEQS]


@pytest.fixture(scope="module")
def acts(model, sample) -> dict[int, torch.Tensor]:
    return train_tiny.residuals(model, sample)


def test_model_shape_and_tokenizer(model):
    assert model.cfg.n_layers >= 10
    assert model.cfg.n_ctx == tiny.CTX
    assert model.cfg.d_vocab == len(model.tokenizer)
    text = "def f(x):\n    return {'a': x ** 2}  # café\n"
    tokens = model.to_tokens(text)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    assert torch.equal(model.to_tokens(text, prepend_bos=False)[0], tokens[0, 1:])


def test_load_tokenizer_matches_model(model):
    tok = tiny.load_tokenizer(TINY / "model")
    assert tok("x = 1")["input_ids"] == model.to_tokens("x = 1")[0].tolist()
    plain = tiny.load_tokenizer(TINY / "model", add_bos=False)
    assert plain("x = 1")["input_ids"] == model.to_tokens("x = 1")[0, 1:].tolist()


def test_model_predicts_heldout_text(model, sample, metrics):
    loss = train_tiny.eval_loss(model, sample)
    assert loss < 0.7 * torch.log(torch.tensor(float(model.cfg.d_vocab))).item()
    assert abs(loss - metrics["model"]["heldout_loss"]) < 0.5


@pytest.mark.parametrize("layer", train_tiny.LAYERS)
def test_sae_loads_and_matches_metrics(layer, model, acts, metrics):
    from sae_lens import SAE

    name = tiny.hook_name(layer)
    sae = SAE.load_from_disk(TINY / "saes" / name)
    assert sae.cfg.metadata.hook_name == name
    assert sae.cfg.metadata.model_name == tiny.MODEL_NAME
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (model.cfg.d_model, tiny.D_SAE)
    got = train_tiny.sae_metrics(sae, acts[layer])
    assert 5 <= got["l0"] <= 100
    assert got["explained_variance"] >= 0.7
    shipped = metrics["saes"][name]
    assert 5 <= shipped["l0"] <= 100 and shipped["explained_variance"] >= 0.8
    assert abs(got["l0"] - shipped["l0"]) <= 0.35 * shipped["l0"]
    assert abs(got["explained_variance"] - shipped["explained_variance"]) <= 0.1


def test_sae_reads_the_hooked_run(model, sample):
    from sae_lens import SAE

    sae = SAE.load_from_disk(TINY / "saes" / tiny.hook_name(train_tiny.LAYERS[0]))
    _, cache = model.run_with_cache(sample[:2], names_filter=tiny.hook_name(train_tiny.LAYERS[0]))
    feats = sae.encode(cache[tiny.hook_name(train_tiny.LAYERS[0])][:, 1:])
    assert feats.shape == (2, tiny.CTX - 1, tiny.D_SAE)
    l0 = (feats > 0).sum(-1).float().mean().item()
    assert 5 <= l0 <= 100


def test_source_tiny_uses_shipped_files():
    from featstore.sources.registry import get_source

    src = get_source("tiny")
    assert src.shard_names() == ["shard-000", "shard-001", "shard-002"]
    for path in src.text_files():
        assert 20_000 <= path.stat().st_size <= 40_000
    assert src.load_sae(src.layers[-1]).cfg.metadata.hook_name == src.hook_name(src.layers[-1])


def test_shipped_size_is_small():
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
