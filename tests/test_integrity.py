"""A store you can trust, tried as an attacker would (issue 13), one section per class:
crafted bookkeeping (class 1), corrupt data (3), a shard as one unit (2), names and numbers (4)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import yaml
import zarr
from helpers import assert_one_line_error, build_store, cli, group_states, sparse_acts, token_frame
from hypothesis import given, settings
from hypothesis import strategies as st

from featstore.errors import FeatstoreError
from featstore.stats.shardsums import load_shard_pairs, update_shard_pairs
from featstore.store import spec
from featstore.store.check import check_store
from featstore.store.home import open_store


def outside_tree(base: Path) -> dict[str, bytes]:
    """A victim folder next to the store with a file in it; returns what it holds."""
    victim = base / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious.txt").write_text("keep me")
    (victim / "zarr.json").write_text("{}")  # looks like a parked group
    return tree(victim)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def small_home(tmp_path):
    home = tmp_path / "home"
    acts = {layer: {"s0": sparse_acts(40, 16, seed=layer)} for layer in (6, 7)}
    build_store(home, acts)
    return home


# -- class 1: recovery never touches anything outside the home -------------------------------------


def crafted_entries(root: Path, victim: Path) -> None:
    """`_trash` and `_staging` entries whose recorded group points at `victim`, every way."""
    outside = os.path.relpath(victim, root)
    for folder in (spec.TRASH, spec.STAGING):
        (root / folder).mkdir(exist_ok=True)
        for i, target in enumerate((str(victim), outside, "activations/../../victim")):
            marked = root / folder / f"{i}"
            marked.mkdir()
            (marked / "zarr.json").write_text("{}")
            (marked / ".target").write_text(target)
            named = root / folder / f"{i}abc.{urllib.parse.quote(target, safe='')}"
            named.mkdir()
            (named / "zarr.json").write_text("{}")
        # A marker that is a symlink to the victim's file, and an entry that is a symlink.
        (root / folder / "link").symlink_to(victim, target_is_directory=True)


@pytest.mark.parametrize("command", [("sql", "select 1"), ("check",), ("info",)])
def test_crafted_bookkeeping_never_moves_or_deletes_outside(tmp_path, small_home, capsys, command):
    before = outside_tree(tmp_path)
    victim = tmp_path / "victim"
    root = small_home / spec.ROOT
    crafted_entries(root, victim)
    # The victim's own parent, then the store's group folder: a restore would land outside.
    status, _, err = cli(capsys, small_home, *command)
    assert tree(victim) == before
    assert (tmp_path / "victim").is_dir() and not (tmp_path / "victim.0").exists()
    assert status == 0, err


def test_symlinked_trash_is_not_walked(tmp_path, small_home):
    before = outside_tree(tmp_path)
    root = small_home / spec.ROOT
    (root / spec.STAGING).rmdir()
    (root / spec.TRASH).symlink_to(tmp_path / "victim", target_is_directory=True)
    (root / spec.STAGING).symlink_to(tmp_path / "victim", target_is_directory=True)
    store = open_store(small_home)
    assert tree(tmp_path / "victim") == before
    with pytest.raises(FeatstoreError, match="not a folder of this store"):
        store.write_activations(6, "s0", sparse_acts(40, 16))
    assert tree(tmp_path / "victim") == before


def test_restore_into_symlinked_folder_is_refused(tmp_path, small_home):
    outside_tree(tmp_path)
    root = small_home / spec.ROOT
    (root / "evil").symlink_to(tmp_path / "victim", target_is_directory=True)
    parked = root / spec.TRASH / "x"
    parked.mkdir(parents=True)
    (parked / "zarr.json").write_text("{}")
    (parked / ".target").write_text("evil/moved")
    open_store(small_home)
    assert not (tmp_path / "victim" / "moved").exists()


def test_genuine_crash_between_renames_still_recovers(small_home):
    store = open_store(small_home)
    expected = store.read(6, "s0").toarray()
    path = spec.activation_path(6, "s0")
    parked = store.root_path / spec.TRASH / f"abc.{urllib.parse.quote(path, safe='')}"
    parked.parent.mkdir(parents=True, exist_ok=True)
    os.rename(store.root_path / path, parked)
    np.testing.assert_array_equal(open_store(small_home).read(6, "s0").toarray(), expected)


def test_odd_folder_names_are_not_shards(small_home, capsys):
    layer = small_home / spec.ROOT / spec.layer_group(6)
    for name in ("bad\nname", "zarr.json.d", "layer_x"):
        (layer / name).mkdir()
        (layer / name / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (small_home / spec.ROOT / spec.ACTIVATIONS / "layer_x").mkdir()
    store = open_store(small_home)
    assert store.layers() == [6, 7]
    assert "bad\nname" not in store.shards(6)


def test_zarr_json_is_no_shard_name(tmp_path, capsys):
    npz = tmp_path / "m.npz"
    sp.save_npz(npz, sparse_acts(5, 4))
    for bad in ("zarr.json", "ZARR.JSON", "s0\n", "../x", ""):
        status, _, err = cli(capsys, tmp_path / "h", "ingest", str(npz), "--layer", "6",
                             "--shard", bad)  # fmt: skip
        assert_one_line_error(status, err, "shard")


# -- class 3: corrupt data is detected where it is read --------------------------------------------


def featstore_process(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The featstore command in a child process (a segfault shows as a negative status)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "featstore.cli", "--home", str(home), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def delete_chunks(home: Path, path: str, array: str) -> None:
    for chunk in (home / spec.ROOT / path / array).rglob("c/*"):
        chunk.unlink()


def overwrite(home: Path, path: str, array: str, index: int, value) -> None:
    """Change one stored value behind featstore's back (what its writers refuse)."""
    zarr.open_array(home / spec.ROOT / path / array, mode="r+")[index] = value


