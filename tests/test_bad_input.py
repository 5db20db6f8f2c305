"""Bad input at every public entry point: one line, exit status 2, the store's bytes unchanged.

Property-based: each test draws inputs, good and bad, and an oracle written here from the rules
(not from featstore's code) says which should pass; those that pass must do what they say.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import assert_one_line_error, build_store, cli, file_snapshot, sparse_acts
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from featstore.errors import FeatstoreError
from featstore.sources.extract import ExtractConfig
from featstore.store.home import open_store

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
D, N = 16, 40  # features and tokens of every stored shard
FEATSTORE = Path(sys.executable).parent / "featstore"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Layers 6 and 7 over shards s0 and s1, plus `odd` (layer 7 has fewer rows than its
    tokens) and `only6` (layer 6 alone)."""
    home = tmp_path_factory.mktemp("pristine") / "home"
    acts = {
        layer: {s: sparse_acts(N, D, 0.2, seed=10 * layer + i) for i, s in enumerate(("s0", "s1"))}
        for layer in (6, 7)
    }
    acts[6]["only6"] = acts[6]["odd"] = sparse_acts(N, D, 0.2, seed=3)
    store = build_store(home, acts)
    store.write_activations(7, "odd", sparse_acts(N - 10, D, 0.2, seed=4))
    return home


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Layer 6 over shard s0 alone: what ingest cases are copied from."""
    home = tmp_path_factory.mktemp("small") / "home"
    build_store(home, {6: {"s0": sparse_acts(N, D, 0.2, seed=1)}})
    return home


@pytest.fixture
def home(pristine, tmp_path) -> Path:
    """A copy of the pristine store for one test."""
    shutil.copytree(pristine, tmp_path / "home")
    return tmp_path / "home"


def refused_and_unchanged(status: int, err: str, home: Path, before: dict[str, bytes]) -> None:
    assert_one_line_error(status, err)
    assert file_snapshot(home) == before, "a refused command changed the store"


# -- featstore ingest -----------------------------------------------------------------------------

DTYPES = ("float32", "float64", "int32", "uint8", "bool", "complex64")
SPECIAL = (0.0, 0.25, 3.0, -1.0, -0.0, math.nan, math.inf, -math.inf, 1e39)  # 1e39: inf in float32


def values_of(dtype: str) -> st.SearchStrategy:
    return {
        "float32": st.sampled_from(SPECIAL) | st.floats(-5, 5),
        "float64": st.sampled_from(SPECIAL) | st.floats(-5, 5),
        "int32": st.integers(-3, 10**6),
        "uint8": st.integers(0, 255),
        "bool": st.booleans(),
        "complex64": st.complex_numbers(max_magnitude=5),
    }[dtype]


@st.composite
def npz_inputs(draw) -> dict:
    """A file to ingest (sparse .npz of any shape, dtype and values; dense; garbage; missing),
    and where to: an existing or new layer and shard, or a bad one."""
    tidy = draw(st.booleans())  # half the cases make only sensible choices: many are taken

    def pick(sensible: list, other: list):
        return draw(st.sampled_from(sensible if tidy else sensible + other))

    kind = pick(["csr", "coo", "csc"], ["dense", "garbage", "missing"])
    rows = pick([1, 7, N], [0])
    cols = pick([1, D], [0, D + 1, 2**31, 2**31 + 7])
    dtype = pick(["float32", "float64", "int32", "uint8"], ["bool", "complex64"])
    width = min(cols, 64)  # entries go in the last 64 columns: huge widths get huge feature ids
    cells = rows * width
    where = draw(st.lists(st.integers(0, max(cells - 1, 0)), max_size=min(cells, 12), unique=True))
    values_drawn = st.integers(0, 9) if tidy else values_of(dtype)
    values = draw(st.lists(values_drawn, min_size=len(where), max_size=len(where)))
    coo = sp.coo_matrix(
        (
            np.array(values, dtype=dtype),
            ([c // width for c in where], [cols - width + c % width for c in where]),
        ),
        shape=(rows, cols),
        dtype=dtype,
    )
    return {
        "kind": "coo" if kind in ("dense", "csc") and cols > 64 else kind,  # sizes ~ columns
        "matrix": coo,
        "layer": pick([6, 8], [-1]),
        "shard": pick(["s0", "brand-new"], ["../up", "-flag"]),
        "garbage": draw(st.binary(max_size=40)),
    }


def write_input(case: dict, path: Path) -> Path:
    kind, matrix = case["kind"], case["matrix"]
    if kind == "garbage":
        path.write_bytes(case["garbage"])
    elif kind == "dense":
        np.savez(path, matrix.toarray())
    elif kind != "missing":
        sp.save_npz(path, matrix.asformat(kind))
    return path


def ingest_should_pass(case: dict) -> bool:
    """The rules of docs/STORE_FORMAT.md and `featstore ingest`, restated."""
    m, layer = case["matrix"], case["layer"]
    if case["kind"] not in ("csr", "coo", "csc") or case["shard"] not in ("s0", "brand-new"):
        return False
    if layer < 0 or 0 in m.shape or m.shape[1] >= 2**31:
        return False
    if m.dtype.kind not in "iuf":  # integers and reals; not bool, not complex
        return False
    values = m.data.astype(np.float32)
    values = values[values != 0]
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        return False
    fits_layer = layer != 6 or m.shape[1] == D
    fits_shard = case["shard"] != "s0" or m.shape[0] == N
    return fits_layer and fits_shard


@SETTINGS
@given(case=npz_inputs())
def test_ingest_takes_good_files_whole_and_refuses_bad_ones_leaving_the_store(small, capsys, case):
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(small, home)
        path = write_input(case, Path(tmp) / "in.npz")
        before = file_snapshot(home)
        args = ("ingest", str(path), f"--layer={case['layer']}", f"--shard={case['shard']}")
        status, _, err = cli(capsys, home, *args)
        event("taken" if ingest_should_pass(case) else "refused")
        if not ingest_should_pass(case):
            refused_and_unchanged(status, err, home, before)
            return
        assert status == 0, err
        want = sp.csr_matrix(case["matrix"], dtype=np.float32)
        got = open_store(home).read(case["layer"], case["shard"])
        assert got.shape == want.shape and (got != want).nnz == 0
        assert open_store(home).tokens(case["shard"]).height == want.shape[0]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param({"seq": [0] * 3, "pos": [0, 1, 2], "token": [1, 2, 3]}, "3 token rows",
                     id="rows"),
        pytest.param({"seq": [0] * N, "pos": list(range(N))}, "token", id="no-token-column"),
        pytest.param(None, "cannot read a token table", id="garbage"),
    ],
)  # fmt: skip
def test_ingest_refuses_a_bad_token_table_leaving_the_store(home, tmp_path, capsys, table, message):
    import polars as pl

    tokens = tmp_path / "tokens.parquet"
    if table is None:
        tokens.write_bytes(b"PAR1 not really")
    else:
        pl.DataFrame(table).write_parquet(tokens)
    sp.save_npz(tmp_path / "m.npz", sparse_acts(N, D))
    before = file_snapshot(home)
    args = ("ingest", str(tmp_path / "m.npz"), "--layer", "6", "--shard", "fresh")
    status, _, err = cli(capsys, home, *args, "--tokens", str(tokens))
    refused_and_unchanged(status, err, home, before)
    assert message in err


# -- featstore stats ------------------------------------------------------------------------------

SHARD_NAMES = ("s0", "s1", "odd", "only6", "nope")
MEASURE_RANGES = {"sufficiency": (0.0, 1.0), "pmi": (-math.inf, math.inf)}  # "nope" is none
FLOATS = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-1.0, 1.0])
RANGES = st.none() | st.tuples(st.integers(-2, D + 2), st.integers(-2, D + 2))
SENSIBLE = st.none() | st.tuples(st.integers(0, D - 1), st.integers(1, D))


@st.composite
def stats_inputs(draw) -> dict:
    if draw(st.booleans()):  # half the cases make only sensible choices: many are taken
        layers, shards, ranges = st.sampled_from([6, 7]), st.sampled_from(["s0", "s1"]), SENSIBLE
        floats, measures = st.none() | st.floats(-1, 1), st.sampled_from(list(MEASURE_RANGES))
    else:
        layers, shards = st.sampled_from([6, 7, 5, 11]), st.sampled_from(SHARD_NAMES)
        ranges = RANGES
        floats, measures = FLOATS, st.sampled_from([*MEASURE_RANGES, "nope"])
    return {
        "a": draw(layers),
        "b": draw(layers),
        "shards": draw(st.none() | st.lists(shards, min_size=1, max_size=3)),
        "features_a": draw(ranges),
        "features_b": draw(ranges),
        "min_pearson": draw(floats),
        "min_jaccard": draw(floats),
        "min": draw(st.none() | st.tuples(measures, floats)),
    }


def stats_args(case: dict, out: Path) -> list[str]:
    args = ["stats", f"--layer-a={case['a']}", f"--layer-b={case['b']}", f"--out={out}"]
    if case["shards"] is not None:
        args += ["--shards", *case["shards"]]
    for side in "ab":
        if case[f"features_{side}"] is not None:
            args.append(f"--features-{side}={':'.join(map(str, case[f'features_{side}']))}")
    for name in ("min_pearson", "min_jaccard"):
        if case[name] is not None:
            args.append(f"--{name.replace('_', '-')}={case[name]!r}")
    if case["min"] is not None and case["min"][1] is not None:
        args.append(f"--min={case['min'][0]}={case['min'][1]!r}")
    return args


LAYER_SHARDS = {6: {"s0", "s1", "odd", "only6"}, 7: {"s0", "s1", "odd"}}


def stats_should_pass(case: dict) -> bool:
    """Known layers; shards both layers hold over as many tokens (the default, every shard of
    either layer, includes `odd` and `only6` unless a = b); ranges inside 0:D; thresholds in
    range."""
    a, b = case["a"], case["b"]
    if {a, b} - set(LAYER_SHARDS):
        return False
    usable = LAYER_SHARDS[a] if a == b else {"s0", "s1"}
    chosen = LAYER_SHARDS[a] | LAYER_SHARDS[b] if case["shards"] is None else set(case["shards"])
    if chosen - usable:
        return False
    for rng in (case["features_a"], case["features_b"]):
        if rng is not None and not 0 <= rng[0] < rng[1] <= D:
            return False
    for name in ("min_pearson", "min_jaccard"):
        if case[name] is not None and not -1 <= case[name] <= 1:
            return False
    if case["min"] is not None and case["min"][1] is not None:
        measure, value = case["min"]
        lo, hi = MEASURE_RANGES.get(measure, (math.nan, math.nan))
        return lo <= value <= hi
    return True


@SETTINGS
@given(case=stats_inputs())
def test_stats_runs_good_requests_and_refuses_bad_ones_leaving_the_store(
    home, tmp_path, capsys, case
):
    out = tmp_path / "out.parquet"
    out.unlink(missing_ok=True)
    before = file_snapshot(home)
    status, _, err = cli(capsys, home, *stats_args(case, out))
    event("taken" if stats_should_pass(case) else "refused")
    if stats_should_pass(case):
        assert status == 0, err
        assert out.exists()
    else:
        refused_and_unchanged(status, err, home, before)
        assert not out.exists()


def test_stats_names_the_shard_whose_layers_differ_in_tokens(home, tmp_path, capsys):
    args = ("stats", "--layer-a", "6", "--layer-b", "7", "--out", str(tmp_path / "o.parquet"))
    status, _, err = cli(capsys, home, *args, "--shards", "odd")
    words = ("shard odd", f"layer 6 has {N} tokens", f"layer 7 has {N - 10}")
    assert_one_line_error(status, err, *words)


def test_stats_counts_a_shard_named_twice_once(home, tmp_path, capsys):
    import polars as pl

    args = ("stats", "--layer-a", "6", "--layer-b", "7", "--shards", "s1")
    for name, extra in (("once", ()), ("twice", ("s1",))):
        assert cli(capsys, home, *args, *extra, "--out", str(tmp_path / f"{name}.parquet"))[0] == 0
    once, twice = (pl.read_parquet(tmp_path / f"{n}.parquet") for n in ("once", "twice"))
    assert once["n_tokens"].unique().to_list() == [N]
    assert twice.equals(once)


def test_stats_out_in_the_way_is_one_line(home, tmp_path, capsys):
    (tmp_path / "a-folder").mkdir()
    args = ("stats", "--layer-a", "6", "--layer-b", "7", "--shards", "s0")
    status, _, err = cli(capsys, home, *args, "--out", str(tmp_path / "a-folder"))
    assert_one_line_error(status, err, "a-folder")


# -- featstore sql --------------------------------------------------------------------------------

WRITES = (
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO activations VALUES (1)",
    "UPDATE tokens SET token = 0",
    "DELETE FROM activations",
    "DROP VIEW activations",
    "COPY (SELECT * FROM tokens) TO 'leak.csv'",
    "ATTACH 'other.db'",
    "PRAGMA enable_profiling",
    "SET threads = 1",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE 'dump'",
    "CHECKPOINT",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('**/*.parquet')",
    "SELECT * FROM glob('/*')",
    "SELECT 1; DROP VIEW tokens",
)
READS = (  # shard `odd` is refused: its layer 7 has fewer rows than its token table
    "SELECT count(*) FROM activations WHERE shard <> 'odd'",
    "SELECT layer, shard, max(value) FROM activations WHERE shard <> 'odd' GROUP BY ALL",
    "SELECT * FROM tokens LIMIT 3",
    "EXPLAIN SELECT * FROM pair_stats",
)
# No comma: a random cross join of the activations would print millions of rows.
SQL_WORDS = ("SELECT", "FROM", "WHERE", "(", ")", "*", ";", "'", "activations", "tokens", "layer",
             "value", "=", "1", "DROP", "JOIN", "GROUP BY", "ORDER BY", "--", "$x")  # fmt: skip


@SETTINGS
@given(
    text=st.sampled_from(WRITES)
    | st.sampled_from(READS)
    | st.lists(st.sampled_from(SQL_WORDS), max_size=12).map(" ".join)
    | st.text(max_size=60)
)
def test_sql_never_writes_and_reports_errors_in_one_line(home, capsys, text):
    assume("\x00" not in text)  # no command line can carry a NUL byte
    before = file_snapshot(home)
    status, _, err = cli(capsys, home, "sql", text)
    assert status in (0, 2), err
    if status == 2:
        assert_one_line_error(status, err)
    if text in WRITES:
        assert status == 2
    if text in READS:
        assert status == 0, err
    assert file_snapshot(home) == before, f"the query {text!r} changed the store"
    assert not (home / "leak.csv").exists() and not Path("leak.csv").exists()


def test_sql_refuses_a_layer_out_of_line_with_its_token_table(home, capsys):
    status, _, err = cli(capsys, home, "sql", "SELECT count(*) FROM activations")
    assert_one_line_error(status, err, "layer 7 shard odd", f"{N - 10} token rows", f"has {N}")


# -- the pipeline configuration (featstore extract) -----------------------------------------------

SOURCE_FACTS = {"tiny": ((6, 7, 8, 9), 128), "gpt2-small": ((6, 7, 8, 9), 1024)}  # layers, n_ctx


@st.composite
def extract_inputs(draw) -> dict:
    return {
        "source": draw(st.sampled_from([*SOURCE_FACTS, "gpt3", "Tiny"]) | st.text(max_size=8)),
        "layers": tuple(draw(st.lists(st.integers(-1, 13), max_size=4))),
        "seq_len": draw(st.sampled_from([-1, 1, 2, 128, 129, 1024, 1025]) | st.integers(0, 5000)),
        "batch_size": draw(st.sampled_from([1, 32, 0, -4])),
        "max_sequences": draw(st.none() | st.integers(-2, 10)),
    }


def extract_should_pass(case: dict) -> bool:
    if case["source"] not in SOURCE_FACTS:
        return False
    layers, n_ctx = SOURCE_FACTS[case["source"]]
    return (
        bool(case["layers"])
        and set(case["layers"]) <= set(layers)
        and 2 <= case["seq_len"] <= n_ctx
        and case["batch_size"] >= 1
        and (case["max_sequences"] is None or case["max_sequences"] >= 1)
    )


@SETTINGS
@given(case=extract_inputs())
def test_extract_config_accepts_exactly_what_the_source_can_run(case):
    if extract_should_pass(case):
        assert ExtractConfig(**case).layers == case["layers"]
        return
    with pytest.raises(FeatstoreError) as caught:
        ExtractConfig(**case)
    assert len(str(caught.value).splitlines()) == 1


@SETTINGS
@given(case=extract_inputs())
def test_extract_command_refuses_a_bad_configuration_leaving_the_store(home, capsys, case):
    assume(not extract_should_pass(case))
    args = ["extract", f"--source={case['source']}", f"--seq-len={case['seq_len']}"]
    args += [f"--batch-size={case['batch_size']}", "--shards", "s0"]
    args += ["--layers", *map(str, case["layers"])]  # none: refused, not the default layers
    if case["max_sequences"] is not None:
        args.append(f"--max-sequences={case['max_sequences']}")
    before = file_snapshot(home)
    status, _, err = cli(capsys, home, *args)
    refused_and_unchanged(status, err, home, before)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        pytest.param({"source": "nope"}, ["unknown source 'nope'", "tiny"], id="source"),
        pytest.param({"layers": (6, 12)}, ["no SAE for layer(s) [12]"], id="layers"),
        pytest.param({"seq_len": 129}, ["129", "context of 128"], id="context"),
    ],
)
def test_extract_config_names_the_problem(config, words):
    with pytest.raises(FeatstoreError) as caught:
        ExtractConfig(**config)
    for word in words:
        assert word in str(caught.value)


# -- a few real processes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        pytest.param(["ingest", "missing.npz", "--layer", "6", "--shard", "s9"], ["no such file"],
                     id="ingest"),
        pytest.param(["stats", "--layer-a", "6", "--layer-b", "5", "--out", "o.parquet"],
                     ["layer 5 not in store"], id="stats"),
        pytest.param(["sql", "DROP VIEW tokens"], ["read-only"], id="sql"),
        pytest.param(["extract", "--source", "gpt3"], ["unknown source"], id="extract"),
        pytest.param(["extract", "--shards", "no-such-text"], ["no-such-text"], id="no-text"),
    ],
)  # fmt: skip
def test_the_installed_command_answers_bad_input_in_one_line(home, tmp_path, args, words):
    before = file_snapshot(home)
    done = subprocess.run(
        [str(FEATSTORE), "--home", str(home), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    refused_and_unchanged(done.returncode, done.stderr, home, before)
    for word in words:
        assert word in done.stderr
