"""A wheel built from the repo works outside it: named queries, concept sets, the embedded model.

The wheel goes into a fresh venv that sees the test venv's packages (a path line in a `.pth`,
which does not run the editable featstore's own `.pth` there) but not its featstore; every
command runs from a folder outside the repo, so nothing can be found beside the sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import polars as pl
import pytest

from featstore.stats.query import PairQuery, pair_stats
from featstore.store import sql
from featstore.store.home import open_store

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "featstore-data", ".dagster", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".hypothesis", "tests", "bench",
)  # fmt: skip

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `featstore` command of a fresh venv holding only the built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=SKIP)  # a copy: the build writes beside it
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("featstore-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp)
    shared = sysconfig.get_path("purelib")
    (Path(site.strip()) / "shared.pth").write_text(shared + "\n")
    run(*pip, "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp)
    where = run(python, "-c", "import featstore; print(featstore.__file__)", cwd=tmp)
    assert where.startswith(str(venv)), where  # the wheel's featstore, not the repo's
    return venv / "bin" / "featstore"


def test_the_wheel_runs_queries_stats_and_concepts_outside_the_repo(installed, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    cli = (installed, "--home", home)
    run(*cli, "extract", "--layers", "6", "7", "--max-sequences", "4", "--shards", "shard-000",
        cwd=work)  # fmt: skip
    out = work / "pairs.parquet"
    run(*cli, "stats", "--layer-a", "6", "--layer-b", "7", "--engine", "duckdb", "--save",
        "--out", out, cwd=work)  # fmt: skip
    store = open_store(home)
    want = pair_stats(store, PairQuery(6, 7, engine="sparse", recompute=True, save=False))
    got = pl.read_parquet(out)
    assert got.height == want.height > 0
    assert got.select("feature_a", "feature_b", "n_both").equals(
        want.select("feature_a", "feature_b", "n_both")
    )

    csv = run(*cli, "sql", "--file", "top_features", "-p", "top=3", "--format", "csv", cwd=work)
    ref = sql.query(store, sql.named_query("top_features"), {"top": 3})
    assert (
        pl.read_csv(csv.encode()).select("layer", "feature").equals(ref.select("layer", "feature"))
    )

    run(*cli, "concepts", "--layers", "6", "7", "--out", work / "concepts", cwd=work)
    traces = pl.read_parquet(work / "concepts" / "concept_traces.parquet")
    best = pl.read_parquet(work / "concepts" / "best_features.parquet")
    assert best.height > 0 and traces.height > 0
