"""Pass-through chains, gates, vanishing features and convergence, each recovering structure
planted in synthetic activations; best partners and decoder survival against numpy."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.analysis import convergence, gates, passthrough, vanishing
from featstore.errors import FeatstoreError
from featstore.sources.synth import SynthConfig, generate, planted_structures, shard_names
from featstore.stats import best, shardsums
from featstore.stats.best import best_partners
from featstore.store.home import open_store

CFG = SynthConfig(
    d_sae=512, layers=(6, 7, 8, 9), n_tokens=5000, n_planted=32, l0=20, block_tokens=2500,
    seed=1, n_chains=4, n_gates=3, n_vanishing=6,
)  # fmt: skip
SHARDS = shard_names(4)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("planted"), create=True)
    for shard in SHARDS:
        generate(store, CFG, shard)
    return store, planted_structures(CFG)


def links_of(frame: pl.DataFrame) -> set[tuple[int, int, int, int]]:
    return set(frame.select("layer_a", "feature_a", "layer_b", "feature_b").iter_rows())


def test_pass_through_finds_exactly_the_planted_chains(planted):
    store, structures = planted
    links = passthrough.pass_through_links(store, CFG.layers)
    assert links_of(links) == links_of(structures.filter(pl.col("kind") == "pass"))
    assert (links["pearson"] >= 0.95).all()
    chains = passthrough.chains(links)
    assert chains["chain"].n_unique() == CFG.n_chains and (chains["length"] == 4).all()


def test_pass_through_flow_figure_and_tables(planted, tmp_path):
    store, _ = planted
    paths = passthrough.run_pass_through(store, CFG.layers, tmp_path)
    flow = pl.read_parquet(paths["pass_through_flow"])
    assert flow["passes_on"].to_list() == [4, 4, 4, 0]
    assert paths["pass_through_plot"].stat().st_size > 1000


@pytest.mark.parametrize("kind", ["and", "or"])
def test_gates_are_exactly_the_planted_ones(planted, kind):
    store, structures = planted
    found = gates.gates(gates.all_parent_sets(store, CFG.layers)).filter(pl.col("kind") == kind)
    want = (
        structures.filter(pl.col("kind") == kind)
        .group_by("layer_a", "layer_b", "feature_b")
        .agg(
            pl.col("feature_a").min().alias("parent_1"), pl.col("feature_a").max().alias("parent_2")
        )
    )
    key = ["layer_a", "layer_b", "feature_b", "parent_1", "parent_2"]
    assert set(found.select(key).iter_rows()) == set(want.select(key).iter_rows())
    assert found.height == CFG.n_gates * 3


def test_vanishing_features_have_no_good_successor(planted):
    store, structures = planted
    for a, b in ((6, 7), (7, 8), (8, 9)):
        best = vanishing.best_successor(store, a, b)
        gone = set(vanishing.vanishing(best)["feature"])
        mine = structures.filter((pl.col("layer_a") == a) & (pl.col("kind") == "vanishing"))
        assert set(mine["feature_a"]) <= gone
        passing = structures.filter((pl.col("layer_a") == a) & (pl.col("kind") == "pass"))
        assert not set(passing["feature_a"]) & gone  # their copy needs them: necessity 1


@pytest.mark.parametrize("measure", ["pearson", "necessity", "cosine"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_best_partners_match_dense_numpy(tmp_path, measure, side):
    x, y = sparse_acts(200, 12, 0.3, 0), sparse_acts(200, 9, 0.3, 1)
    store = build_store(tmp_path / "h", {6: {"s": x}, 7: {"s": y}})
    xd, yd = x.toarray().astype(np.float64), y.toarray().astype(np.float64)
    ref = {
        "pearson": np.corrcoef(xd.T, yd.T)[:12, 12:],
        "necessity": ((xd > 0).T.astype(int) @ (yd > 0)) / (yd > 0).sum(0),
        "cosine": (xd.T @ yd) / np.sqrt(np.outer((xd**2).sum(0), (yd**2).sum(0))),
    }[measure]
    both = ((xd > 0).T @ (yd > 0).astype(int)) >= 2
    ref = np.where(both, ref, -np.inf)
    ref = ref if side == "a" else ref.T
    got = best_partners(store, 6, 7, measure, side=side, min_both=2)
    has = np.flatnonzero(np.isfinite(ref).any(1))
    np.testing.assert_array_equal(got["feature"].to_numpy(), has)
    np.testing.assert_allclose(got["value"].to_numpy(), ref[has].max(1), rtol=1e-9)
    np.testing.assert_array_equal(got["partner"].to_numpy(), ref[has].argmax(1))


def test_survival_is_the_share_of_the_direction_left_in_the_error():
    rng = np.random.default_rng(0)
    n, d, tokens = 6, 16, 300
    w_dec = np.linalg.qr(rng.normal(size=(d, d)))[0][:n] * rng.uniform(0.5, 2.0, (n, 1))
    codes = sparse_acts(tokens, n, 0.3, 2).toarray().astype(np.float64)
    kept = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.25])  # share of each direction left unexplained
    errors = (codes * kept) @ w_dec
    got = vanishing.survival(sp.csr_matrix(codes), w_dec, errors)
    np.testing.assert_allclose(got, kept, atol=1e-9)
    unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    ref = [
        (errors[codes[:, i] > 0] @ unit[i]).sum() / (codes[:, i].sum() * np.linalg.norm(w_dec[i]))
        for i in range(n)
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def _dense(store, layer, shards):
    return sp.vstack([store.read(layer, s) for s in shards]).toarray().astype(np.float64)


def test_convergence_counts_every_prefix_in_one_pass_like_numpy(planted, monkeypatch):
    store, _ = planted
    passes = []
    stacked = best.stacked_matrices
    monkeypatch.setattr(best, "stacked_matrices", lambda *a: passes.append(a) or stacked(*a))
    monkeypatch.setattr(shardsums, "update_shard_pairs", None)  # no saved sums: no pair state
    thresholds = {"jaccard": 0.3, "pearson": 0.4, "necessity": 0.8}
    frame = convergence.convergence(store, 6, 7, thresholds=thresholds, min_both=2)
    assert len(passes) == 1  # one pass over the shards for every fraction and measure
    assert frame.filter(pl.col("measure") == "jaccard")["shards"].to_list() == [1, 2, 4]
    assert frame["token_share"].to_list()[:3] == [0.25, 0.5, 1.0]

    def values(n_shards):
        xa, xb = _dense(store, 6, SHARDS[:n_shards]), _dense(store, 7, SHARDS[:n_shards])
        both = (xa > 0).T @ (xb > 0).astype(np.float64)  # BLAS: exact counts
        ca, cb = (xa > 0).sum(0), (xb > 0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {
                "jaccard": both / (ca[:, None] + cb[None, :] - both),
                "pearson": np.corrcoef(xa.T, xb.T)[: xa.shape[1], xa.shape[1] :],
                "necessity": both / cb[None, :],
            }
        return {m: np.where(both >= 2, v, np.nan) for m, v in out.items()}

    full = values(4)
    for n_shards in (1, 2, 4):
        part = values(n_shards)
        for measure, threshold in thresholds.items():
            row = frame.filter((pl.col("measure") == measure) & (pl.col("shards") == n_shards))
            row = row.row(0, named=True)
            with np.errstate(invalid="ignore"):
                here, there = part[measure] >= threshold, full[measure] >= threshold
            both = here & there
            assert row["pairs_above"] == here.sum() > 0
            assert row["stable"] == pytest.approx(both.sum() / here.sum())
            assert row["recovered"] == pytest.approx(both.sum() / there.sum())
            change = np.abs(part[measure] - full[measure])[both].mean()
            assert row["mean_abs_change"] == pytest.approx(change, rel=1e-6, abs=1e-12)
    last = frame.filter(pl.col("shards") == 4)
    assert (last["recovered"] == 1.0).all() and (last["mean_abs_change"] == 0.0).all()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"thresholds": {"pmi": 1.0}}, "not 'pmi'"), ({"thresholds": {"jaccard": 2.0}}, "[0.0, 1.0]"),
     ({"fractions": [0.0, 1.0]}, "fractions"), ({"shards": ["nope"]}, "nope")],
)  # fmt: skip
def test_convergence_refuses_bad_arguments_in_one_line(planted, kwargs, words):
    store, _ = planted
    with pytest.raises(FeatstoreError, match=re.escape(words)):
        convergence.convergence(store, 6, 7, **kwargs)


def test_convergence_figure_is_written(planted, tmp_path):
    store, _ = planted
    paths = convergence.run_convergence(store, (6, 7), tmp_path, thresholds={"pearson": 0.5})
    assert pl.read_parquet(paths["convergence"]).height == 3
    assert paths["convergence_plot"].stat().st_size > 1000


@pytest.mark.parametrize("measure", ["pearson", "cosine", "necessity", "sufficiency"])
def test_compiled_best_partners_equal_the_scan_of_every_pair(planted, monkeypatch, measure):
    store, _ = planted
    fast = {side: best_partners(store, 6, 7, measure, side=side, min_both=3) for side in "ab"}
    monkeypatch.setattr(best, "COMPILED", ())  # the general path: every co-active pair finished
    for side in "ab":
        slow = best_partners(store, 6, 7, measure, side=side, min_both=3)
        assert fast[side].height > 100
        assert fast[side].equals(slow)


@pytest.mark.parametrize(("null", "least", "min_both"), [(False, 0.6, 3), (True, 0.1, 2)])
def test_parent_sets_from_one_pass_equal_two_threshold_queries(planted, null, least, min_both):
    from featstore.stats.query import PairQuery, pair_stats

    store, _ = planted
    variant = shardsums.Variant(null=True) if null else None
    got = gates.parent_sets(store, 6, 7, threshold=least, min_both=min_both, variant=variant)
    for kind, measure in gates.KIND_MEASURE.items():
        q = PairQuery(6, 7, thresholds={measure: least}, min_both=min_both, variant=variant,
                      save=False)  # fmt: skip
        want = pair_stats(store, q).group_by("feature_b").agg(pl.col("feature_a").sort())
        mine = got.filter(pl.col("kind") == kind)
        assert mine.height > 5
        assert dict(zip(mine["feature_b"], mine["parents"].to_list(), strict=True)) == dict(
            zip(want["feature_b"], want["feature_a"].to_list(), strict=True)
        )
