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
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.storage import StorePath

from featstore import FeatstoreError
from featstore.sources.extract import dense_to_csr, device_csr
from featstore.store import blockpass, encodings
from featstore.store.chunks import ChunkWriter
from featstore.store.home import open_store
from featstore.store.local import CODECS, WRITE, FeatureStats, GroupWriter, validate_activations
from featstore.store.writers import VALUE_CODECS


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


def test_dense_csr_skips_negative_zero_and_finds_values_in_any_run():
    """Runs of 16 floats are tested at once: a lone value at each place of a run, and in the
    tail past the last whole run, is found; -0.0 (bits set, but zero) is not a nonzero."""
    dense = torch.zeros(40, 16 * 5 + 7)
    for r in range(dense.shape[0]):
        dense[r, (r * 7) % dense.shape[1]] = r + 1.0
    dense[0, 3], dense[1, 86] = -0.0, -0.0
    got = dense_to_csr(dense)
    rows, cols = torch.nonzero(dense, as_tuple=True)
    np.testing.assert_array_equal(got.indices, cols.numpy())
    np.testing.assert_array_equal(got.indptr, np.searchsorted(rows.numpy(), np.arange(41)))
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


@pytest.mark.parametrize(
    "dtype, codecs",
    [
        pytest.param(np.float32, CODECS, id="float32"),
        pytest.param(np.int32, CODECS, id="int32"),
        pytest.param(np.int64, CODECS, id="int64"),
        pytest.param(np.float32, VALUE_CODECS, id="float32-values"),
    ],
)
def test_chunk_writer_writes_what_zarr_writes(tmp_path, dtype, codecs):
    """GroupWriter's direct writes give byte for byte zarr's own files: every chunk (the last
    part chunk padded with the fill value), the array's zarr.json at its final size and the
    group's zarr.json with its attributes; zarr reads the group back."""
    values = (np.random.default_rng(1).random(10_000) * 1000).astype(dtype)
    writer = GroupWriter(StorePath(zarr.storage.LocalStore(tmp_path / "ours")))
    writer.create("x", values.dtype, chunk=1024, codecs=codecs)
    for lo in range(0, values.size, 1234):  # appends straddling chunks of 1,024
        writer.append("x", values[lo : lo + 1234], chunk=1024)
    writer.flush()
    attributes = {"layer": 6, "shape": [3, 4], "name": "x\u00e9", "nested": {"b": [1.5, None]}}
    writer.write_attributes(attributes)
    assert writer.chunk_writers["x"] is not None  # the direct path, not zarr's
    theirs = zarr.open_group(zarr.storage.LocalStore(tmp_path / "theirs"), mode="w", zarr_format=3)
    array = theirs.create_array(
        "x",
        shape=(0,),
        dtype=dtype,
        chunks=(1024,),
        compressors=codecs,
        config=WRITE,
        fill_value=encodings.fill_value(dtype),
    )
    array.append(values)  # created empty and resized, as GroupWriter's arrays were
    theirs.update_attributes(attributes)
    ours = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ours"), mode="r")
    np.testing.assert_array_equal(ours["x"][:], values)
    assert dict(ours.attrs) == attributes
    names = _files(tmp_path / "ours")
    assert names == _files(tmp_path / "theirs") and len(names) == 12  # 2 zarr.json + 10 chunks
    for name in names:
        assert filecmp.cmp(tmp_path / "ours" / name, tmp_path / "theirs" / name, False), name


def test_group_writer_writes_other_codecs_through_zarr(tmp_path):
    """An array of a codec chain ChunkWriter does not encode (zstd) is written by zarr into
    the region, a part chunk read back and completed; zarr reads every value back."""
    values = np.arange(5000, dtype=np.int64) * 7
    writer = GroupWriter(StorePath(zarr.storage.LocalStore(tmp_path / "g")))
    writer.create("x", values.dtype, chunk=1024, codecs=(ZstdCodec(),))
    assert writer.chunk_writers["x"] is None
    writer.append("x", values[:1500], chunk=1024)
    writer.flush()  # a part chunk: the next append starts inside it
    writer.append("x", values[1500:], chunk=1024)
    writer.flush()
    writer.write_attributes({})
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "g" / "x", mode="r")[:], values)


def _blosc(shuffle: str) -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=1, shuffle=shuffle)


