"""The store at an S3 URL (moto's server on loopback): what a local store reads, commits that are
all-or-nothing, and writers that never write the same object."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import correlated_layers

from featstore import FeatstoreError, open_store
from featstore.sources.extract import token_table
from featstore.stats.query import PairQuery, pair_stats
from featstore.stats.shardsums import update_shard_pairs
from featstore.store import spec
from featstore.store.check import check_store
from featstore.store.url import UrlStore


def random_csr(n: int = 400, d: int = 48, seed: int = 0) -> sp.csr_matrix:
    m = sp.random(n, d, density=0.08, format="csr", dtype=np.float32, random_state=seed)
    m.data = np.abs(m.data) + 0.01
    return m


def generations(s3, path: str) -> set[str]:
    """The `_gen-*` prefixes stored under a group."""
    prefix = f"store.zarr/{path}/"
    return {
        k[len(prefix) :].split("/")[0]
        for k in s3.keys(prefix)
        if k[len(prefix) :].startswith(spec.GENERATION_PREFIX)
    }


def test_round_trip_replace_and_delete_as_another_machine_sees_them(s3, tmp_path):
    store = open_store(tmp_path / "writer", create=True, url=s3.url())
    assert isinstance(store, UrlStore)
    m0, m1, m2 = random_csr(seed=0), random_csr(300, seed=1), random_csr(seed=2)
    store.write_activations(6, "s0", m0)
    store.write_activations(6, "s1", m1)
    store.write_tokens("s0", token_table(np.arange(400, dtype=np.int32).reshape(4, 100)))
    store.write_tokens("s1", token_table(np.zeros((3, 100), np.int32)))
    store.write_vocab(["a", "bé", ""])

    reader = open_store(tmp_path / "reader", url=s3.url())  # another machine: own home and locks
    assert (reader.layers(), reader.shards(6)) == ([6], ["s0", "s1"])
    assert reader.token_shards() == ["s0", "s1"]
    np.testing.assert_array_equal(reader.read(6, "s0").toarray(), m0.toarray())
    np.testing.assert_array_equal(reader.read(6, "s1", 50, 120).toarray(), m1[50:120].toarray())
    stats = reader.feature_stats(6, "s0")
    np.testing.assert_allclose(stats.total, m0.toarray().astype(np.float64).sum(axis=0))
    np.testing.assert_array_equal(stats.count, (m0.toarray() > 0).sum(axis=0))
    assert reader.tokens("s0")["token"].to_list() == list(range(400))
    assert reader.vocab() == ["a", "bé", ""]
    assert check_store(reader) == []

    for _ in range(3):
        store.write_activations(6, "s0", m2)
    np.testing.assert_array_equal(reader.read(6, "s0").toarray(), m2.toarray())
    assert len(generations(s3, spec.activation_path(6, "s0"))) == 4  # all begun just now
    store.stale_after = -1.0  # as if hours had passed: superseded generations go
    store.write_activations(6, "s0", m0)
    assert len(generations(s3, spec.activation_path(6, "s0"))) == 2  # current and previous
    np.testing.assert_array_equal(reader.read(6, "s0").toarray(), m0.toarray())

    assert store.delete_shard("s1") == [spec.activation_path(6, "s1"), spec.tokens_path("s1")]
    assert reader.shards(6) == ["s0"]
    assert s3.keys(f"store.zarr/{spec.activation_path(6, 's1')}/") == []
    assert not (tmp_path / "writer" / spec.ROOT).exists()  # the home keeps no Zarr data


def test_url_from_the_environment(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(spec.STORE_URL_ENV, s3.url("env/store.zarr"))
    open_store(tmp_path, create=True).write_activations(7, "s0", random_csr())
    assert "env/store.zarr/zarr.json" in s3.keys("env/")
    assert open_store(tmp_path).shards(7) == ["s0"]


def test_failed_write_keeps_the_old_version_and_leaves_no_objects(s3, tmp_path):
    store = open_store(tmp_path, create=True, url=s3.url())
    m0, m1 = random_csr(seed=0), random_csr(seed=1)
    store.write_activations(6, "s0", m0)
    before = s3.keys()
    with pytest.raises(RuntimeError, match="killed"):
        with store.activation_writer(6, "s0", m1.shape[1]) as writer:
            writer.append(m1[:200])
            raise RuntimeError("killed mid-write")
    bad = m1.copy()
    bad.data[3] = np.nan
    with pytest.raises(FeatstoreError, match="NaN"):
        store.write_activations(6, "s0", bad)
    np.testing.assert_array_equal(store.read(6, "s0").toarray(), m0.toarray())
    assert s3.keys() == before


def test_two_machines_writing_the_same_group_never_share_an_object(s3, tmp_path):
    """Each writer has its own generation; the last commit wins whole, never a mix."""
    first = open_store(tmp_path / "a", create=True, url=s3.url())
    second = open_store(tmp_path / "b", url=s3.url())  # its locks do not see the first's
    m_first, m_second = random_csr(seed=3), random_csr(seed=4)
    path = spec.activation_path(8, "s0")
    with first.activation_writer(8, "s0", 48) as slow:
        slow.append(m_first[:150])
        (mine,) = generations(s3, path)
        second.write_activations(8, "s0", m_second)  # starts later, commits first
        (theirs,) = generations(s3, path) - {mine}
        np.testing.assert_array_equal(first.read(8, "s0").toarray(), m_second.toarray())
        slow.append(m_first[150:])
    prefix = f"store.zarr/{path}/"
    tops = [k[len(prefix) :].split("/")[0] for k in s3.keys(prefix)]
    assert sorted(set(tops)) == sorted({theirs, mine, "zarr.json"})  # nothing outside them
    for generation in (theirs, mine):  # each wrote a whole group of its own
        assert f"{generation}/data/zarr.json" in {k[len(prefix) :] for k in s3.keys(prefix)}
    np.testing.assert_array_equal(second.read(8, "s0").toarray(), m_first.toarray())


def test_statistics_from_s3_equal_a_local_store(s3, tmp_path):
    local = open_store(tmp_path / "local", create=True)
    remote = open_store(tmp_path / "remote", create=True, url=s3.url())
    for i, shard in enumerate(("s0", "s1")):
        for layer, x in correlated_layers((6, 7), n_tokens=200, d=16, seed=i).items():
            for store in (local, remote):
                store.write_activations(layer, shard, sp.csr_matrix(x.astype(np.float32)))
    for store in (local, remote):
        for shard in ("s0", "s1"):
            update_shard_pairs(store, 6, 7, shard)
    assert any("pairs/6-7/s1/" in k for k in s3.keys())
    frames = [
        pair_stats(store, PairQuery(6, 7)).sort("feature_a", "feature_b")
        for store in (local, remote)
    ]
    assert frames[0].height > 0
    assert frames[0].equals(frames[1])
    assert pl.read_parquet(tmp_path / "remote" / "pair_stats" / "6-7.parquet").height > 0


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("s3://featstore-no-such-bucket/store.zarr", None, "no featstore store at s3://"),
        ("nosuchproto://x/store.zarr", None, "cannot open store nosuchproto://x/store.zarr"),
        ("s3://featstore-no-such-bucket/store.zarr", "{not json", "FEATSTORE_STORAGE_OPTIONS"),
    ],
)
def test_bad_url_or_options_give_one_line_errors(s3, tmp_path, monkeypatch, url, options, message):
    if options is not None:
        monkeypatch.setenv(spec.STORAGE_OPTIONS_ENV, options)
    with pytest.raises(FeatstoreError, match=message) as err:
        open_store(tmp_path, url=url)
    assert "\n" not in str(err.value)


def test_creating_in_a_missing_bucket_is_one_line_error(s3, tmp_path):
    with pytest.raises(FeatstoreError, match="cannot open store s3://featstore-no-such") as err:
        open_store(tmp_path, create=True, url="s3://featstore-no-such-bucket/store.zarr")
    assert "\n" not in str(err.value)


def test_cli_with_store_url(s3, tmp_path, capsys):
    from featstore.cli import main

    sp.save_npz(tmp_path / "acts.npz", random_csr())
    where = ["--home", str(tmp_path / "home"), "--store-url", s3.url("cli/store.zarr")]
    ingest = ["ingest", str(tmp_path / "acts.npz"), "--layer", "6", "--shard", "s0"]
    assert main([*where, *ingest]) == 0
    assert main([*where, "info"]) == 0
    assert "layer 6 shard s0: 400 tokens" in capsys.readouterr().out
    assert any(k.startswith("cli/store.zarr/activations/layer_6/s0/") for k in s3.keys("cli/"))
    assert main(["--home", str(tmp_path / "home"), "--store-url", "s3://featstore-none/x", "info"])
    assert "no featstore store at s3://featstore-none/x" in capsys.readouterr().err
