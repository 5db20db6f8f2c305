"""A shard becomes visible to readers all at once (issue 13, class 2): a writer process replaces a
shard's token table and both its layers in a loop, each version with other contents, while this
process reads them every way featstore reads; no read may combine two versions.

Version v of the shard: token ids all v, every stored activation of layer 6 equal to v and of
layer 7 equal to 1000 + v, and sequences of 8 tokens for even v and of 16 for odd v (so the rows
change too, and a commit also deletes what it leaves out of line). A reader that sees version i of
one group with version j of another has read a mixed state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from featstore.store import snapshot, spec
from featstore.store.home import open_store
from featstore.store.snapshot import Commit, Snapshot, SnapshotChanged, behind

ROWS, D_SAE, SHARD = 96, 12, "s0"

WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np, polars as pl, scipy.sparse as sp
    from featstore.store.home import open_store
    home, url, versions = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    store = open_store(home, url=url, create=True)
    rows, d = {rows}, {d}
    for v in range(2, versions + 2):
        seq_len = 8 if v % 2 == 0 else 16
        table = pl.DataFrame({{"seq": np.arange(rows) // seq_len, "pos": np.arange(rows) % seq_len,
                               "token": np.full(rows, v)}})
        with store.transaction(lock_timeout=60):
            store.write_tokens("{shard}", table)
            for layer, value in ((6, v), (7, 1000 + v)):
                m = sp.csr_matrix((np.full(rows, value, np.float32),
                                   (np.arange(rows), np.arange(rows) % d)), shape=(rows, d))
                store.write_activations(layer, "{shard}", m, lock_timeout=60)
        print(v, flush=True)
        time.sleep(0.02)
    """
).format(rows=ROWS, d=D_SAE, shard=SHARD)


def version_1(home: Path, url: str | None) -> None:
    subprocess.run(
        [sys.executable, "-c", WRITER.replace("range(2, versions + 2)", "range(1, 2)"),
         str(home), url or "", "1"],
        check=True, capture_output=True,
    )  # fmt: skip


def versions_seen(tokens, layer6, layer7) -> tuple[int, int, int]:
    """The version each group is of (each must be whole: one value throughout)."""
    token, seq, pos = (tokens[c].to_numpy() for c in ("token", "seq", "pos"))
    found = []
    for values, offset in ((token, 0), (layer6.data, 0), (layer7.data, 1000)):
        assert values.size and np.all(values == values[0]), "a group of two versions"
        found.append(int(values[0]) - offset)
    seq_len = 8 if found[0] % 2 == 0 else 16
    assert np.array_equal(pos, np.arange(ROWS) % seq_len), "rows of another version"
    assert np.array_equal(seq, np.arange(ROWS) // seq_len)
    assert layer6.shape == layer7.shape == (ROWS, D_SAE)
    return found[0], found[1], found[2]


def race(home: Path, url: str | None, versions: int, readers: dict) -> dict[str, set]:
    """Run the writer for `versions` commits while each reader polls; the versions each saw."""
    version_1(home, url)
    store = open_store(home, url=url)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(home), url or "", str(versions)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: dict[str, set] = {name: set() for name in readers}
    failures: list[BaseException] = []

    def poll(name: str, read) -> None:  # each reader in its own thread, as often as it can
        try:
            while writer.poll() is None:
                seen[name].add(read(store))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=poll, args=item) for item in readers.items()]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        writer.kill() if writer.poll() is None else None
        out, err = writer.communicate()
    if failures:
        raise failures[0]
    assert writer.returncode == 0, err
    assert out.split()[-1] == str(versions + 1)
    for name, read in readers.items():  # the last version, whole
        assert read(store) == (versions + 1,) * 3 or read(store) == versions + 1, name
    return seen


def one_unit(store):
    """Token table and both layers in one unit of reads (`Store.consistently`)."""
    t, a, b = store.consistently(
        lambda: (store.tokens(SHARD), store.read(6, SHARD), store.read(7, SHARD))
    )
    found = versions_seen(t, a, b)
    assert len(set(found)) == 1, f"mixed state {found}"
    return found


