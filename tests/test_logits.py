"""Logit effects equal transformer_lens' own final LayerNorm and unembedding on the decoder rows."""

from __future__ import annotations

import html

import numpy as np
import polars as pl
import pytest
import torch
from helpers import SMALL_VOCAB, model_store, random_model, random_saes, random_tokens

from featstore.analysis import cards, logits
from featstore.errors import FeatstoreError
from featstore.store.sql import query


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = random_model(seed=3)
    tokens = random_tokens(4, 16, seed=3)
    saes = random_saes(model, tokens, layers=(6, 7), d_sae=24, seed=3)
    store = model_store(tmp_path_factory.mktemp("logits"), model, saes, tokens)
    decoders = {lay: sae.W_dec.detach().numpy() for lay, sae in saes.items()}
    return model, store, decoders


def reference(model, w_dec: np.ndarray) -> np.ndarray:
    """ln_final then unembed, minus what they give a zero vector, times the LayerNorm's 1/scale
    (positive, the same for every token): features x vocab."""
    d = torch.as_tensor(w_dec)[:, None, :]
    with torch.no_grad():
        out = model.unembed(model.ln_final(d)) - model.unembed(model.ln_final(torch.zeros_like(d)))
        centred = d - d.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    return (out * scale)[:, 0].numpy()


def test_top_tokens_and_effects_match_transformer_lens(setup):
    model, store, decoders = setup
    table = logits.store_logit_effects(store, [6, 7], k=5, model=model, decoders=decoders)
    assert table.height == 2 * 24 * 2 * 5
    for layer in (6, 7):
        ref = reference(model, decoders[layer])
        for f in (0, 11, 23):
            rows = table.filter((pl.col("layer") == layer) & (pl.col("feature") == f))
            orders = {"promoted": np.argsort(-ref[f]), "suppressed": np.argsort(ref[f])}
            for kind, order in orders.items():
                mine = rows.filter(pl.col("kind") == kind).sort("rank")
                assert mine["token"].to_list() == order[:5].tolist()
                np.testing.assert_allclose(mine["effect"], ref[f][order[:5]], rtol=1e-4, atol=1e-5)
                assert mine["text"].to_list() == [SMALL_VOCAB[t] for t in order[:5]]


def test_blocks_do_not_change_the_table(setup):
    model, _, decoders = setup
    w_u, scale, centre = logits.unembedding(model)
    whole = logits.logit_effects(decoders[6], w_u, scale=scale, centre=centre, k=3, block_rows=64)
    small = logits.logit_effects(decoders[6], w_u, scale=scale, centre=centre, k=3, block_rows=5)
    # The same rows and tokens; the effects to float32 rounding (a matrix product of 5 rows need
    # not round as one of 64 does: BLAS picks its kernel by shape and threads).
    keys = ["feature", "kind", "rank", "token"]
    assert whole.select(keys).equals(small.select(keys))
    np.testing.assert_allclose(whole["effect"], small["effect"], rtol=1e-5, atol=1e-6)


def test_table_is_queryable_and_read_per_feature(setup):
    model, store, decoders = setup
    assert logits.read_logit_effects(store, 6, 0) is None
    table = logits.store_logit_effects(store, [6, 7], k=4, model=model, decoders=decoders)
    logits.write_logit_effects(store, table)
    one = logits.read_logit_effects(store, 7, 5)
    assert one.equals(table.filter((pl.col("layer") == 7) & (pl.col("feature") == 5)))
    sql = "select count(*) as n from logit_effects where layer = 6 and kind = 'promoted'"
    assert query(store, sql)["n"][0] == 24 * 4
    card = cards.feature_card(store, 7, 5, top=2)
    assert card.logits.equals(one)
    page = cards.card_html(card)
    for text in one["text"]:
        assert f"<td class=ctx>{html.escape(text)}</td>" in page


def test_damaged_table_is_reported(setup, tmp_path):
    _, store, _ = setup
    path = logits.logits_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(FeatstoreError, match="cannot read logit effects"):
        logits.read_logit_effects(store, 6, 0)
    path.unlink()


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(FeatstoreError, match="decoder width"):
        logits.logit_effects(np.ones((3, 4)), np.ones((5, 6)))
    with pytest.raises(FeatstoreError, match="k must be"):
        logits.logit_effects(np.ones((3, 4)), np.ones((4, 6)), k=0)


def test_dagster_asset_writes_the_table_of_the_stores_source(tmp_path):
    import dagster as dg
    import scipy.sparse as sp

    from featstore.sources.registry import get_source
    from featstore.store.home import open_store
    from pipelines.assets.comparison import logit_effects
    from pipelines.resources import FeatstoreResource

    d_sae = get_source("tiny").d_sae
    store = open_store(tmp_path, create=True)
    store.write_activations(
        6, "s0", sp.csr_matrix((4, d_sae), dtype=np.float32), {"source": "tiny"}
    )
    resources = {"featstore": FeatstoreResource(home=str(tmp_path))}
    run_config = {"ops": {"logit_effects": {"config": {"k": 3}}}}
    result = dg.materialize([logit_effects], resources=resources, run_config=run_config)
    assert result.success
    table = pl.read_parquet(logits.logits_path(store))
    assert table.height == d_sae * 2 * 3 and set(table["layer"]) == {6}
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["dagster/row_count"].value == table.height
