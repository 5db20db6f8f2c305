"""A store you can trust, tried as an attacker would (issue 13), one section per class:
crafted bookkeeping (class 1), corrupt data (3), a shard as one unit (2), names and numbers (4)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, build_store, cli, sparse_acts

from featstore.errors import FeatstoreError
from featstore.store import spec
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
    import scipy.sparse as sp

    npz = tmp_path / "m.npz"
    sp.save_npz(npz, sparse_acts(5, 4))
    for bad in ("zarr.json", "ZARR.JSON", "s0\n", "../x", ""):
        status, _, err = cli(capsys, tmp_path / "h", "ingest", str(npz), "--layer", "6",
                             "--shard", bad)  # fmt: skip
        assert_one_line_error(status, err, "shard")