def flip_byte(home: Path, path: str, array: str) -> None:
    chunk = next((home / spec.ROOT / path / array).rglob("c/*"))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside blosc's payload: only the checksum notices
    chunk.write_bytes(bytes(raw))


def repeat_an_id(home: Path, path: str) -> None:
    """A token's row with one feature id twice (in range and valid otherwise): the kernels
    would count that token twice for the feature's pairs."""
    indptr = zarr.open_array(home / spec.ROOT / path / "indptr")[:]
    row = int(np.flatnonzero(np.diff(indptr) >= 2)[0])
    first = int(indptr[row])
    ids = zarr.open_array(home / spec.ROOT / path / "indices", mode="r+")
    ids[first + 1] = ids[first]


CORRUPTIONS = {
    "deleted data": (lambda h: delete_chunks(h, "activations/layer_6/s0", "data"), "data"),
    "deleted indices": (lambda h: delete_chunks(h, "activations/layer_6/s0", "indices"),
                        "indices"),
    "deleted indptr": (lambda h: delete_chunks(h, "activations/layer_6/s0", "indptr"), "indptr"),
    "deleted tokens": (lambda h: delete_chunks(h, "tokens/s0", "token"), "token"),
    "flipped data": (lambda h: flip_byte(h, "activations/layer_6/s0", "data"), "data"),
    "indices out of range": (lambda h: overwrite(h, "activations/layer_6/s0", "indices", 3,
                                                 10**6), "feature ids out of range"),
    "negative index": (lambda h: overwrite(h, "activations/layer_6/s0", "indices", 0, -7),
                       "feature ids out of range"),
    "indptr not monotone": (lambda h: overwrite(h, "activations/layer_6/s0", "indptr", 5, 10**9),
                            "indptr"),
    "repeated feature id": (lambda h: repeat_an_id(h, "activations/layer_6/s0"),
                            "feature ids repeated"),
}  # fmt: skip


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_damaged_data_is_refused_by_every_reader_never_read_as_zeros(small_home, capsys, damage):
    hurt, word = CORRUPTIONS[damage]
    hurt(small_home)
    commands = [
        ("feature", "6:1"),
        ("sql", "select sum(value), count(*), sum(token) from activations"),
    ]
    if "token" not in damage:  # the statistics never read the token table
        commands.append(("stats", "--layer-a", "6", "--layer-b", "7", "--out",
                         str(small_home / "p.parquet")))  # fmt: skip
    for command in commands:
        status, _, err = cli(capsys, small_home, *command)
        assert_one_line_error(status, err, word, "s0")
    status, out, _ = cli(capsys, small_home, "check")
    assert status == 1 and "s0" in out, out


