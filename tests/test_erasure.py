"""Erasure: block components sum to the residual change; per-head parts equal hook_result;
the gradual-change table equals brute force."""

from __future__ import annotations

import networkx as nx
import numpy as np
import polars as pl
import pytest
import torch
from helpers import one_torch_thread, small_model_setup
from matplotlib.image import imread

from featstore.analysis.erasure import (
    block_components,
    component_names,
    component_sums,
    component_table,
    gradual_change,
    run_erasure,
    unlinked,
)
from featstore.names import node_id

LAYERS = (6, 7, 8, 9)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return small_model_setup(tmp_path_factory.mktemp("erasure"), seed=2, n_seq=8)


@pytest.mark.parametrize("block", [6, 8])
def test_components_sum_to_the_residual_change(setup, block):
    model, _, tokens, _ = setup
    comps, delta = block_components(model, tokens, block)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.as_tensor(tokens))
    change = cache[f"blocks.{block + 1}.hook_resid_pre"] - cache[f"blocks.{block}.hook_resid_pre"]
    torch.testing.assert_close(delta, change)
    torch.testing.assert_close(comps.sum(2), change, atol=1e-4, rtol=1e-4)
    assert comps.shape[2] == len(component_names(model)) == model.cfg.n_heads + 2


def test_feature_contributions_equal_hook_result_and_sum_to_the_change(setup):
    model, saes, tokens, store = setup
    block, features = 7, np.array([0, 9, 30])
    codes = store.read(block, "s0")
    sums = component_sums(model, saes[block], tokens, codes, features, block, batch=3)
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.as_tensor(tokens))
    finally:
        model.set_use_attn_result(False)
    result = cache[f"blocks.{block}.attn.hook_result"].reshape(-1, model.cfg.n_heads, 32)
    change = (
        cache[f"blocks.{block + 1}.hook_resid_pre"] - cache[f"blocks.{block}.hook_resid_pre"]
    ).reshape(-1, 32)
    w = saes[block].W_enc.detach()
    dense = codes.toarray()
    dense[:: tokens.shape[1]] = 0  # BOS positions are left out
    for row, f in enumerate(features):
        on = torch.as_tensor(dense[:, f] > 0)
        assert sums.n_tokens[row] == int(on.sum()) > 0
        heads = (result[on] @ w[:, f]).sum(0).numpy()
        np.testing.assert_allclose(sums.contrib[row, : model.cfg.n_heads], heads, atol=1e-4)
        np.testing.assert_allclose(sums.total[row], float((change[on] @ w[:, f]).sum()), atol=1e-4)
        np.testing.assert_allclose(sums.contrib[row].sum(), sums.total[row], atol=1e-4)


def test_unlinked_features_have_no_edge_to_the_next_layer():
    graph = nx.DiGraph()
    for (la, fa), (lb, fb) in [((6, 1), (7, 4)), ((6, 2), (8, 0)), ((5, 3), (6, 3))]:
        graph.add_node(node_id(la, fa), layer=la, feature=fa)
        graph.add_node(node_id(lb, fb), layer=lb, feature=fb)
        graph.add_edge(node_id(la, fa), node_id(lb, fb))
    alive = np.arange(5)
    assert unlinked(graph, 6, 7, alive, out=True).tolist() == [0, 2, 3, 4]
    assert unlinked(graph, 7, 6, alive, out=False).tolist() == [0, 1, 2, 3]


def test_component_table_counts_equal_a_loop():
    rng = np.random.default_rng(0)
    names = ["head 0", "head 1", "attn bias", "mlp"]
    rows = [
        {"block": 6, "role": role, "feature": f, "component": c, "mean_contribution": v}
        for role in ("erased", "new")
        for f in range(12)
        for c, v in zip(names, rng.normal(size=4), strict=True)
    ]
    table = component_table(pl.DataFrame(rows))
    roles = (("erased", "main_eraser", min, -1), ("new", "main_writer", max, 1))
    for c in names:
        got = table.filter(pl.col("component") == c).row(0, named=True)
        for role, key, pick, sign in roles:
            feats = {}
            for r in rows:
                if r["role"] == role:
                    feats.setdefault(r["feature"], {})[r["component"]] = r["mean_contribution"]
            main = [f for f, v in feats.items() if pick(v, key=v.get) == c and sign * v[c] > 0]
            assert got[key] == len(main)
        lowered = [r for r in rows if r["role"] == "erased" and r["component"] == c]
        assert got["lowers"] == sum(r["mean_contribution"] < 0 for r in lowered)
        assert got["erases_and_writes"] == (got["main_eraser"] > 0 and got["main_writer"] > 0)


def test_gradual_change_equals_brute_force(setup):
    _, saes, _, store = setup
    frame = gradual_change(store, saes, LAYERS)
    assert set(frame["distance"]) == {1, 2, 3}
    for a, b in ((6, 7), (6, 9), (7, 9)):
        x, y = store.read(a, "s0").toarray(), store.read(b, "s0").toarray()
        corr = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1] :]
        coactive = (x > 0).T.astype(int) @ (y > 0).astype(int) > 0
        wa = saes[a].W_dec.detach().numpy()
        wb = saes[b].W_dec.detach().numpy()
        cos = (wa / np.linalg.norm(wa, axis=1, keepdims=True)) @ (
            wb / np.linalg.norm(wb, axis=1, keepdims=True)
        ).T
        part = frame.filter((pl.col("layer") == a) & (pl.col("distance") == b - a)).sort("feature")
        feats = part["feature"].to_numpy()
        np.testing.assert_allclose(part["best_cosine"], cos[feats].max(1), atol=1e-5)
        best = np.where(coactive, corr, -np.inf)[feats].max(1)
        np.testing.assert_allclose(part["best_pearson"].fill_null(-np.inf), best, atol=1e-6)


def test_run_erasure_writes_tables_and_plots(setup, tmp_path):
    model, saes, _, store = setup
    graph = nx.DiGraph()  # no edges: every alive feature is unlinked
    paths = run_erasure(store, model, saes, graph, [6, 7, 8], tmp_path, max_sequences=4)
    features = pl.read_parquet(paths["erasure_features"])
    assert set(features["block"]) == {6, 7} and set(features["role"]) == {"erased", "new"}
    check = features.group_by("block", "role", "feature").agg(
        pl.col("mean_contribution").sum(), pl.col("mean_change").first()
    )
    np.testing.assert_allclose(check["mean_contribution"], check["mean_change"], atol=1e-4)
    components = pl.read_parquet(paths["erasure_components"])
    erased = features.filter(pl.col("role") == "erased").group_by("block", "feature")
    lowered = (
        erased.agg(pl.col("mean_contribution").min() < 0)
        .group_by("block")
        .agg(pl.col("mean_contribution").sum().alias("n"))
    )
    per_block = components.group_by("block").agg(pl.col("main_eraser").sum())
    joined = per_block.join(lowered, on="block")
    assert joined["main_eraser"].to_list() == joined["n"].to_list()  # one main eraser each
    for key in ("erasure_plot", "gradual_plot"):
        assert imread(paths[key]).std() > 0
