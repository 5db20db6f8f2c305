"""Generated sources (`featstore.sources.generated`): built once into the cache from seeds, read
back as built, SAE biases calibrated for the asked L0; the same model and SAEs in memory
(what tests/gpt2_dims.py uses at GPT-2 size). A small architecture stands in for GPT-2's here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from featstore.sources import generated, registry

D_SAE, L0 = 256, 8
pytestmark = pytest.mark.slow  # ~20 s on 2 idle cores, over a minute when they are shared


@pytest.fixture
def mini(tmp_path, monkeypatch):
    """A `gpt2-random`-like source of a small model, its cache in a temporary folder."""
    known = registry.registry()
    entry = copy.deepcopy(known["gpt2-random"])
    entry["model"]["config"].update(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=128,
                                    d_vocab=2048)  # fmt: skip
    entry.update(layers=[1, 2], d_sae=D_SAE)
    entry["sae"]["l0"] = L0
    monkeypatch.setattr(registry, "registry", lambda: {**known, "mini-random": entry})
    monkeypatch.setenv(generated.CACHE_ENV, str(tmp_path / "cache"))
    return registry.get_source("mini-random")


def test_the_tokenizer_needs_no_generation(mini, tmp_path):
    tokenizer = mini.load_tokenizer()
    assert tokenizer.bos_token_id is not None and len(tokenizer) <= 2048
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_generated_once_read_back_as_built_and_calibrated(mini, tmp_path):
    folder = generated.source_folder(mini)
    assert (folder / generated.DONE).exists()
    assert generated.source_folder(mini) == folder  # second use: the same folder, not rebuilt
    stamp = (folder / generated.DONE).stat().st_mtime_ns
    generated.source_folder(mini)
    assert (folder / generated.DONE).stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        folder.name]  # fmt: skip

    loaded = mini.load_model()
    built = generated.make_model(mini)
    for name, value in built.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)

    x = generated.calibration_residuals(mini, built)
    for layer in mini.layers:
        sae = mini.load_sae(layer)
        again = generated.make_sae(mini, x[layer], layer)
        torch.testing.assert_close(sae.b_enc, again.b_enc, rtol=0, atol=0)
        with torch.no_grad():
            fires = (sae.encode(x[layer]) > 0).sum(0).numpy()
        # Each feature fires on its k calibration tokens above the bias: L0 = d_sae * k / n.
        k = max(1, round(len(x[layer]) * L0 / D_SAE))
        assert np.all(fires == k)
        assert fires.sum() / len(x[layer]) == pytest.approx(L0, rel=0.1)