@pytest.mark.parametrize("damage", ["indices out of range", "indptr not monotone"])
def test_out_of_range_csr_never_segfaults(small_home, damage):
    CORRUPTIONS[damage][0](small_home)
    done = featstore_process(small_home, "feature", "6:1")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_garbage_pair_stats_parquet_fails_check(small_home, capsys):
    folder = small_home / spec.PAIR_STATS_DIR
    folder.mkdir()
    (folder / "6-7.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    status, out, _ = cli(capsys, small_home, "check")
    assert status == 1 and "pair_stats/6-7.parquet" in out, out


# -- class 2: a shard is one unit across layers ----------------------------------------------------

SYNTH = "from featstore.sources.synth import SynthConfig\nCFG = SynthConfig(d_sae=64, layers=(6, 7), n_tokens=1500, l0=5.0, n_planted=8, seed={seed})\n"  # noqa: E501
KILLER = SYNTH + """
import json, os, shutil, signal, sys
from featstore.sources.synth import generate
from featstore.store.home import open_store
before, root = sys.argv[1], sys.argv[2]
statuses = []
while True:  # one child a rename of the replace, killed at it, then a child with no kill
    k = len(statuses) + 1
    home = os.path.join(root, f"run{{k}}")
    shutil.copytree(before, home)
    pid = os.fork()  # the imports above are paid once, not once a kill
    if pid == 0:
        store = open_store(home)
        count = [0]
        def killing(real):
            def move(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            return move
        os.rename, os.replace = killing(os.rename), killing(os.replace)  # the commit record too
        generate(store, CFG, "synth-000")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    statuses.append(status)
    if status == 0:
        break
print(json.dumps(statuses))
"""


def synth_home(home: Path, *seeds: int) -> dict:
    from featstore.sources.synth import SynthConfig, generate

    store = open_store(home, create=True)
    for seed in seeds:
        cfg = SynthConfig(d_sae=64, layers=(6, 7), n_tokens=1500, l0=5.0, n_planted=8, seed=seed)
        generate(store, cfg, "synth-000")
    return group_states(home)


@pytest.mark.slow
def test_a_killed_replace_of_a_shard_leaves_it_whole_old_or_whole_new(tmp_path):
    before = synth_home(tmp_path / "before", 0)
    after = synth_home(tmp_path / "after", 0, 1)
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER.format(seed=1), str(tmp_path / "before"),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    statuses = json.loads(done.stdout)
    # every child but the last was killed at its rename (a SIGKILL status), the last finished
    assert len(statuses) > 2 and statuses[-1] == 0, statuses
    assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in statuses[:-1])
    seen = set()
    for k in range(1, len(statuses) + 1):
        home = tmp_path / f"run{k}"
        store = open_store(home)  # recovers
        state = group_states(home)
        assert state in (before, after), f"kill at rename {k}: a mixed shard"
        assert check_store(store) == []
        seen.add(state == after)
    assert seen == {False, True}, "no kill fell on either side of the commit"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_operation_leaves_every_group_of_the_shard_as_it_was(tmp_path, request, where):
    url = request.getfixturevalue("s3").url() if where == "s3" else None
    store = open_store(tmp_path / "home", create=True, url=url)
    m6, m7 = sparse_acts(40, 16, seed=1), sparse_acts(40, 16, seed=2)
    with store.transaction():
        store.write_tokens("s0", token_frame(40))
        store.write_activations(6, "s0", m6)
        store.write_activations(7, "s0", m7)
    with pytest.raises(RuntimeError), store.transaction():
        store.write_tokens("s0", token_frame(20, seed=5))
        store.write_activations(6, "s0", sparse_acts(20, 16, seed=3))
        raise RuntimeError("the model failed to load")  # e.g. --device cuda without CUDA
    again = open_store(tmp_path / "home", url=url)
    assert again.tokens("s0").equals(store.tokens("s0")) and again.tokens("s0").height == 40
    np.testing.assert_array_equal(again.read(7, "s0").toarray(), m7.toarray())
    np.testing.assert_array_equal(again.read(6, "s0").toarray(), m6.toarray())
    assert check_store(again) == []


