"""The extraction host path's compiled passes and direct chunk writes equal their references:
torch's nonzero, scipy's canonical form with numpy's per-feature sums, and zarr's own writes."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from featstore import FeatstoreError
from featstore.sources.extract import dense_to_csr
from featstore.store import blockpass, encodings
from featstore.store.chunks import ChunkWriter
from featstore.store.home import open_store
from featstore.store.local import CODECS, WRITE, FeatureStats, GroupWriter, validate_activations


def codes(rows: int = 300, cols: int = 500, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < 0.05)
    dense[7] = 0  # an empty row
    return dense


def test_dense_csr_equals_torch_nonzero():
    dense = codes()
    dense[3, 5], dense[4, 6] = float("nan"), -2.0  # kept as nonzeros, refused later
    got = dense_to_csr(dense)
    rows, cols = torch.nonzero(dense, as_tuple=True)
    np.testing.assert_array_equal(got.indices, cols.numpy())
    np.testing.assert_array_equal(got.indptr, np.searchsorted(rows.numpy(), np.arange(301)))
    np.testing.assert_array_equal(got.data, dense[rows, cols].numpy())


def test_dense_csr_grows_past_its_first_guess():
    dense = torch.rand(40, 2000) + 0.1  # every value nonzero: far more than 16 per row
    np.testing.assert_array_equal(dense_to_csr(dense).toarray(), dense.numpy())


def test_check_block_equals_validation_and_numpy_sums():
    csr = dense_to_csr(codes())
    got = blockpass.fast_block(csr, 500)
    assert got is not None
    ref = validate_activations(csr, "x")
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    stats = FeatureStats.of(ref)  # np.bincount: the same additions in the same order
    for name in ("count", "total", "sumsq"):
        np.testing.assert_array_equal(getattr(got, name), getattr(stats, name))


def _unsorted(csr: sp.csr_matrix) -> sp.csr_matrix:
    out = csr.copy()
    lo, hi = out.indptr[1], out.indptr[2]
    out.indices[lo:hi], out.data[lo:hi] = out.indices[lo:hi][::-1], out.data[lo:hi][::-1]
    return out


def _with_value(csr: sp.csr_matrix, value: float) -> sp.csr_matrix:
    out = csr.copy()
    out.data[5] = value
    return out


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_unsorted, id="unsorted"),
        pytest.param(lambda m: _with_value(m, 0.0), id="explicit-zero"),
        pytest.param(lambda m: _with_value(m, np.nan), id="nan"),
        pytest.param(lambda m: _with_value(m, np.inf), id="inf"),
        pytest.param(lambda m: _with_value(m, -1.0), id="negative"),
        pytest.param(lambda m: m.astype(np.float64), id="float64"),
        pytest.param(lambda m: sp.coo_matrix(m), id="coo"),
    ],
)
def test_blocks_the_pass_cannot_vouch_for_go_the_slow_way(make):
    assert blockpass.fast_block(make(dense_to_csr(codes())), 500) is None


def test_unsorted_and_bad_blocks_store_as_validated(tmp_path):
    """A block the pass refuses is canonicalised (or refused in one line) as before."""
    store = open_store(tmp_path / "home", create=True)
    csr = dense_to_csr(codes())
    with store.activation_writer(6, "s", 500) as writer:
        writer.append(_unsorted(csr))
    np.testing.assert_array_equal(store.read(6, "s").toarray(), csr.toarray())
    with pytest.raises(FeatstoreError, match="NaN or infinite"):
        with store.activation_writer(6, "t", 500) as writer:
            writer.append(_with_value(csr, np.nan))
    assert store.shards(6) == ["s"]


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
def test_chunk_writer_writes_what_zarr_writes(tmp_path, dtype):
    """GroupWriter's direct whole-chunk writes give byte for byte zarr's own chunk files."""
    values = (np.random.default_rng(1).random(10_000) * 1000).astype(dtype)
    ours = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ours"), mode="w", zarr_format=3)
    writer = GroupWriter(ours)
    for lo in range(0, values.size, 1234):  # appends straddling chunks of 1,024
        writer.append("x", values[lo : lo + 1234], chunk=1024)
    writer.flush()
    assert writer.chunk_writers["x"] is not None  # the direct path, not zarr's
    theirs = zarr.open_group(zarr.storage.LocalStore(tmp_path / "theirs"), mode="w", zarr_format=3)
    array = theirs.create_array(
        "x",
        shape=values.shape,
        dtype=dtype,
        chunks=(1024,),
        compressors=CODECS,
        config=WRITE,
        fill_value=encodings.fill_value(dtype),
    )
    array[:] = values
    np.testing.assert_array_equal(ours["x"][:], values)
    names = _files(tmp_path / "ours" / "x")
    assert names == _files(tmp_path / "theirs" / "x") and len(names) == 11  # zarr.json + 10
    for name in names:
        if name.name != "zarr.json":
            assert filecmp.cmp(tmp_path / "ours/x" / name, tmp_path / "theirs/x" / name, False)


@pytest.mark.parametrize("crc", [False, True], ids=["blosc", "blosc+crc32c"])
def test_chunk_writer_with_a_checksum_writes_what_zarr_writes(tmp_path, crc):
    codecs = (BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),) + (
        (Crc32cCodec(),) if crc else ()
    )
    values = np.arange(4096, dtype=np.float32) * 1.5
    arrays = []
    for name in ("ours", "theirs"):
        group = zarr.open_group(zarr.storage.LocalStore(tmp_path / name), mode="w", zarr_format=3)
        arrays.append(group.create_array(
            "x", shape=values.shape, dtype=np.float32, chunks=(1024,), compressors=codecs,
            config=WRITE))  # fmt: skip
    ChunkWriter.of(arrays[0]).write(0, values)
    arrays[1][:] = values
    np.testing.assert_array_equal(arrays[0][:], values)  # zarr checks the checksums on reading
    for k in range(4):
        assert filecmp.cmp(tmp_path / f"ours/x/c/{k}", tmp_path / f"theirs/x/c/{k}", False)
