"""Nothing is lost under faults: kill -9 mid-step, writers at once, a full disk, damaged files.

Kills and pauses happen in real child processes: this file run as a script is the `featstore`
command with a fault installed from $FEATSTORE_TEST_FAULT, `ACTION:POINT:K[:WHERE]` where
ACTION is `kill` (SIGKILL itself) or `pause` (touch `paused` in $FEATSTORE_TEST_FAULT_DIR and
wait for `go` there) and POINT is where, counted from 1: `append` (after the K-th array block
appended to a staged group whose path holds WHERE), `park` (after the K-th replaced group is
moved to `_trash`, i.e. between the two renames of a replace) or `parquet` (after the K-th row
group of a merged Parquet file).
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import zarr
from helpers import (
    assert_one_line_error,
    build_store,
    cli,
    file_snapshot,
    group_states,
    one_torch_thread,
    sparse_acts,
)

from featstore.cli import main
from featstore.sources.registry import EMBEDDED
from featstore.stats.shardsums import update_shard_pairs
from featstore.store import spec
from featstore.store.check import check_store
from featstore.store.home import open_store
from featstore.store.local import GroupWriter

FAULT = "FEATSTORE_TEST_FAULT"
FAULT_DIR = "FEATSTORE_TEST_FAULT_DIR"
PAIR_FILE = Path(spec.PAIR_STATS_DIR) / "6-7.parquet"


# -- the child: the featstore command with a fault -------------------------------------------------


def install_fault(fault: str, folder: Path) -> None:
    """Make the K-th passage through POINT kill or pause this process (see the module doc)."""
    action, point, k, where = (fault + ":").split(":")[:4]
    passages = itertools.count(1)

    def strike() -> None:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        (folder / "paused").touch()
        deadline = time.monotonic() + 120
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def after(fn, counts=lambda *args: True):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if counts(*args) and next(passages) == int(k):
                strike()
            return out

        return wrapped

    if point == "append":
        GroupWriter.append = after(GroupWriter.append, lambda writer, *_: where in writer.path)
    elif point == "park":
        os.rename = after(os.rename, lambda src, dst: spec.TRASH in Path(dst).parts)
    elif point == "parquet":
        import pyarrow.parquet as pq

        pq.ParquetWriter.write_table = after(pq.ParquetWriter.write_table)
    else:
        raise ValueError(f"unknown fault point {point!r}")


def child(home: Path, *args: str, fault: str | None = None, folder: Path | None = None):
    """`featstore --home HOME ARGS` in a new process, with `fault` installed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT, None)
    if fault is not None:
        folder = folder or home.parent / "fault"
        folder.mkdir(parents=True, exist_ok=True)
        env.update({FAULT: fault, FAULT_DIR: str(folder)})
    return subprocess.Popen(
        [sys.executable, __file__, "--home", str(home), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_paused(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / "paused").exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended before its pause point: {finish(proc)}")
        assert time.monotonic() < deadline, "child never reached its pause point"
        time.sleep(0.02)


def release(folder: Path) -> None:
    (folder / "go").touch()


# -- a small synthetic store ----------------------------------------------------------------------


SHARDS = ("s0", "s1")


def synthetic_store(home: Path, seed: int = 0):
    """Layers 6 and 7, shards s0 and s1 (300 tokens, 48 features each)."""
    acts = {
        layer: {s: sparse_acts(300, 48, 0.1, seed + 10 * layer + i) for i, s in enumerate(SHARDS)}
        for layer in (6, 7)
    }
    return build_store(home, acts)


# With the shard sums kept (a cache, off by default): their writes are attacked too.
STATS = ("stats", "--layer-a", "6", "--layer-b", "7", "--keep-shard-sums")


def assert_between(home: Path, before: dict, after: dict) -> None:
    """Every group reads as it was before the step or as the uninterrupted step left it."""
    for path, state in group_states(home).items():
        assert state in (before.get(path), after.get(path)), f"{path} is neither before nor after"
    for path in set(before) & set(after):
        assert path in group_states(home), f"{path} vanished"


def pair_file_state(home: Path) -> bytes | None:
    path = home / PAIR_FILE
    return path.read_bytes() if path.exists() else None


# -- kill -9 in the middle of a statistics step ---------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "stale"),
    [
        pytest.param("kill:append:2:pairs/6-7/s1", False, id="saving-pairs-of-the-second-shard"),
        pytest.param("kill:park:1", True, id="between-the-renames-replacing-stale-pairs"),
        pytest.param("kill:parquet:1", False, id="writing-the-merged-parquet"),
    ],
)
def test_killed_statistics_step_leaves_before_or_after_and_rerun_completes(
    tmp_path, capsys, fault, stale
):
    home, reference = tmp_path / "home", tmp_path / "reference"
    store = synthetic_store(home)
    if stale:  # saved sums of every shard, then new activations of s1 make its sums stale
        assert cli(capsys, home, *STATS, "--out", str(tmp_path / "first.parquet"))[0] == 0
        store.write_activations(7, "s1", sparse_acts(300, 48, 0.1, seed=99))
    before, pairs_before = group_states(home), pair_file_state(home)
    shutil.copytree(home, reference)
    assert cli(capsys, reference, *STATS, "--out", str(tmp_path / "ref.parquet"))[0] == 0
    after, pairs_after = group_states(reference), pair_file_state(reference)
    assert after != before

    proc = child(home, *STATS, "--out", str(tmp_path / "killed.parquet"), fault=fault)
    assert finish(proc)[0] == -signal.SIGKILL  # the fault point was reached

    store = open_store(home)  # what any later featstore process does first
    assert_between(home, before, after)
    assert pair_file_state(home) in (pairs_before, pairs_after)
    assert check_store(store) == []
    assert not any((home / spec.ROOT / spec.TRASH).glob("*"))
    assert not any((home / spec.ROOT / spec.STAGING).glob("*"))  # the dead writer's staging
    temporary = list((home / spec.PAIR_STATS_DIR).glob(".*.tmp"))
    assert bool(temporary) == fault.startswith("kill:parquet")
    # A half-written Parquet file is never read: the SQL table holds the complete file's rows.
    merged = home / PAIR_FILE
    want = pl.read_parquet(merged).height if merged.exists() else 0
    rc, out, _ = cli(capsys, home, "sql", "SELECT count(*) AS n FROM pair_stats", "--format", "csv")
    assert rc == 0 and out.split() == ["n", str(want)]

    rc, _, err = cli(capsys, home, *STATS, "--out", str(tmp_path / "rerun.parquet"))
    assert rc == 0, err
    assert not list((home / spec.PAIR_STATS_DIR).glob(".*.tmp"))  # the rerun removed it
    assert group_states(home) == after
    rerun, ref = (pl.read_parquet(tmp_path / f) for f in ("rerun.parquet", "ref.parquet"))
    assert rerun.equals(ref)
    assert pl.read_parquet(home / PAIR_FILE).equals(pl.read_parquet(reference / PAIR_FILE))


# -- kill -9 in the middle of an extraction -------------------------------------------------------

TINY_MODEL = EMBEDDED / "tiny" / "model" / "config.json"
needs_tiny = pytest.mark.skipif(
    not TINY_MODEL.exists(), reason=f"the embedded tiny model is not trained yet ({TINY_MODEL})"
)
EXTRACT = ("extract", "--layers", "6", "7", "--max-sequences", "4", "--batch-size", "2")


def extract_in_process(capsys, home: Path, shard: str) -> None:
    with one_torch_thread():
        rc, _, err = cli(capsys, home, *EXTRACT, "--shards", shard)
    assert rc == 0, err


@pytest.fixture(scope="module")
def tiny_shard() -> str:
    from featstore.sources.extract import ExtractConfig, list_shards

    return list_shards(ExtractConfig())[0]


@needs_tiny
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "replace"),
    [
        pytest.param("kill:append:3:layer_7", False, id="after-some-blocks-of-a-first-extraction"),
        # Renames to _trash: 1 the token table, 2 and 3 the two layers (vocab is kept).
        pytest.param("kill:park:3", True, id="between-the-renames-replacing-the-second-layer"),
    ],
)
def test_killed_extraction_leaves_before_or_after_and_rerun_matches(
    tmp_path, capsys, tiny_shard, fault, replace
):
    home, reference = tmp_path / "home", tmp_path / "reference"
    extract_in_process(capsys, reference, tiny_shard)
    after = group_states(reference)
    if replace:  # the same tokens, other activations: the extraction replaces both layers
        shutil.copytree(reference, home)
        store = open_store(home)
        for layer in (6, 7):
            n, d = store.info(layer, tiny_shard)[spec.SHAPE]
            store.write_activations(layer, tiny_shard, sparse_acts(n, d, 0.01, seed=layer))
    else:
        open_store(home, create=True)
    before = group_states(home)

    proc = child(home, *EXTRACT, "--shards", tiny_shard, fault=fault)
    assert finish(proc, timeout=300)[0] == -signal.SIGKILL

    store = open_store(home)
    assert_between(home, before, after)
    assert check_store(store) == []
    assert not any((home / spec.ROOT / spec.TRASH).glob("*"))
    assert not any((home / spec.ROOT / spec.STAGING).glob("*"))

    extract_in_process(capsys, home, tiny_shard)
    assert group_states(home) == after