def test_commit_record_is_rolled_forward_at_a_url(tmp_path, s3, monkeypatch):
    from featstore.store.url import UrlStore

    store = open_store(tmp_path / "home", create=True, url=s3.url())
    store.write_tokens("s0", token_frame(40))
    store.write_activations(6, "s0", sparse_acts(40, 16, seed=1))
    new6, new_tokens = sparse_acts(30, 16, seed=4), token_frame(30, seed=4)
    applied = []

    def die_after_first(self, entries):  # a writer killed after its commit point
        self._commit(*entries[0])
        applied.append(entries[0][0])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(UrlStore, "_apply", die_after_first)
        with pytest.raises(KeyboardInterrupt), store.transaction():
            store.write_activations(6, "s0", new6)
            store.write_tokens("s0", new_tokens)
    again = open_store(tmp_path / "home", url=s3.url())
    assert again.tokens("s0").equals(new_tokens.cast(again.tokens("s0").schema))
    np.testing.assert_array_equal(again.read(6, "s0").toarray(), new6.toarray())
    assert applied and not [k for k in s3.keys() if spec.COMMITS in k]


def test_a_new_token_table_takes_the_layers_it_leaves_out_of_line_with_it(small_home):
    store = open_store(small_home)
    with store.transaction():  # e.g. extract --layers 6 with another --seq-len
        store.write_tokens("s0", token_frame(30, seed=9))
        store.write_activations(6, "s0", sparse_acts(30, 16, seed=9))
    assert store.shards(7) == [] and store.tokens("s0").height == 30
    assert check_store(store) == []
    relabelled = store.tokens("s0").with_columns(token=pl.lit(-1, pl.Int32))
    store.write_tokens("s0", relabelled)  # the same rows, other token ids: layer 6 stays
    assert store.shards(6) == ["s0"]
    # A layer of other tokens, put there behind featstore's back, is reported.
    meta = small_home / spec.ROOT / spec.activation_path(6, "s0") / "zarr.json"
    meta.write_text(meta.read_text().replace(store.rows_hash("s0"), "0" * 32))
    assert any("out of line" in p for p in check_store(open_store(small_home)))


# -- class 4: names and numbers are validated where they enter -------------------------------------


def test_layers_counts_and_paths_are_refused_at_the_command_line(small_home, tmp_path, capsys):
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    (tmp_path / "target.txt").write_text("keep")
    link.symlink_to(tmp_path / "target.txt")
    stats = ("stats", "--layer-a", "6", "--layer-b", "7", "--out")
    for args, word in [
        (("ingest", "x.npz", "--layer", "2147483648", "--shard", "s9"), "layer"),
        (("ingest", "x.npz", "--layer", "-1", "--shard", "s9"), "layer"),
        (("stats", "--layer-a", "6", "--layer-b", "nan", "--out", "o.parquet"), "layer"),
        (("feature", "6:1", "--top", "0"), "--top"),
        ((*stats, ""), "--out"),
        ((*stats, str(fifo)), "not a regular file"),
        ((*stats, str(link)), "not a regular file"),
    ]:
        status, _, err = cli(capsys, small_home, *args)
        assert_one_line_error(status, err, word)
    assert fifo.is_fifo() and link.is_symlink() and (tmp_path / "target.txt").read_text() == "keep"
    status, _, err = cli(capsys, tmp_path / "target.txt", "info")  # a home that is a file
    assert_one_line_error(status, err, "not a folder")