def blocks(store):
    """Both layers block by block as the statistics stream them (one shared snapshot; a change
    midway raises SnapshotChanged, and the unit is read again, as `update_shard_pairs` does)."""
    return snapshot.retrying(lambda: _blocks(store))


def _blocks(store):
    snap = Snapshot()
    streams = (store.iter_blocks(layer, SHARD, 16, snap) for layer in (6, 7))
    parts = list(zip(*streams, strict=True))

    a = sp.vstack([p[0][1] for p in parts], format="csr")
    b = sp.vstack([p[1][1] for p in parts], format="csr")
    with store.snapshot(snap):
        t = store.tokens(SHARD)
    found = versions_seen(t, a, b)
    assert len(set(found)) == 1, f"mixed state {found}"
    return found


def one_call(store):
    """A single read call, outside any unit: one version throughout."""
    values = store.read(7, SHARD).data
    assert np.all(values == values[0])
    return int(values[0]) - 1000


def by_sql(store):
    """`featstore sql` over the SQL index: each row's token (from the token table) and value
    (from the layer) of one version, the same for both layers."""
    from featstore.store.sql import query

    rows = query(
        store.home,
        "SELECT layer, min(token), max(token), min(value), max(value), count(*) "
        f"FROM activations WHERE shard = '{SHARD}' GROUP BY layer ORDER BY layer",
    ).rows()
    found = set()
    for layer, t0, t1, v0, v1, n in rows:
        assert t0 == t1 and v0 == v1 and n == ROWS, rows
        found |= {int(t0), int(v0) - (1000 if layer == 7 else 0)}
    assert len(found) == 1 and len(rows) == 2, f"mixed state {rows}"
    return found.pop()


LOCAL_READERS = {"unit": one_unit, "blocks": blocks, "call": one_call, "sql": by_sql}


def test_readers_never_see_a_shard_half_replaced_locally(tmp_path):
    seen = race(tmp_path / "home", None, 30, LOCAL_READERS)
    # The race was real: readers saw several versions come and go, each whole.
    assert len(seen["unit"]) >= 2 and len(seen["call"]) >= 2, seen


@pytest.mark.slow
def test_readers_never_see_a_shard_half_replaced_at_a_url(tmp_path, s3):
    readers = {"unit": one_unit, "blocks": blocks, "call": one_call}
    seen = race(tmp_path / "home", s3.url(), 6, readers)
    assert len(seen["unit"]) >= 2, seen


def test_without_the_checks_the_same_race_shows_mixed_states(tmp_path, monkeypatch):
    """The readers' checks are what keeps them whole: with `behind` and the stamp comparison
    switched off, the same race lets a reader combine versions (else the test above proves
    nothing)."""
    monkeypatch.setattr(snapshot, "behind", lambda *_: False)
    monkeypatch.setattr(Snapshot, "verify", lambda *_: None)
    monkeypatch.setattr(Snapshot, "pin", _pin_without_checks)
    mixed = []

    def unchecked(store):
        try:
            return one_unit(store)
        except (AssertionError, Exception) as exc:  # mixed, or a group gone mid-read
            mixed.append(str(exc))
            return None

    version_1(tmp_path / "home", None)
    store = open_store(tmp_path / "home")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "home"), "", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while writer.poll() is None and not mixed:
            unchecked(store)
    finally:
        writer.kill()
        writer.communicate()
    assert mixed, "no mixed state without the checks: the race is too weak to test anything"


def _pin_without_checks(self, path, zarr_path, stamp, commit):
    self.pins.setdefault(snapshot.shard_of(path), {})[path] = (stamp, commit)
    self.paths[zarr_path] = path