# -- writers at once ------------------------------------------------------------------------------


def save_npz(path: Path, matrix: sp.spmatrix) -> str:
    sp.save_npz(path, sp.csr_matrix(matrix))
    return str(path)


def test_writers_of_different_shards_at_once_both_land_whole(tmp_path):
    home = tmp_path / "home"
    synthetic_store(home)
    mats = {s: sparse_acts(200, 48, 0.2, seed=i) for i, s in enumerate(("new-a", "new-b"))}
    procs = {}
    for s, m in mats.items():
        args = ("ingest", save_npz(tmp_path / f"{s}.npz", m), "--layer", "6", "--shard", s)
        procs[s] = child(home, *args, fault="pause:append:2:activations", folder=tmp_path / s)
    for s, proc in procs.items():  # both are now in the middle of writing their shard
        wait_paused(proc, tmp_path / s)
    for s in procs:
        release(tmp_path / s)
    for proc in procs.values():
        rc, _, err = finish(proc)
        assert rc == 0, err
    store = open_store(home)
    for s, m in mats.items():
        assert (store.read(6, s) != m).nnz == 0
        assert store.tokens(s).height == 200
    assert check_store(store) == []


@pytest.mark.parametrize(
    ("first", "fault", "lock"),
    [
        pytest.param(
            "ingest", "pause:append:2:activations", "activations__layer_6__s0", id="activations"
        ),
        pytest.param("stats", "pause:append:1:pairs/6-7/s0", "pairs__6-7__s0", id="pair-sums"),
        pytest.param("stats", "pause:parquet:1", "pair_stats__6-7", id="merged-parquet"),
    ],
)
def test_second_writer_of_the_same_data_fails_clearly_and_the_first_lands(
    tmp_path, capsys, first, fault, lock
):
    home, reference = tmp_path / "home", tmp_path / "reference"
    synthetic_store(home)
    shutil.copytree(home, reference)
    if first == "ingest":
        ingest = ("ingest", "--layer", "6", "--shard", "s0")
        args = (*ingest, save_npz(tmp_path / "new.npz", sparse_acts(300, 48, 0.3, seed=5)))
        other = (*ingest, save_npz(tmp_path / "other.npz", sparse_acts(300, 48, seed=6)))
    else:
        args = (*STATS, "--out", str(tmp_path / "first.parquet"))
        other = (*STATS, "--out", str(tmp_path / "second.parquet"))
    assert cli(capsys, reference, *args)[0] == 0

    proc = child(home, *args, fault=fault, folder=tmp_path / "first")
    wait_paused(proc, tmp_path / "first")
    rc, _, err = cli(capsys, home, *other)  # the second writer: this process
    assert_one_line_error(rc, err, "being written by another process", lock)
    release(tmp_path / "first")
    rc, _, err = finish(proc)
    assert rc == 0, err
    assert group_states(home) == group_states(reference)
    assert pair_file_state(home) == pair_file_state(reference)


