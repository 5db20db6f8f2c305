"""Synthetic activations: realistic sparsity, determinism, and planted relations that show."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import scipy.stats

from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.sources.synth import SynthConfig, generate, planted_edges, planted_path
from featstore.store.home import open_store
from featstore.store.local import Store

CFG = SynthConfig(
    d_sae=2048, layers=(6, 7, 8), n_tokens=20_000, n_planted=96, seed=3, block_tokens=4096
)
SHARD = "s0"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, pl.DataFrame]:
    store = open_store(tmp_path_factory.mktemp("synth"), create=True)
    return store, generate(store, CFG, SHARD)


def columns(store: Store, layer: int, features: np.ndarray) -> np.ndarray:
    """Dense (tokens x len(features)) activations of some features."""
    return store.read(layer, SHARD).tocsc()[:, features].toarray()


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of x and y."""
    return np.array([np.corrcoef(x[:, i], y[:, i])[0, 1] for i in range(x.shape[1])])


@pytest.mark.parametrize("layer", CFG.layers)
def test_mean_l0_is_near_the_configured_l0(synth, layer):
    store, _ = synth
    per_token = store.read(layer, SHARD).getnnz(axis=1)
    assert per_token.size == CFG.n_tokens
    assert 20 <= per_token.mean() <= 100
    assert abs(per_token.mean() - CFG.l0) < 0.15 * CFG.l0
    assert per_token.std() > 1  # tokens differ in how many features fire


