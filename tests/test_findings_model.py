"""The model-side findings on a small random model: decoder survival in the next SAE's error
against hooks and the SAE's own forward pass; C3a's row from the block's components."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from helpers import one_torch_thread, small_model_setup

from featstore.analysis import evidence, findings, vanishing
from featstore.analysis.erasure import component_sums


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return small_model_setup(tmp_path_factory.mktemp("fm"), seed=3, n_seq=16)


@pytest.mark.parametrize("batch", [3, 16])  # batches of 3 sequences (the last of 1), or one
def test_decoder_survival_projects_the_next_saes_error(setup, batch):
    model, saes, tokens, store = setup
    features = np.array([0, 5, 17, 40])
    got = vanishing.decoder_survival(store, model, saes, 7, features, ["s0"], batch=batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(tokens))
        x = cache["blocks.8.hook_resid_pre"].reshape(-1, model.cfg.d_model)
        error = (x - saes[8](x)).numpy().astype(np.float64)  # the SAE's own forward pass
    codes = store.read(7, "s0").toarray()[:, features]
    codes[np.arange(codes.shape[0]) % tokens.shape[1] == 0] = 0  # BOS left out
    w = saes[7].W_dec.detach().numpy().astype(np.float64)[features]
    norms = np.linalg.norm(w, axis=1)
    for k in range(features.size):
        on = codes[:, k] > 0
        want = (error[on] @ (w[k] / norms[k])).sum() / (codes[on, k].sum() * norms[k])
        assert got["survival"][k] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_dominance_is_the_largest_components_share_signed(setup):
    model, saes, tokens, store = setup
    features = np.array([1, 2, 3, 30])
    got = evidence.dominance(model, saes[6], store, 6, features, ["s0"], None)
    sums = component_sums(model, saes[6], tokens, store.read(6, "s0"), features, 6)
    per_token = sums.contrib / sums.n_tokens[:, None]
    for k in range(features.size):
        top = np.abs(per_token[k]).argmax()
        share = np.abs(per_token[k]).max() / np.abs(per_token[k]).sum()
        assert got[k] == pytest.approx(share * np.sign(per_token[k, top]), rel=1e-9)


def test_c3a_row_with_a_model(setup, tmp_path):
    model, saes, _, store = setup
    best = vanishing.best_successor(store, 6, 7).filter(pl.col("n_active") >= evidence.MIN_ACTIVE)
    cut = float(best["best_necessity"].median())  # both groups non-empty at layer 6
    cfg = findings.FindingsConfig(
        layers=(6, 7, 8, 9), n_boot=100, max_features=20, vanishing_necessity=cut
    )
    (row,) = findings.c3a_rows(store, cfg, ["s0"], tmp_path, model, saes)
    assert row["conjecture"] == "C3a" and row["n"] > 0
    assert 0 <= row["observed"] <= 1 and 0 <= row["control_value"] <= 1
    assert row["verdict"] in ("supported", "not supported", "inconclusive")
    assert (tmp_path / "c3a.png").stat().st_size > 1000