def test_commit_attributes_name_the_shard_and_what_went(tmp_path):
    """Every group a commit writes carries `featstore-commit`: one id above every version it
    replaces, the shard's other groups of the commit, and the groups it deletes."""
    home = tmp_path / "home"
    version_1(home, None)
    root = home / spec.ROOT

    def commit(path: str) -> Commit:
        return Commit.of(json.loads((root / path / "zarr.json").read_bytes())["attributes"])

    paths = ("tokens/s0", "activations/layer_6/s0", "activations/layer_7/s0")
    first = {p: commit(p) for p in paths}
    assert len({c.id for c in first.values()}) == 1
    assert first["tokens/s0"].after == {
        "activations/layer_6/s0": first["tokens/s0"].id,
        "activations/layer_7/s0": first["tokens/s0"].id,
    }
    store = open_store(home)
    table = pl.DataFrame({"seq": np.zeros(ROWS, np.int64), "pos": np.arange(ROWS), "token": 1})
    store.write_tokens(SHARD, table)  # other rows: both layers go in the same commit
    now = commit("tokens/s0")
    assert now.id > first["tokens/s0"].id
    assert now.gone == {"activations/layer_6/s0", "activations/layer_7/s0"}
    assert store.shards(6) == store.shards(7) == []


def test_the_rule_between_two_groups():
    """`behind`: a group older than another's commit requires; equal or newer is fine."""
    c = Commit(10, {"tokens/s": 10}, frozenset({"activations/layer_7/s"}))
    assert behind("activations/layer_6/s", c, "tokens/s", Commit(9))
    assert not behind("activations/layer_6/s", c, "tokens/s", Commit(10))
    assert not behind("activations/layer_6/s", c, "tokens/s", Commit(12))
    assert behind("activations/layer_6/s", c, "activations/layer_7/s", Commit(4))  # not gone yet
    assert not behind("activations/layer_6/s", c, "activations/layer_7/s", Commit(11))  # again
    snap = Snapshot()
    snap.pin("activations/layer_6/s", "x", b"1", c)
    with pytest.raises(SnapshotChanged):
        snap.pin("tokens/s", "y", b"2", Commit(9))
    with pytest.raises(SnapshotChanged):
        snap.missing("tokens/s", lambda: True)
    with pytest.raises(SnapshotChanged):  # the same group, another version
        snap.pin("activations/layer_6/s", "x", b"other", c)
    snap.pin("activations/layer_6/t", "z", b"3", Commit(1))  # another shard: no relation


def test_a_reader_that_never_sees_a_whole_state_gives_up_with_one_line(monkeypatch):
    monkeypatch.setattr(snapshot, "PAUSE", 0.0)
    calls = []

    def never() -> None:
        calls.append(1)
        raise SnapshotChanged("tokens/s0 was replaced while being read")

    start = time.monotonic()
    with pytest.raises(SnapshotChanged) as info:
        snapshot.retrying(never, "store X")
    assert len(calls) == snapshot.TRIES and time.monotonic() - start < 5
    assert "\n" not in str(info.value) and "run again" in str(info.value)


def test_a_group_deleted_after_its_commit_leaves_the_rest_readable(tmp_path):
    """A layer deleted later by itself is a state like any other: the token table committed
    with it still reads, in a unit with the other layer, and `check` is clean."""
    from featstore.store.check import check_store

    home = tmp_path / "home"
    version_1(home, None)
    store = open_store(home)
    assert store.delete_group("activations/layer_7/s0")
    found = store.consistently(lambda: (store.tokens(SHARD).height, store.read(6, SHARD).nnz))
    assert found == (ROWS, ROWS) and check_store(store) == []


def test_a_crafted_commit_is_reported_by_check_and_readers_give_up_in_one_line(
    tmp_path, monkeypatch, capsys
):
    """A layer whose `featstore-commit` requires a newer token table than the stored one (never
    a state a writer leaves on a quiet store): `check` names the shard, readers of the shard
    give up with one line instead of combining them."""
    from helpers import assert_one_line_error, cli

    from featstore.store.check import check_store

    home = tmp_path / "home"
    version_1(home, None)
    meta = home / spec.ROOT / "activations/layer_6/s0/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][snapshot.COMMIT]["after"]["tokens/s0"] += 10**9
    meta.write_text(json.dumps(doc))
    monkeypatch.setattr(snapshot, "TRIES", 3)
    store = open_store(home)
    assert [p for p in check_store(store) if "not of one commit" in p and "s0" in p]
    with pytest.raises(SnapshotChanged, match="run again"):
        store.consistently(lambda: (store.tokens(SHARD), store.read(6, SHARD)))
    assert_one_line_error(*cli(capsys, home, "sql", "SELECT count(*) FROM activations")[::2])
