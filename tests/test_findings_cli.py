"""`featstore findings` and `featstore convergence` through the CLI on a store written by
`featstore synth` with planted structure: what they write, that it recovers the planted chains
and gates (also at GPT-2's 24,576 features), and one-line refusals that write nothing."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from featstore.analysis import vanishing
from featstore.cli import main
from featstore.store.home import open_store

SYNTH = ["--tokens", "3000", "--d-sae", "256", "--layers", "6", "7", "8", "--shards", "2",
         "--planted", "16", "--l0", "12", "--seed", "3", "--chains", "6", "--gates", "4",
         "--vanishing", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli") / "home"
    assert main(["--home", str(home), "synth", *SYNTH]) == 0
    return home


def planted(home, kind: str) -> pl.DataFrame:
    frame = pl.read_parquet(home / "synthetic" / "structures.parquet")
    return frame.filter(pl.col("kind") == kind)


def links(frame: pl.DataFrame) -> set:
    return set(frame.select("layer_a", "feature_a", "layer_b", "feature_b").iter_rows())


def assert_chains_found(home, found: pl.DataFrame, rare: int = 0) -> None:
    """Every planted chain link is found; any other link is an OR gate's parent and child (a
    child whose other parent rarely fires is that parent's near copy: Pearson >= 0.95) or, with
    `rare`, joins features active on fewer than `rare` tokens (two rare features sharing their
    few tokens by chance: a finite-sample link the null model shows too)."""
    want, got = links(planted(home, "pass")), links(found)
    assert want <= got
    store = open_store(home)
    count = {layer: sum(store.feature_stats(layer, s).count for s in store.shards(layer))
             for layer in store.layers()}  # fmt: skip
    for la, fa, lb, fb in got - want - links(planted(home, "or")):
        assert min(count[la][fa], count[lb][fb]) < rare, (la, fa, lb, fb)


def gate_set(frame: pl.DataFrame) -> set:
    return set(frame.select("layer_b", "kind", "feature_b", "parent_1", "parent_2").iter_rows())


def planted_gates(home) -> set:
    frame = pl.read_parquet(home / "synthetic" / "structures.parquet")
    two = (
        frame.filter(pl.col("kind").is_in(["and", "or"]))
        .group_by("layer_b", "kind", "feature_b")
        .agg(parent_1=pl.col("feature_a").min(), parent_2=pl.col("feature_a").max())
    )
    return gate_set(two)


def test_synth_plants_what_its_flags_ask(home):
    assert planted(home, "pass").height == 6 * 2  # six chains through three layers
    assert planted(home, "and")["feature_b"].n_unique() == 4 * 2
    assert planted(home, "vanishing").height == 5 * 2


def test_findings_command_writes_the_table_page_and_tables(home, capsys):
    assert main(["--home", str(home), "findings", "--n-boot", "100"]) == 0
    out = home / "findings"
    printed = capsys.readouterr().out
    assert "C3" in printed and "supported" in printed and f"to {out}" in printed
    table = pl.read_parquet(out / "findings.parquet")
    assert table["conjecture"].to_list() == ["C1", "C1", "C2", "C3", "C3", "C3a"]
    assert table["source"].unique().to_list() == ["synthetic"]
    assert_chains_found(home, pl.read_parquet(out / "pass_through.parquet"))
    assert gate_set(pl.read_parquet(out / "gates.parquet")) == planted_gates(home)
    curve = pl.read_parquet(out / "c3_distance.parquet")
    assert curve.filter(pl.col("start") == "all")["distance"].to_list() == [1, 2]
    for name in ("findings.md", "c3_distance.png", "c1.png", "convergence.parquet"):
        assert (out / name).stat().st_size > 100


def test_convergence_command(home, tmp_path, capsys):
    out = tmp_path / "conv"
    args = ["--home", str(home), "convergence", "--min", "jaccard=0.3", "--min", "pearson=0.4",
            "--fractions", "0.5", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    frame = pl.read_parquet(out / "convergence.parquet")
    assert frame.height == 2 * 2 * 2  # layer pairs x measures x prefixes
    assert set(frame["measure"]) == {"jaccard", "pearson"}
    assert (frame.filter(pl.col("shards") == 2)["recovered"] == 1.0).all()
    assert "convergence.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["findings", "--layers", "6"], "two or more increasing layers"),
        (["findings", "--layers", "6", "12"], "not in the store"),
        (["findings", "--n-boot", "5"], "n_boot must be at least 100"),
        (["findings", "--shards", "synth-000", "nope"], "no shard nope"),
        (["findings", "--vanishing-necessity", "2"], "vanishing_necessity"),
        (["findings", "--max-distance", "0"], "max_distance must be at least 1"),
        (["findings", "--gate-threshold", "0"], "gate_threshold"),
        (["findings", "--n-boot", "x"], "invalid int value"),
        (["findings", "--model"], "synthetic"),
        (["findings", "--out", ""], "expected a path"),
        (["convergence", "--min", "pmi=1"], "not 'pmi'"),
        (["convergence", "--min", "jaccard"], "expected MEASURE=VALUE"),
        (["convergence", "--fractions", "0"], "fractions must be in (0, 1]"),
        (["convergence", "--min-both", "-1"], "min_both must be non-negative"),
        (["convergence", "--layers", "6"], "two or more layers"),
        (["convergence", "--shards", "nope"], "nope"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(home, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    extra = [] if "--out" in args else ["--out", str(out)]
    assert main(["--home", str(home), *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featstore: error:") and err.count("\n") == 1 and words in err
    assert not out.exists()


def test_an_out_path_that_is_a_file_or_link_is_refused(home, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("keep")
    for name in ("link", "file"):
        args = ["--home", str(home), "convergence", "--min", "jaccard=0.3", "--out",
                str(tmp_path / name)]  # fmt: skip
        assert main(args) == 2
        assert "is not a folder" in capsys.readouterr().err
    assert list(target.iterdir()) == [] and (tmp_path / "file").read_text() == "keep"


@pytest.mark.slow  # ~30 s on the shared machine
def test_planted_structure_is_recovered_at_24576_features(tmp_path, capsys):
    """GPT-2 small's width (the synth default), few tokens: chains, gates, vanishing features."""
    home = tmp_path / "wide"
    synth = ["--home", str(home), "synth", "--tokens", "4000", "--layers", "6", "7", "8",
             "--shards", "2", "--chains", "12", "--gates", "6", "--vanishing", "12"]  # fmt: skip
    assert main(synth) == 0
    assert open_store(home).info(6, "synth-000")["shape"][1] == 24576
    assert main(["--home", str(home), "findings", "--n-boot", "100"]) == 0
    out = home / "findings"
    assert_chains_found(home, pl.read_parquet(out / "pass_through.parquet"), rare=20)
    assert gate_set(pl.read_parquet(out / "gates.parquet")) == planted_gates(home)
    gone = pl.read_parquet(out / "vanishing.parquet")
    want = set(planted(home, "vanishing").select("layer_a", "feature_a").iter_rows())
    missed = want - set(gone.select("layer", "feature").iter_rows())
    assert len(missed) <= len(want) // 4  # at 8,000 tokens, chance hides a few (below)
    store = open_store(home)
    for layer, feature in missed:  # followed only by a rare feature sharing its few tokens
        best = vanishing.best_successor(store, layer, layer + 1)
        successor = best.filter(pl.col("feature") == feature)["successor"][0]
        rare = sum(store.feature_stats(layer + 1, s).count[successor] for s in store.shards(6))
        assert rare < 20
    table = pl.read_parquet(out / "findings.parquet")
    verdicts = dict(zip(table["statistic"].str.slice(0, 24), table["verdict"], strict=True))
    assert [v for k, v in verdicts.items() if k.startswith("share of later")] == ["supported"]
    assert [v for k, v in verdicts.items() if k.startswith("share of features")] == ["supported"]
    conv = pl.read_parquet(out / "convergence.parquet")
    assert np.all(conv.filter(pl.col("shards") == 2)["recovered"].to_numpy() == 1.0)