def test_opening_the_store_while_a_writer_is_between_its_renames_does_not_undo_it(tmp_path):
    home = tmp_path / "home"
    synthetic_store(home)
    new = sparse_acts(300, 48, 0.3, seed=5)
    args = ("ingest", save_npz(tmp_path / "new.npz", new), "--layer", "6", "--shard", "s0")
    proc = child(home, *args, fault="pause:park:1", folder=tmp_path / "writer")
    wait_paused(proc, tmp_path / "writer")
    # The old group sits in _trash, the new one not yet in place: a crash looks the same, but
    # this writer is alive and holds the lock, so recovery must leave its work alone.
    assert not (home / spec.ROOT / spec.activation_path(6, "s0")).exists()
    open_store(home)
    release(tmp_path / "writer")
    rc, _, err = finish(proc)
    assert rc == 0, err
    assert (open_store(home).read(6, "s0") != new).nnz == 0


# -- a full disk ----------------------------------------------------------------------------------


def store_file_writes(monkeypatch, write) -> None:
    """Every file write of the store's Zarr hierarchy, zarr's own (`_put`) and featstore's
    direct chunk and metadata writes (`chunks._write_file`), goes through `write(original,
    path, *args)`."""
    import zarr.storage._local as local

    from featstore.store import chunks

    for module, name in ((local, "_put"), (chunks, "_write_file")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, functools.partial(write, original))