def npz_file(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_hostile_matrices_and_token_tables_are_refused_before_anything_is_written(tmp_path, capsys):
    home = tmp_path / "new-home"
    huge = npz_file(tmp_path / "huge.npz", format=b"coo", shape=np.array([10**12, 10**6]),
                    row=np.array([0]), col=np.array([0]), data=np.array([1.0]))  # fmt: skip
    bad_csr = npz_file(tmp_path / "csr.npz", format=b"csr", shape=np.array([2, 4]),
                       indptr=np.array([0, 1, 2]), indices=np.array([1, 99]),
                       data=np.array([1.0, 2.0]))  # fmt: skip
    good = tmp_path / "good.npz"
    sp.save_npz(good, sparse_acts(4, 8))
    tables = {
        "nan": pl.DataFrame({"seq": [0.0, 0, 1, 1], "pos": [0, 1, 0, 1],
                             "token": [1.0, float("nan"), 2, 3]}),  # fmt: skip
        "wide": pl.DataFrame({"seq": [0, 0, 1, 1], "pos": [0, 1, 0, 1],
                              "token": [1, 2**31, 2, 3]}),  # fmt: skip
    }
    cases = [((huge,), "token rows"), ((bad_csr,), "malformed CSR")]
    for name, table in tables.items():
        table.write_parquet(tmp_path / f"{name}.parquet")
        cases.append(((str(good), "--tokens", str(tmp_path / f"{name}.parquet")), "column"))
    for args, word in cases:
        status, _, err = cli(capsys, home, "ingest", *args, "--layer", "6", "--shard", "s0")
        assert_one_line_error(status, err, word)
        assert not home.exists(), "a failed ingest into a new home left something"


def test_an_orphan_token_table_is_reported_and_does_not_block_a_retry(tmp_path, capsys):
    home = tmp_path / "home"
    store = open_store(home, create=True)
    store.write_tokens("s0", token_frame(4))  # what a killed ingest left before spec version 3
    assert any("orphan" in p for p in check_store(store))
    good, tokens = tmp_path / "good.npz", tmp_path / "t.parquet"
    sp.save_npz(good, sparse_acts(6, 8))
    token_frame(6, seed=3).write_parquet(tokens)
    status, _, err = cli(capsys, home, "ingest", str(good), "--layer", "6", "--shard", "s0",
                         "--tokens", str(tokens))  # fmt: skip
    assert status == 0, err
    assert open_store(home).tokens("s0").height == 6 and check_store(open_store(home)) == []


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "x" * 65])
def test_concept_names_that_would_leave_the_output_folder_are_refused(tmp_path, name):
    from featstore.analysis.concepts import load_concepts

    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump({"concepts": {name: {"token": "x"}}}))
    with pytest.raises(FeatstoreError, match="bad concept name"):
        load_concepts(path)


# -- property: whatever a store holds, readers refuse it in one line or read it soundly -----------

ARRAYS = ("data", "indices", "indptr", "feature_count")
ODD_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True)
)
ODD_ATTRS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=5),
    st.lists(st.integers(-5, 10**12), max_size=3),
)  # fmt: skip


def pristine(tmp: Path) -> Path:
    """Two layers of a shard, its token table, a vocabulary and the shard's pair sums of 6-7."""
    home = tmp / "home"
    acts = {6: {"s0": sparse_acts(30, 12, seed=6)}, 7: {"s0": sparse_acts(30, 12)}}
    store = build_store(home, acts, vocab=["a", "caf\u00e9", "\n", "", "\u00fcber"] * 4)
    update_shard_pairs(store, 6, 7, "s0")
    return home


def assert_refused_or_sound(home: Path) -> None:
    """Every reader either raises FeatstoreError or gives values the spec allows."""
    try:
        store = open_store(home)
        for layer in store.layers():
            for shard in store.shards(layer):
                m = store.read(layer, shard)
                d = store.info(layer, shard)[spec.SHAPE][1]
                assert m.nnz == 0 or (m.indices.min() >= 0 and m.indices.max() < d)
                assert m.nnz == 0 or (np.isfinite(m.data).all() and m.data.min() > 0)
                assert np.all(np.diff(m.indptr) >= 0)
                assert m.has_canonical_format  # ids rise strictly within each token's row
        for shard in store.token_shards():
            t = store.tokens(shard)
            assert t["seq"].min() >= 0 and t["pos"].min() >= 0 and t["token"].min() >= -1
        words = store.vocab()
        assert words is None or all(isinstance(w, str) for w in words)
        pairs = load_shard_pairs(store, 6, 7, "s0") if 7 in store.layers() else None
        if pairs is not None:  # fresh sums: ids in range, counts >= 1, sums finite >= 0
            assert np.all((pairs.feature_a >= 0) & (pairs.feature_a < pairs.d_a))
            assert np.all((pairs.feature_b >= 0) & (pairs.feature_b < pairs.d_b))
            assert np.all(pairs.n_both >= 1) and np.all(np.isfinite(pairs.sum_xy))
            assert np.all(pairs.sum_xy >= 0)
    except FeatstoreError:
        pass
    check_store(open_store(home)) if (home / spec.ROOT / "zarr.json").exists() else None


