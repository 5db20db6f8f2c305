"""`featstore ingest`: outside activations become a normal shard; bad files change nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from featstore import open_store
from featstore.cli import main


def save(path: Path, matrix) -> Path:
    sp.save_npz(path, matrix)
    return path


def matrix(n: int = 40, d: int = 32, seed: int = 0) -> sp.csr_matrix:
    m = sp.random(n, d, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    m.data += 0.5
    return m


def test_ingest_round_trip(tmp_path):
    m = matrix()
    home = tmp_path / "home"
    assert (
        main(
            [
                "--home",
                str(home),
                "ingest",
                str(save(tmp_path / "a.npz", m)),
                "--layer",
                "6",
                "--shard",
                "ext",
            ]
        )
        == 0
    )
    store = open_store(home)
    np.testing.assert_array_equal(store.read(6, "ext").toarray(), m.toarray())
    assert store.tokens("ext").height == 40


def test_ingest_with_token_table(tmp_path):
    m = matrix(6)
    tokens = pl.DataFrame(
        {"seq": [0, 0, 0, 1, 1, 1], "pos": [0, 1, 2, 0, 1, 2], "token": [9, 8, 7, 6, 5, 4]}
    )
    tokens.write_parquet(tmp_path / "t.parquet")
    home = tmp_path / "home"
    rc = main(
        [
            "--home",
            str(home),
            "ingest",
            str(save(tmp_path / "a.npz", m)),
            "--layer",
            "7",
            "--shard",
            "x",
            "--tokens",
            str(tmp_path / "t.parquet"),
        ]
    )
    assert rc == 0
    assert open_store(home).tokens("x")["token"].to_list() == [9, 8, 7, 6, 5, 4]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "featstore.cli", *args], capture_output=True, text=True
    )


def snapshot(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and "locks" not in p.parts
    }


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        pytest.param(
            lambda p: save(p / "w.npz", matrix(40, 33)),
            "33 features but layer 6 has d_sae 32",
            id="wrong-width",
        ),
        pytest.param(
            lambda p: save(p / "r.npz", matrix(41, 32)), "41 token rows", id="wrong-length"
        ),
        pytest.param(
            lambda p: (p / "n.npz").write_bytes(b"not a zip") and p / "n.npz",
            "not a scipy sparse .npz",
            id="not-npz",
        ),
        pytest.param(lambda p: save(p / "neg.npz", -matrix()), "non-negative", id="negative"),
        pytest.param(lambda p: p / "missing.npz", "no such file", id="missing"),
    ],
)
def test_bad_ingest_is_one_line_and_changes_nothing(tmp_path, make_file, message):
    home = tmp_path / "home"
    assert (
        main(
            [
                "--home",
                str(home),
                "ingest",
                str(save(tmp_path / "ok.npz", matrix())),
                "--layer",
                "6",
                "--shard",
                "s0",
            ]
        )
        == 0
    )
    before = snapshot(home)
    result = run_cli(
        "--home", str(home), "ingest", str(make_file(tmp_path)), "--layer", "6", "--shard", "s0"
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert snapshot(home) == before