def full_disk_after(monkeypatch, n_writes: int) -> list[int]:
    """The store's file writes fail with ENOSPC from the `n_writes`-th on (counted from 0)."""
    seen = []

    def write_or_fail(original, *args, **kwargs):
        seen.append(1)
        if len(seen) > n_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    store_file_writes(monkeypatch, write_or_fail)
    return seen


def count_writes(monkeypatch, capsys, home: Path, *args: str) -> int:
    """How many zarr file writes the command makes on a copy of `home`."""
    copy = home.parent / "count"
    shutil.copytree(home, copy)
    with monkeypatch.context() as m:
        seen = full_disk_after(m, 10**9)
        assert cli(capsys, copy, *args)[0] == 0
    shutil.rmtree(copy)
    return len(seen)


def test_full_disk_at_any_write_of_an_ingest_leaves_the_store_unchanged(
    tmp_path, monkeypatch, capsys
):
    home = tmp_path / "home"
    build_store(home, {6: {"s0": sparse_acts(300, 48)}})
    args = ("ingest", save_npz(tmp_path / "m.npz", sparse_acts(300, 48)), "--layer", "8",
            "--shard", "s2")  # fmt: skip
    total = count_writes(monkeypatch, capsys, home, *args)
    assert total > 5
    before = file_snapshot(home)
    for n in range(total):
        with monkeypatch.context() as m:
            full_disk_after(m, n)
            rc, _, err = cli(capsys, home, *args)
        assert_one_line_error(rc, err, "No space left on device")
        assert file_snapshot(home) == before, f"store changed by a full disk at write {n}"