@pytest.mark.parametrize(
    "codecs",
    [
        pytest.param((_blosc("shuffle"),), id="blosc"),
        pytest.param((_blosc("shuffle"), Crc32cCodec()), id="blosc+crc32c"),
        pytest.param((_blosc("bitshuffle"), Crc32cCodec()), id="bitshuffle+crc32c"),
        pytest.param((_blosc("noshuffle"),), id="noshuffle"),
        pytest.param((Crc32cCodec(),), id="crc32c"),
        pytest.param((), id="bytes"),
    ],
)
def test_chunk_writer_with_each_codec_chain_writes_what_zarr_writes(tmp_path, codecs):
    values = np.arange(4096, dtype=np.float32) * 1.5
    arrays = []
    for name in ("ours", "theirs"):
        group = zarr.open_group(zarr.storage.LocalStore(tmp_path / name), mode="w", zarr_format=3)
        arrays.append(group.create_array(
            "x", shape=values.shape, dtype=np.float32, chunks=(1024,), compressors=codecs,
            config=WRITE))  # fmt: skip
    ChunkWriter.at(arrays[0].metadata, arrays[0].store_path).write(0, values)
    arrays[1][:] = values
    np.testing.assert_array_equal(arrays[0][:], values)  # zarr checks the checksums on reading
    for k in range(4):
        assert filecmp.cmp(tmp_path / f"ours/x/c/{k}", tmp_path / f"theirs/x/c/{k}", False)


def test_activation_values_are_stored_uncompressed_and_read_bit_for_bit(tmp_path):
    """`data` takes VALUE_CODECS (the bytes and their CRC-32C), the other arrays CODECS; zarr
    alone reads every array back equal to the block, bit for bit, from the codecs it records."""
    store = open_store(tmp_path / "home", create=True)
    csr = dense_to_csr(codes(rows=3000))  # two appends, each array ending in a part chunk
    with store.activation_writer(6, "s", 500) as writer:
        writer.append(csr[:1234])
        writer.append(csr[1234:])
    group = zarr.open_group(tmp_path / "home" / "store.zarr" / "activations/layer_6/s", mode="r")
    names = {name: [c.to_dict()["name"] for c in group[name].metadata.codecs] for name in group}
    assert names["data"] == ["bytes", "crc32c"]
    assert names["indices"] == names["indptr"] == ["bytes", "blosc", "crc32c"]
    assert group["indices"].metadata.codecs[1].shuffle.value == "bitshuffle"
    np.testing.assert_array_equal(group["data"][:].view(np.uint32), csr.data.view(np.uint32))
    np.testing.assert_array_equal(group["indices"][:], csr.indices)
    np.testing.assert_array_equal(group["indptr"][:], csr.indptr)
    stats = FeatureStats.of(csr)
    np.testing.assert_array_equal(group["feature_count"][:], stats.count)
    np.testing.assert_allclose(group["feature_sum"][:], stats.total, rtol=1e-12)
    got = store.read(6, "s")
    np.testing.assert_array_equal(got.data.view(np.uint32), csr.data.view(np.uint32))
    np.testing.assert_array_equal(got.indices, csr.indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_the_device_path_hands_over_what_the_host_pass_finds(dtype):
    """`device_csr` (what runs on a GPU: torch's nonzero, gather, searchsorted, run here on the
    CPU) gives the compiled host pass's CSR: int32 ids, float32 values, one row per token."""
    dense = codes().to(dtype)
    got = device_csr(dense)
    ref = dense_to_csr(dense.float())
    assert got.indices.dtype == np.int32 and got.data.dtype == np.float32
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    assert blockpass.fast_block(got, 500) is not None  # the writer takes it the fast way


def test_store_groups_zarr_json_are_what_zarr_writes(tmp_path):
    """The zarr.json documents featstore writes itself (an activation group's with its
    attributes, the parent groups it makes, each array's at its final shape) are byte for byte
    what zarr writes for the same metadata, and zarr opens every node from them."""
    store = open_store(tmp_path / "home", create=True)
    csr = dense_to_csr(codes(rows=3000))
    with store.activation_writer(6, "s", 500, {"note": "x"}) as writer:
        writer.append(csr[:1234])
        writer.append(csr[1234:])
    root = tmp_path / "home" / "store.zarr"
    ours = zarr.open_group(root / "activations/layer_6/s", mode="r")
    ref = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ref"), mode="w", zarr_format=3)
    ref.update_attributes(dict(ours.attrs))
    assert (root / "activations/layer_6/s/zarr.json").read_bytes() == (
        tmp_path / "ref/zarr.json"
    ).read_bytes()
    for name in ours.array_keys():
        array = ours[name]
        ref.create_array(
            name,
            shape=array.shape,
            dtype=array.dtype,
            chunks=array.chunks,
            compressors=array.compressors,
            fill_value=array.fill_value,
        )
        assert (root / f"activations/layer_6/s/{name}/zarr.json").read_bytes() == (
            tmp_path / f"ref/{name}/zarr.json"
        ).read_bytes(), name
    for parent in ("activations", "activations/layer_6"):
        zarr.open_group(zarr.storage.LocalStore(tmp_path / "parents" / parent), mode="a")
        assert (root / parent / "zarr.json").read_bytes() == (
            tmp_path / "parents" / parent / "zarr.json"
        ).read_bytes(), parent
    np.testing.assert_array_equal(store.read(6, "s").toarray(), csr.toarray())
