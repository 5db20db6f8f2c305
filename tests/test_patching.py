"""Activation patching: effects equal plain transformer_lens hooks; batching changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch
from helpers import model_store, one_torch_thread, random_model, random_saes, random_tokens

from featstore.analysis.causal import CausalConfig, causal_edge_frame, compare, run_causal
from featstore.analysis.patching import PatchConfig, attribution_sums, effect_sums
from featstore.cli import main
from featstore.sources.extract import encode_batch
from featstore.stats.query import pair_stats
from featstore.store import spec

DEAD = 5  # a feature of layer 6 that never fires


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@pytest.fixture(scope="module")
def setup():
    model = random_model()
    tokens = random_tokens(n_seq=6, seq_len=12)
    saes = random_saes(model, tokens)
    with torch.no_grad():
        saes[6] = copy.deepcopy(saes[6])
        saes[6].b_enc[DEAD] = -1e4
    codes = encode_batch(model, {6: saes[6]}, {6: name(6)}, torch.as_tensor(tokens))[6]
    return model, saes, tokens, codes


def reference(model, saes, tokens, layer, target, feature, value=0.0):
    """Patch with our own hook over the whole batch; mean effect, off/on counts, tokens."""
    sae, seen = saes[layer], {}

    def hook(resid, hook):
        a = sae.encode(resid)[..., feature]
        active = a > 0
        active[:, 0] = False
        seen["mask"] = active
        return resid + torch.where(active, value - a, 0.0)[..., None] * sae.W_dec[feature]

    x = torch.as_tensor(tokens)
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=name(target))
        patched = model.run_with_hooks(
            x,
            fwd_hooks=[(name(layer), hook), (name(target), lambda r, hook: seen.update(p=r))],
        )
        del patched
        before = saes[target].encode(clean[name(target)])
        after = saes[target].encode(seen["p"])
    m = seen["mask"]
    diff = (after - before)[m]
    off = ((before > 0) & (after <= 0))[m].sum(0)
    on = ((before <= 0) & (after > 0))[m].sum(0)
    return diff.mean(0).numpy(), off.numpy(), on.numpy(), int(m.sum())


@pytest.mark.parametrize("value", [pytest.param(0.0, id="ablate"), pytest.param(2.5, id="clamp")])
def test_one_patch_equals_a_plain_hook_computation(setup, value):
    model, saes, tokens, codes = setup
    cfg = PatchConfig(layer=6, targets=(7, 9), features=(3, 11), value=value, batch_rows=5)
    sums = effect_sums(model, saes, tokens, codes, cfg)
    for target in (7, 9):
        for row, feature in enumerate((3, 11)):
            mean, off, on, n = reference(model, saes, tokens, 6, target, feature, value)
            s = sums[target]
            assert s.n_tokens[row] == n > 0
            np.testing.assert_allclose(s.effect[row] / n, mean, atol=1e-5)
            np.testing.assert_array_equal(s.n_off[row], off)
            np.testing.assert_array_equal(s.n_on[row], on)


def test_a_feature_that_never_fires_changes_nothing(setup):
    model, saes, tokens, codes = setup
    assert codes[:, DEAD].nnz == 0
    both = effect_sums(model, saes, tokens, codes, PatchConfig(6, (8,), features=(DEAD, 3)))[8]
    alone = effect_sums(model, saes, tokens, codes, PatchConfig(6, (8,), features=(3,)))[8]
    assert both.n_tokens[0] == 0
    for name_ in ("effect", "total", "clean", "n_clean_on", "n_off", "n_on"):
        assert not getattr(both, name_)[0].any()
        np.testing.assert_array_equal(getattr(both, name_)[1], getattr(alone, name_)[0])
    # and the model run from layer 6 with its residual untouched reproduces the clean codes
    mean, off, on, n = reference(model, saes, tokens, 6, 8, DEAD)
    assert n == 0 and not off.any() and not on.any()


def test_many_features_per_pass_equal_each_alone(setup):
    model, saes, tokens, codes = setup
    features = (0, 3, 7, 40)
    together = effect_sums(model, saes, tokens, codes, PatchConfig(6, (7, 8), features, 0.0, 64))
    for row, feature in enumerate(features):
        alone = effect_sums(model, saes, tokens, codes, PatchConfig(6, (7, 8), (feature,)))
        for t in (7, 8):
            assert together[t].n_tokens[row] == alone[t].n_tokens[0]
            np.testing.assert_allclose(together[t].effect[row], alone[t].effect[0], atol=1e-5)
            np.testing.assert_allclose(together[t].total[row], alone[t].total[0], atol=1e-5)
            np.testing.assert_array_equal(together[t].n_off[row], alone[t].n_off[0])


def test_attribution_is_the_directional_derivative_of_the_patch(setup):
    model, saes, tokens, codes = setup
    feature, target = 11, 9
    cfg = PatchConfig(6, (target,), features=(feature,))
    est = attribution_sums(model, saes, tokens, codes, cfg, batch_sequences=4, chunk=16)[target]
    x = torch.as_tensor(tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=name(6))
    resid = cache[name(6)]
    a = torch.as_tensor(codes[:, feature].toarray().reshape(tokens.shape), dtype=torch.float32)
    a[:, 0] = 0
    tangent = (-a)[..., None] * saes[6].W_dec[feature].detach()

    def downstream(r):
        out = model(r, start_at_layer=6, stop_at_layer=target)
        return saes[target].encode(out)[:, 1:].sum((0, 1))

    _, jvp = torch.autograd.functional.jvp(downstream, resid, tangent)
    np.testing.assert_allclose(est.total[0], jvp.numpy(), rtol=1e-3, atol=1e-4)
    assert est.n_tokens[0] == int((a > 0).sum())


# -- from a store ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_run(setup, tmp_path_factory):
    model, saes, tokens, _ = setup
    store = model_store(tmp_path_factory.mktemp("causal"), model, saes, random_tokens(8, 12, 1))
    for a, b in ((6, 7), (7, 8), (8, 9)):
        pair_stats(store, a, b)  # writes pair_stats/{a}-{b}.parquet: the correlation graph
    cfg = CausalConfig(max_sequences=4, min_effect=0.2, min_tokens=3, min_pearson=0.1)
    return store, model, saes, cfg


def test_comparison_counts_equal_set_arithmetic(store_run):
    store, model, saes, cfg = store_run
    frame = causal_edge_frame(store, model, saes, cfg)
    assert frame["exact"].all() and frame.height > 0
    corr = {}
    for a, b in ((6, 7), (7, 8), (8, 9)):
        stats = pl.read_parquet(store.home / "pair_stats" / f"{a}-{b}.parquet")
        corr[(a, b)] = stats.filter(pl.col("pearson") >= cfg.min_pearson).select(
            pl.col("feature_a", "feature_b").cast(pl.Int64), "pearson"
        )
    table = compare(frame, corr, cfg)
    assert table.height == 6  # every pair of layers 6-9
    for a, b in corr:
        rows = frame.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).to_dicts()
        causal = {
            (r["feature_a"], r["feature_b"])
            for r in rows
            if r["relative_effect"] is not None
            and abs(r["relative_effect"]) >= cfg.min_effect
            and r["n_tokens"] >= cfg.min_tokens
        }
        edges = set(corr[(a, b)].select("feature_a", "feature_b").iter_rows())
        got = table.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b)).row(0, named=True)
        assert got["causal_edges"] == len(causal)
        assert got["correlation_edges_causal"] == len(edges & causal)
        assert got["causal_edges_missed"] == len(causal - edges)
    assert (
        table.filter(pl.col("layer_b") - pl.col("layer_a") > 1)["correlation_edges"].is_null().all()
    )


def test_run_writes_a_table_sql_can_read(store_run, capsys):
    store, model, saes, cfg = store_run
    small = CausalConfig(layers=(6, 8), max_sequences=4, n_exact=3, min_pearson=0.1)
    paths = run_causal(store, model, saes, small)
    saved = pl.read_parquet(paths["edges"])
    assert saved.filter(pl.col("exact"))["feature_a"].n_unique() == 3  # the strongest 3 only
    assert saved.filter(~pl.col("exact"))["mean_effect"].is_null().all()
    for key in ("comparison_plot", "attribution_plot"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    query = "SELECT count(*) AS n FROM causal_edges"
    assert main(["--home", str(store.home), "sql", query, "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", str(saved.height)]


def test_cli_patch_reports_a_missing_model_in_one_line(store_run, capsys, monkeypatch):
    monkeypatch.setattr("featstore.sources.registry.EMBEDDED", store_run[0].home / "nowhere")
    rc = main(["--home", str(store_run[0].home), "patch", "--layers", "6", "7"])
    assert rc == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_causal_assets_materialise(store_run, monkeypatch):
    import dagster as dg

    from featstore.analysis.graph import GRAPHML, build_graph, store_pair_frames, write_graphml
    from pipelines.assets import causal as assets
    from pipelines.resources import FeatstoreResource

    store, model, saes, _ = store_run
    frames = store_pair_frames(store, [6, 7], metric="pearson", threshold=0.1)
    write_graphml(build_graph(frames, "pearson", 0.1), store.home / spec.GRAPH_DIR / GRAPHML)
    monkeypatch.setattr(assets, "load_model_and_saes", lambda cfg: (model, saes))
    resource = FeatstoreResource(home=str(store.home), layers=[6, 7])
    result = dg.materialize(
        assets.causal_assets,
        resources={"featstore": resource},
        run_config={
            "ops": {
                "causal_edges": {"config": {"max_sequences": 3, "n_exact": 4}},
                "concept_traces": {"config": {"max_sequences": 3}},
                "erasure": {"config": {"max_sequences": 3}},
            }
        },
    )
    assert result.success
    for name in ("causal_edges", "concept_traces", "erasure"):
        (event,) = result.asset_materializations_for_node(name)
        assert event.metadata


def test_cli_patch_prints_the_comparison(store_run, capsys, monkeypatch):
    store, model, saes, _ = store_run
    monkeypatch.setattr("featstore.cli.load_model_and_saes", lambda *args: (model, saes))
    argv = ["--home", str(store.home), "patch", "--layers", "6", "7", "--max-sequences", "2"]
    assert main([*argv, "--min-pearson", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "correlation_edges_causal" in out and "causal_edges.parquet" in out