def test_full_disk_while_other_writes_still_run_leaves_no_trace(tmp_path, monkeypatch, capsys):
    """zarr wrote an array's metadata and its parent group's at once (featstore now writes
    them in turn): when one fails, no other write may land in the staging folder after its
    removal."""
    home = tmp_path / "home"
    build_store(home, {6: {"s0": sparse_acts(300, 48)}})
    before = file_snapshot(home)

    def slow_group_failing_array(original, path, *args, **kwargs):
        if spec.STAGING in Path(path).parts and path.name == "zarr.json":
            if path.parent.name == "seq":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            time.sleep(0.3)
        return original(path, *args, **kwargs)

    store_file_writes(monkeypatch, slow_group_failing_array)
    npz = save_npz(tmp_path / "m.npz", sparse_acts(300, 48))
    rc, _, err = cli(capsys, home, "ingest", npz, "--layer", "8", "--shard", "s2")
    assert_one_line_error(rc, err, "No space left on device", "tokens/s2")
    time.sleep(0.5)  # time for a straggling write to land
    assert file_snapshot(home) == before


def test_full_disk_while_replacing_keeps_the_old_version(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    store = synthetic_store(home)
    old = store.read(6, "s0")
    before = file_snapshot(home)
    rename = os.rename

    def no_space_for_staged(src, dst, *args, **kwargs):
        if spec.STAGING in Path(src).parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", no_space_for_staged)
    new = save_npz(tmp_path / "m.npz", sparse_acts(300, 48, seed=3))
    rc, _, err = cli(capsys, home, "ingest", new, "--layer", "6", "--shard", "s0")
    assert_one_line_error(rc, err, "No space left on device", "layer_6/s0")
    monkeypatch.undo()
    assert file_snapshot(home) == before
    assert (open_store(home).read(6, "s0") != old).nnz == 0


@pytest.mark.parametrize("where", ["pair-sums", "merged-parquet"])
def test_full_disk_during_statistics_is_one_line_and_leaves_the_store(
    tmp_path, monkeypatch, capsys, where
):
    home = tmp_path / "home"
    synthetic_store(home)
    out = str(tmp_path / "out.parquet")
    if where == "merged-parquet":  # saved sums are fresh: only the merged file is rewritten
        assert cli(capsys, home, *STATS, "--out", out)[0] == 0
        import pyarrow.parquet as pq

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(pq.ParquetWriter, "write_table", no_space)
    else:
        full_disk_after(monkeypatch, 3)
    before = file_snapshot(home)
    rc, _, err = cli(capsys, home, *STATS, "--out", str(tmp_path / "again.parquet"))
    assert_one_line_error(rc, err, "No space left on device")
    assert file_snapshot(home) == before
    assert not (tmp_path / "again.parquet").exists()


# -- damaged files --------------------------------------------------------------------------------


def damage_chunk(home: Path, path: str, array: str, how: str) -> None:
    chunk = next((home / spec.ROOT / path / array).rglob("c/*"))
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if how == "truncate" else b"not zstd" + data[8:])


def set_attr(home: Path, path: str, **attrs) -> None:
    meta_path = home / spec.ROOT / path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"].update(attrs)
    meta_path.write_text(json.dumps(meta))


def overwrite(home: Path, path: str, array: str, index: int, value) -> None:
    """Change one stored value behind featstore's back (what its writers refuse)."""
    zarr.open_array(home / spec.ROOT / path / array, mode="r+")[index] = value