@pytest.mark.parametrize("layer", CFG.layers)
def test_feature_frequencies_are_heavy_tailed(synth, layer):
    store, _ = synth
    freq = np.sort(store.read(layer, SHARD).getnnz(axis=0) / CFG.n_tokens)[::-1]
    top = freq[: CFG.d_sae // 20].sum() / freq.sum()
    assert top > 0.15  # the densest 5% of features fire three times their uniform share
    assert np.quantile(freq, 0.99) > 10 * np.median(freq)


def test_values_are_positive_and_right_skewed(synth):
    store, _ = synth
    values = store.read(7, SHARD).data
    assert values.min() > 0
    assert scipy.stats.skew(values) > 2
    assert np.quantile(values, 0.999) > 5 * np.median(values)


def test_tokens_form_sequences_of_128(synth):
    store, _ = synth
    tokens = store.tokens(SHARD)
    assert tokens.height == CFG.n_tokens
    np.testing.assert_array_equal(tokens["pos"].to_numpy(), np.arange(CFG.n_tokens) % 128)
    np.testing.assert_array_equal(tokens["seq"].to_numpy(), np.arange(CFG.n_tokens) // 128)
    assert tokens["token"].n_unique() > 1000
    assert store.info(6, SHARD)["source"] == "synthetic"


def test_edges_link_successive_layers(synth):
    _, edges = synth
    pairs = edges.select("layer_a", "layer_b").unique().sort("layer_a").rows()
    assert pairs == [(6, 7), (7, 8)]
    assert set(edges["kind"]) == {"copy", "merge", "split"}
    merges = edges.filter(pl.col("kind") == "merge").group_by("layer_b", "feature_b").len()
    assert (merges["len"] == 2).all()
    splits = edges.filter(pl.col("kind") == "split").group_by("layer_a", "feature_a").len()
    assert (splits["len"] == 2).all()
    assert edges.equals(planted_edges(CFG))


def test_strength_is_the_chance_a_parent_token_reaches_the_child(synth):
    store, edges = synth
    for (a, b), group in edges.group_by("layer_a", "layer_b"):
        parent = columns(store, a, group["feature_a"].to_numpy()) > 0
        child = columns(store, b, group["feature_b"].to_numpy()) > 0
        fires = parent.sum(axis=0)
        carried = (parent & child).sum(axis=0) / np.maximum(fires, 1)
        often = fires >= 200  # enough tokens for a binomial error under 0.04
        assert often.sum() > 20
        # Leaks and a merge's other parent add a little on top of the planted strength.
        diff = carried[often] - group["strength"].to_numpy()[often]
        assert np.all(diff > -0.12) and np.all(diff < 0.12), (a, b, diff)


def test_planted_copies_correlate_and_random_pairs_do_not(synth):
    store, edges = synth
    copies = edges.filter((pl.col("kind") == "copy") & (pl.col("strength") >= 0.3))
    assert copies.height > 10
    for (a, b), group in copies.group_by("layer_a", "layer_b"):
        x = columns(store, a, group["feature_a"].to_numpy())
        y = columns(store, b, group["feature_b"].to_numpy())
        assert pearson(x, y).min() > 0.2
    rng = np.random.default_rng(0)
    fa, fb = rng.integers(0, CFG.d_sae, 200), rng.integers(0, CFG.d_sae, 200)
    noise = pearson(columns(store, 6, fa), columns(store, 7, fb))
    assert np.quantile(np.abs(noise), 0.95) < 0.1


def test_pair_stats_finds_planted_copies(synth):
    stats = pytest.importorskip("featstore.stats.query")
    store, edges = synth
    found = stats.pair_stats(store, stats.PairQuery(6, 7, min_pearson=0.2))
    copies = edges.filter(
        (pl.col("layer_a") == 6) & (pl.col("kind") == "copy") & (pl.col("strength") >= 0.3)
    )
    x = columns(store, 6, copies["feature_a"].to_numpy())
    y = columns(store, 7, copies["feature_b"].to_numpy())
    hits = copies.join(found, on=["feature_a", "feature_b"], how="left")
    assert hits.height == copies.height
    missing = hits.filter(pl.col("pearson").is_null())
    assert missing.height == 0, missing
    np.testing.assert_allclose(hits["pearson"].to_numpy(), pearson(x, y), rtol=1e-3)


def small(seed: int = 1) -> SynthConfig:
    return SynthConfig(
        d_sae=256, layers=(0, 1), n_tokens=1500, n_planted=8, l0=20, block_tokens=512, seed=seed
    )


def written(
    tmp_path, name: str, cfg: SynthConfig, shard: str = "a"
) -> tuple[sp.csr_matrix, pl.DataFrame]:
    """All layers of one generated shard stacked, and its token table."""
    store = open_store(tmp_path / name, create=True)
    generate(store, cfg, shard)
    stacked = sp.vstack([store.read(layer, shard) for layer in cfg.layers]).tocsr()
    return stacked, store.tokens(shard)


def test_same_seed_gives_the_same_store(tmp_path):
    (m1, t1), (m2, t2) = written(tmp_path, "one", small()), written(tmp_path, "two", small())
    assert (m1 != m2).nnz == 0 and m1.nnz > 0
    assert t1.equals(t2)


@pytest.mark.parametrize(
    "change",
    [pytest.param({"cfg": small(seed=2)}, id="seed"), pytest.param({"shard": "b"}, id="shard")],
)
def test_seed_and_shard_change_the_data(tmp_path, change):
    m1, _ = written(tmp_path, "one", small())
    m2, _ = written(tmp_path, "two", change.get("cfg", small()), change.get("shard", "a"))
    assert (m1 != m2).nnz > 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_sae", 4),
        ("layers", ()),
        ("layers", (7, 6)),
        ("n_tokens", 0),
        ("l0", 0),
        ("l0", 10_000),
        ("n_planted", 10_000),
        ("min_strength", 0.0),
        ("kind_weights", (0, 0, 0)),
        ("seed", -1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(FeatstoreError, match="synth config"):
        dataclasses.replace(SynthConfig(d_sae=256, n_planted=8, l0=20), **{field: value})


def test_cli_writes_shards_and_planted_edges(tmp_path, capsys):
    home = tmp_path / "home"
    argv = ["--home", str(home), "synth", "--tokens", "700", "--layers", "2", "3", "--d-sae", "256"]
    argv += ["--shards", "2", "--planted", "8", "--l0", "20", "--seed", "5"]
    assert main(argv) == 0
    store = open_store(home)
    assert store.token_shards() == ["synth-000", "synth-001"]
    assert store.shards(3) == ["synth-000", "synth-001"]
    assert store.info(2, "synth-001")["shape"] == [700, 256]
    cfg = SynthConfig(d_sae=256, layers=(2, 3), n_tokens=700, n_planted=8, l0=20, seed=5)
    assert pl.read_parquet(planted_path(home)).equals(planted_edges(cfg))
    assert "planted edges" in capsys.readouterr().out


def test_cli_rejects_zero_shards(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "synth", "--tokens", "10", "--shards", "0"]) == 2
    assert "--shards: expected a positive integer, got 0" in capsys.readouterr().err