# Every array of every kind of group: activations, token table, vocabulary, pair sums.
GROUP_ARRAYS = [("activations/layer_6/s0", a) for a in ARRAYS] + [
    ("tokens/s0", a) for a in ("seq", "pos", "token")
] + [("vocab", a) for a in ("bytes", "offsets")] + [
    ("pairs/6-7/s0", a) for a in ("feature_a", "feature_b", "n_both", "sum_xy", "indptr")
]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(where=st.sampled_from(GROUP_ARRAYS), index=st.integers(0, 40), value=ODD_VALUES)
def test_any_stored_value_is_refused_or_sound(tmp_path_factory, where, index, value):
    home = pristine(tmp_path_factory.mktemp("h"))
    group, array = where
    target = zarr.open_array(home / spec.ROOT / group / array, mode="r+")
    with contextlib.suppress(ValueError, OverflowError, TypeError):
        target[min(index, target.shape[0] - 1)] = value
    assert_refused_or_sound(home)


PAIR_ATTRS = ["layers", "n_tokens", "d_a", "d_b", "nnz_a", "nnz_b", "sum_a", "sum_b"]
COMMIT_ATTRS = st.one_of(
    ODD_ATTRS,
    st.fixed_dictionaries({"id": ODD_ATTRS}),
    st.fixed_dictionaries({"id": st.integers(0, 2**62), "after": st.dictionaries(
        st.sampled_from(["tokens/s0", "activations/layer_7/s0", "vocab"]), ODD_ATTRS, max_size=2)}),
)  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    where=st.one_of(
        st.tuples(st.sampled_from(["activations/layer_6/s0", "tokens/s0"]),
                  st.sampled_from([spec.SHAPE, "nnz", "d_sae", spec.ENCODING_VERSION, "n_tokens"])),
        st.tuples(st.just("pairs/6-7/s0"), st.sampled_from([*PAIR_ATTRS, spec.ENCODING_TYPE])),
        st.tuples(st.just("vocab"), st.sampled_from([spec.ENCODING_TYPE, spec.ENCODING_VERSION])),
    ),
    value=ODD_ATTRS,
)  # fmt: skip
def test_any_stored_attribute_is_refused_or_sound(tmp_path_factory, where, value):
    group, key = where
    _set_attribute(tmp_path_factory, group, key, value)


@settings(max_examples=12, deadline=None)
@given(group=st.sampled_from(["activations/layer_6/s0", "tokens/s0", "pairs/6-7/s0"]),
       value=COMMIT_ATTRS)
def test_any_commit_attribute_is_refused_or_sound(tmp_path_factory, group, value):
    """A crafted `featstore-commit`: refused in one line, or read (a commit that requires what
    is not there makes readers give up after their tries, quickly here)."""
    from featstore.store import snapshot

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snapshot, "TRIES", 3)
        _set_attribute(tmp_path_factory, group, snapshot.COMMIT, value)


def _set_attribute(tmp_path_factory, group: str, key: str, value) -> None:
    home = pristine(tmp_path_factory.mktemp("h"))
    meta = home / spec.ROOT / group / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][key] = value
    meta.write_text(json.dumps(doc))
    assert_refused_or_sound(home)


@settings(max_examples=12, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=20).filter(
    lambda n: "/" not in n and "\0" not in n and n not in (".", "..")), max_size=4))
def test_any_folder_name_in_a_store_is_skipped_or_a_valid_shard(tmp_path_factory, names):
    home = pristine(tmp_path_factory.mktemp("h"))
    for name in names:
        folder = home / spec.ROOT / spec.layer_group(6) / name
        with contextlib.suppress(OSError):
            folder.mkdir()
            (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    store = open_store(home)
    assert all(spec.name_ok(s) for s in store.shards(6))
    assert_refused_or_sound(home)