DAMAGES = {
    # shard: (what is done to it, words its problem line must hold)
    "trunc": (lambda h: damage_chunk(h, "activations/layer_6/trunc", "data", "truncate"),
              ["layer 6 shard trunc", "data"]),
    "garbled": (lambda h: damage_chunk(h, "activations/layer_7/garbled", "indices", "garble"),
                ["layer 7 shard garbled", "indices"]),
    "nometa": (lambda h: (h / spec.ROOT / "activations/layer_6/nometa/indptr/zarr.json").unlink(),
               ["layer 6 shard nometa", "indptr"]),
    "nogroup": (lambda h: (h / spec.ROOT / "activations/layer_7/nogroup/zarr.json").unlink(),
                ["activations/layer_7/nogroup", "zarr.json"]),
    "newer": (lambda h: set_attr(h, "activations/layer_6/newer", **{"encoding-version": "9.0.0"}),
              ["layer 6 shard newer", "9.0.0"]),
    "unsorted": (lambda h: overwrite(h, "activations/layer_6/unsorted", "indptr", 5, 10**6),
                 ["layer 6 shard unsorted", "indptr"]),
    "range": (lambda h: overwrite(h, "activations/layer_7/range", "indices", 0, 48),
              ["layer 7 shard range", "feature ids out of range"]),
    "nan": (lambda h: overwrite(h, "activations/layer_6/nan", "data", 0, np.nan),
            ["layer 6 shard nan", "NaN"]),
    "negative": (lambda h: overwrite(h, "activations/layer_7/negative", "data", 3, -1.0),
                 ["layer 7 shard negative", "negative"]),
    "nnz": (lambda h: set_attr(h, "activations/layer_6/nnz", nnz=1),
            ["layer 6 shard nnz", "nnz"]),
    "shape": (lambda h: set_attr(h, "activations/layer_7/shape", shape=[299, 48]),
              ["layer 7 shard shape", "indptr"]),
    "rows": (lambda h: (h / spec.ROOT / "tokens/rows/zarr.json").unlink(),
             ["layer 6 shard rows", "token table"]),
    "pairbad": (lambda h: overwrite(h, "pairs/6-7/pairbad", "feature_b", 0, 48),
                ["pair sums 6-7 shard pairbad", "feature_b"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """A store with one sound shard and one shard per damage of DAMAGES (tests only read it)."""
    home = tmp_path_factory.mktemp("damaged") / "home"
    acts = {
        layer: {s: sparse_acts(300, 48, 0.1, seed=i) for i, s in enumerate(["sound", *DAMAGES])}
        for layer in (6, 7)
    }
    store = build_store(home, acts)
    for shard in ("sound", "pairbad"):
        update_shard_pairs(store, 6, 7, shard)
    for hurt, _ in DAMAGES.values():
        hurt(home)
    return home


def test_check_reports_every_problem_naming_layer_shard_and_file(damaged, capsys):
    rc, out, err = cli(capsys, damaged, "check")
    assert rc == 1, err
    lines = out.strip().splitlines()
    assert lines[-1] == f"{len(lines) - 1} problem(s) found"
    for shard, (_, words) in DAMAGES.items():
        found = [line for line in lines if shard in line]
        assert any(all(w in line for w in words) for line in found), (shard, found)
    assert not any("sound" in line for line in lines)


@pytest.mark.parametrize("shard", ["trunc", "garbled", "nometa", "newer"])
def test_reading_a_damaged_shard_is_one_line_naming_layer_shard_and_file(damaged, capsys, shard):
    layer = int(DAMAGES[shard][1][0].split()[1])
    query = f"SELECT sum(value) FROM activations WHERE shard = '{shard}' AND layer = {layer}"
    rc, _, err = cli(capsys, damaged, "sql", query)
    assert_one_line_error(rc, err, f"layer {layer} shard {shard}", *DAMAGES[shard][1][1:])


def test_a_store_of_a_newer_spec_is_refused_in_one_line(tmp_path, capsys):
    home = tmp_path / "home"
    synthetic_store(home)
    set_attr(home, "", **{spec.FEATSTORE_VERSION: spec.SPEC_VERSION + 1})
    for args in (("check",), ("info",), ("sql", "SELECT 1")):
        rc, _, err = cli(capsys, home, *args)
        assert_one_line_error(rc, err, "spec version", "upgrade featstore")


def test_a_missing_root_zarr_json_is_one_line(tmp_path, capsys):
    home = tmp_path / "home"
    synthetic_store(home)
    (home / spec.ROOT / "zarr.json").unlink()
    rc, _, err = cli(capsys, home, "check")
    assert_one_line_error(rc, err, "no featstore store", "zarr.json")


if __name__ == "__main__":
    if os.environ.get(FAULT):
        install_fault(os.environ[FAULT], Path(os.environ[FAULT_DIR]))
    sys.exit(main(sys.argv[1:]))
