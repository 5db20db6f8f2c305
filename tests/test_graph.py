"""The feature graph: edges equal a direct filter of the pair statistics; exports round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, correlated_layers, dense_pair_frames
from polars.testing import assert_frame_equal

from featstore.analysis.graph import (
    build_graph,
    edge_list,
    graph_summary,
    strongest_subgraph,
    write_edge_list,
    write_graphml,
)
from featstore.cli import main
from featstore.errors import FeatstoreError

LAYERS = (6, 7, 8, 9)
STATS = ["n_tokens", "n_both", "n_either", "sum_xy", "pearson", "agreement", "jaccard"]


@pytest.fixture(scope="module")
def frames() -> dict[tuple[int, int], pl.DataFrame]:
    acts = correlated_layers(LAYERS, d=24)
    acts[7][:, 23] = 1.0  # a constant feature: co-active with everything, Pearson NaN
    return dense_pair_frames(acts)


def expected_edges(frames, metric: str, threshold: float) -> pl.DataFrame:
    """The reference: rows passing the threshold by numpy, with the layers as columns."""
    parts = []
    for (a, b), frame in frames.items():
        values = frame[metric].to_numpy()
        keep = np.isfinite(values) & (values >= threshold)
        parts.append(
            frame.filter(pl.Series(keep)).with_columns(
                layer_a=pl.lit(a, pl.Int64), layer_b=pl.lit(b, pl.Int64)
            )
        )
    out = pl.concat(parts).select("layer_a", "feature_a", "layer_b", "feature_b", *STATS)
    return out.sort("layer_a", "feature_a", "layer_b", "feature_b")


@pytest.mark.parametrize(
    ("metric", "threshold"),
    [
        pytest.param("pearson", 0.2, id="pearson"),
        pytest.param("pearson", -0.05, id="pearson-negative"),
        pytest.param("agreement", 0.8, id="agreement"),
        pytest.param("jaccard", 0.1, id="jaccard"),
    ],
)
def test_edges_are_the_rows_reaching_the_threshold(frames, metric, threshold):
    graph = build_graph(frames, metric=metric, threshold=threshold)
    expected = expected_edges(frames, metric, threshold)
    assert graph.number_of_edges() == expected.height > 0
    for a, b, n in expected.group_by("layer_a", "layer_b").len().iter_rows():
        got = [(u, v) for u, v in graph.edges if u.startswith(f"L{a}:") and v.startswith(f"L{b}:")]
        assert len(got) == n
    for row in expected.iter_rows(named=True):
        u, v = f"L{row['layer_a']}:{row['feature_a']}", f"L{row['layer_b']}:{row['feature_b']}"
        assert graph.nodes[u] == {"layer": row["layer_a"], "feature": row["feature_a"]}
        assert graph.nodes[v] == {"layer": row["layer_b"], "feature": row["feature_b"]}
        expected = {k: row[k] for k in STATS if row[k] is not None}
        assert graph.edges[u, v] == pytest.approx(expected, rel=0)


@pytest.mark.parametrize("missing", [None, float("nan")], ids=["null", "nan"])
def test_null_or_nan_pearson_never_makes_an_edge(frames, missing):
    if missing is not None:
        frames = {
            k: f.with_columns(pl.col("pearson").fill_null(missing)) for k, f in frames.items()
        }
    flat = frames[(7, 8)].filter(pl.col("pearson").is_null() | pl.col("pearson").is_nan())
    assert flat.height == 24  # feature 23 of layer 7 against every feature of layer 8
    graph = build_graph(frames, metric="pearson", threshold=-1.0)
    assert not any(graph.has_edge("L7:23", f"L8:{f}") for f in flat["feature_b"])
    assert graph.number_of_edges() == sum(f.height for f in frames.values()) - 2 * 24


def test_an_edge_without_pearson_leaves_the_attribute_out(frames, tmp_path: Path):
    graph = build_graph(frames, metric="jaccard", threshold=0.0)
    assert "pearson" not in graph.edges["L7:23", "L8:0"]
    back = nx.read_graphml(write_graphml(graph, tmp_path / "g.graphml"))
    assert "pearson" not in back.edges["L7:23", "L8:0"]
    edges = edge_list(graph)
    assert edges.filter(pl.col("pearson").is_null()).height == 48


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"metric": "cosinus"}, "use one of pearson, agreement, jaccard", id="metric"),
        pytest.param({"metric": "jaccard", "threshold": -0.1}, "[0.0, 1.0]", id="range"),
        pytest.param({"threshold": float("nan")}, "[-1.0, 1.0]", id="nan"),
    ],
)
def test_bad_metric_or_threshold_is_a_one_line_error(frames, kwargs, message):
    with pytest.raises(FeatstoreError) as info:
        build_graph(frames, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_frames_missing_columns_or_reversed_layers_are_rejected(frames):
    with pytest.raises(FeatstoreError, match="6-7 lack column"):
        build_graph({(6, 7): frames[(6, 7)].drop("jaccard")}, metric="jaccard")
    with pytest.raises(FeatstoreError, match="first layer must be below"):
        build_graph({(7, 6): frames[(6, 7)]})


def test_graphml_round_trip(frames, tmp_path: Path):
    graph = build_graph(frames, metric="pearson", threshold=0.1)
    path = write_graphml(graph, tmp_path / "out" / "graph.graphml")
    back = nx.read_graphml(path)
    assert isinstance(back, nx.DiGraph)
    assert {k: back.graph[k] for k in ("metric", "threshold")} == graph.graph
    assert dict(back.nodes(data=True)) == dict(graph.nodes(data=True))
    assert set(back.edges) == set(graph.edges)
    for u, v, attrs in graph.edges(data=True):
        assert back.edges[u, v] == pytest.approx(attrs, rel=1e-12)


def test_parquet_edge_list_equals_the_filter(frames, tmp_path: Path):
    graph = build_graph(frames, metric="jaccard", threshold=0.15)
    path = write_edge_list(graph, tmp_path / "edges.parquet")
    assert_frame_equal(pl.read_parquet(path), expected_edges(frames, "jaccard", 0.15))


def test_empty_graph_keeps_the_edge_schema(frames, tmp_path: Path):
    graph = build_graph(frames, metric="pearson", threshold=1.0)
    assert graph.number_of_edges() == 0
    back = pl.read_parquet(write_edge_list(graph, tmp_path / "edges.parquet"))
    assert back.height == 0
    assert back.columns == ["layer_a", "feature_a", "layer_b", "feature_b", *STATS]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(frames, tmp_path: Path):
    path = write_graphml(build_graph(frames), tmp_path / "graph.graphml")
    before = path.read_bytes()
    bad = build_graph(frames)
    bad.graph["unwritable"] = [1, 2]  # GraphML has no list type
    with pytest.raises(Exception, match="GraphML"):
        write_graphml(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["graph.graphml"]


def test_summary_matches_direct_computation(frames):
    threshold = 0.1
    graph = build_graph(frames, metric="pearson", threshold=threshold)
    d_sae = dict.fromkeys(LAYERS, 24)
    active = {6: 24, 7: 20, 8: 24, 9: 24}
    summary = graph_summary(graph, list(LAYERS), d_sae, active)
    json.dumps(summary)  # usable as Dagster metadata

    edges = expected_edges(frames, "pearson", threshold)
    assert summary["edges"] == edges.height
    for (a, b), frame in frames.items():
        values = frame["pearson"].to_numpy()
        keep = np.isfinite(values) & (values >= threshold)
        assert summary["edges_per_pair"][f"{a}-{b}"] == keep.sum()
        starts = np.unique(frame["feature_a"].to_numpy()[keep])
        succ = summary["successors"][str(a)]
        assert (succ["next_layer"], succ["with_successor"]) == (b, starts.size)
        assert succ["share_of_d_sae"] == pytest.approx(starts.size / 24)
        assert succ["share_of_active"] == pytest.approx(starts.size / active[a])
        _, out_deg = np.unique(frame["feature_a"].to_numpy()[keep], return_counts=True)
        out = summary["out_degree"][str(a)]
        assert (out["nodes"], out["max"]) == (out_deg.size, out_deg.max())
        assert out["mean"] == pytest.approx(out_deg.mean())
        assert out["quantiles"]["p90"] == pytest.approx(np.quantile(out_deg, 0.9))
        assert sum(out["histogram"].values()) == out_deg.size
        assert out["histogram"].get("1", 0) == (out_deg == 1).sum()
        _, in_deg = np.unique(frame["feature_b"].to_numpy()[keep], return_counts=True)
        assert summary["in_degree"][str(b)]["nodes"] == in_deg.size
    assert "9" not in summary["successors"]
    assert summary["out_degree"]["9"]["nodes"] == 0


def test_summary_without_active_counts_leaves_that_share_empty(frames):
    summary = graph_summary(build_graph(frames), LAYERS, dict.fromkeys(LAYERS, 24))
    assert summary["successors"]["6"]["share_of_active"] is None


def test_strongest_subgraph_keeps_the_largest_edges(frames):
    graph = build_graph(frames, metric="pearson", threshold=0.05)
    edges = edge_list(graph)
    order = np.argsort(-np.abs(edges["pearson"].to_numpy()), kind="stable")[:10]
    expected = {
        (f"L{r['layer_a']}:{r['feature_a']}", f"L{r['layer_b']}:{r['feature_b']}")
        for r in edges[order].iter_rows(named=True)
    }
    sub = strongest_subgraph(graph, 10)
    assert set(sub.edges) == expected
    assert sub.graph["metric"] == "pearson"
    assert strongest_subgraph(graph, 10**6).number_of_edges() == graph.number_of_edges()


def test_graph_command_matches_numpy_correlations(tmp_path: Path):
    acts = {k: x.astype(np.float32) for k, x in correlated_layers((6, 7, 8), d=32).items()}
    halves = {
        k: {"s0": sp.csr_matrix(x[:150]), "s1": sp.csr_matrix(x[150:])} for k, x in acts.items()
    }
    build_store(tmp_path / "home", halves)
    out = tmp_path / "out"
    argv = ["--home", str(tmp_path / "home"), "graph", "--layers", "6", "7", "8", "--out", str(out)]
    assert main(argv) == 0

    edges = pl.read_parquet(out / "edges.parquet")
    for a, b in [(6, 7), (7, 8)]:
        r = np.corrcoef(acts[a], acts[b], rowvar=False)[:32, 32:]
        got = edges.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))
        clear = np.abs(r - 0.2) > 1e-6  # pairs not on the threshold within rounding
        expected = {(i, j) for i, j in zip(*np.nonzero((r >= 0.2) & clear), strict=True)}
        pairs = {(i, j) for i, j in got.select("feature_a", "feature_b").iter_rows() if clear[i, j]}
        assert pairs == expected
        np.testing.assert_allclose(got["pearson"], r[got["feature_a"], got["feature_b"]], atol=1e-6)
    graph = nx.read_graphml(out / "graph.graphml")
    assert graph.number_of_edges() == edges.height
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edges"] == edges.height
    active = int((acts[6] > 0).any(axis=0).sum())
    assert summary["successors"]["6"]["active"] == active
    assert (
        summary["successors"]["6"]["with_successor"]
        == edges.filter(pl.col("layer_a") == 6)["feature_a"].n_unique()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--layers", "6"], "at least two layers", id="one-layer"),
        pytest.param(["--layers", "6", "12"], "layer 12", id="missing-layer"),
        pytest.param(["--threshold", "2"], "[-1.0, 1.0]", id="threshold"),
        pytest.param(["--metric", "cosinus"], "unknown metric 'cosinus'", id="metric"),
    ],
)
def test_graph_command_reports_bad_input_in_one_line(tmp_path: Path, capsys, args, message):
    acts = correlated_layers((6, 7), d=8, n_tokens=50)
    build_store(tmp_path / "home", {k: {"s0": sp.csr_matrix(x)} for k, x in acts.items()})
    argv = ["--home", str(tmp_path / "home"), "graph", *args, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# -- the edge table: written block by block, GraphML streamed from it ----------------------------


@pytest.fixture(scope="module")
def graph_store(tmp_path_factory):
    """Three layers of correlated features in two shards; the dense activations for numpy."""
    acts = {k: x.astype(np.float32) for k, x in correlated_layers((6, 7, 8), d=32).items()}
    halves = {
        k: {"s0": sp.csr_matrix(x[:150]), "s1": sp.csr_matrix(x[150:])} for k, x in acts.items()
    }
    return build_store(tmp_path_factory.mktemp("graph") / "home", halves), acts


def small_blocks(monkeypatch):
    """Statistics in blocks of at most 40 pairs, so that the table is written in many blocks."""
    import functools

    from featstore.analysis import graph as fgraph
    from featstore.files import write_parquet_frames

    blocks = []
    monkeypatch.setattr(fgraph, "PairQuery", functools.partial(fgraph.PairQuery,
                                                                max_block_pairs=40))  # fmt: skip

    def counting(frames, *args, **kwargs):
        def seen():
            for frame in frames:
                blocks.append(frame.height)
                yield frame

        return write_parquet_frames(seen(), *args, **kwargs)

    monkeypatch.setattr(fgraph, "write_parquet_frames", counting)
    return blocks


def test_export_writes_the_edge_table_block_by_block_and_graphml_from_it(
    graph_store, tmp_path, monkeypatch
):
    from featstore.analysis.graph import export_graph, graph_settings, store_pair_frames

    store, acts = graph_store
    blocks = small_blocks(monkeypatch)
    summary = export_graph(store, tmp_path, layers=[6, 7, 8], threshold=0.1, min_both=2)
    edges = pl.read_parquet(tmp_path / "edges.parquet")
    assert len(blocks) > 2 and sum(blocks) == edges.height > 0  # many blocks, none held together
    # The in-memory reference: networkx's graph of the same frames.
    frames = store_pair_frames(store, [6, 7, 8], metric="pearson", threshold=0.1)
    reference = build_graph(frames, metric="pearson", threshold=0.1, min_both=2)
    assert_frame_equal(edges.sort("layer_a", "feature_a", "layer_b", "feature_b"),
                       edge_list(reference))  # fmt: skip
    # Independent check of the edges: numpy's correlations and co-activity counts.
    for a, b in [(6, 7), (7, 8)]:
        r = np.corrcoef(acts[a], acts[b], rowvar=False)[:32, 32:]
        both = (acts[a] > 0).astype(int).T @ (acts[b] > 0).astype(int)
        clear = np.abs(r - 0.1) > 1e-6
        want = {(i, j) for i, j in zip(*np.nonzero((r >= 0.1) & (both >= 2) & clear), strict=True)}
        got = edges.filter((pl.col("layer_a") == a) & (pl.col("layer_b") == b))
        assert {(i, j) for i, j in got.select("feature_a", "feature_b").iter_rows()
                if clear[i, j]} == want  # fmt: skip
    # GraphML, streamed: networkx reads back exactly the reference graph.
    back = nx.read_graphml(tmp_path / "graph.graphml")
    assert {k: back.graph[k] for k in ("metric", "threshold")} == reference.graph
    assert dict(back.nodes(data=True)) == dict(reference.nodes(data=True))
    assert set(back.edges) == set(reference.edges)
    for u, v, attrs in reference.edges(data=True):
        assert back.edges[u, v] == attrs  # exact: numbers are written in round-trip form
    # Nodes with their degrees, against counts of the edge table by numpy.
    nodes = pl.read_parquet(tmp_path / "nodes.parquet")
    assert nodes["node"].to_list() == [f"L{x}:{f}" for x, f in nodes.select("layer", "feature")
                                       .iter_rows()]  # fmt: skip
    assert set(nodes["node"]) == set(reference.nodes)
    for row in nodes.iter_rows(named=True):
        assert row["out_degree"] == reference.out_degree(row["node"])
        assert row["in_degree"] == reference.in_degree(row["node"])
    # The summary from the table on disk equals the in-memory graph's.
    expected = graph_summary(reference, [6, 7, 8], *fgraph_sizes(store))
    assert {k: summary[k] for k in expected} == expected
    assert summary["graphml"] == {"max_edges": 1_000_000, "edges": edges.height,
                                  "strongest_only": False}  # fmt: skip
    assert graph_settings(tmp_path) == {"metric": "pearson", "threshold": 0.1, "min_both": 2}


def fgraph_sizes(store):
    from featstore.analysis.graph import layer_sizes

    return layer_sizes(store, [6, 7, 8])


def test_graphml_over_the_cap_holds_the_strongest_edges(graph_store, tmp_path, capsys):
    store, _ = graph_store
    argv = ["--home", str(store.home), "graph", "--layers", "6", "7", "8", "--threshold", "0.1",
            "--graphml-max-edges", "7", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "holds the 7 strongest edges" in capsys.readouterr().out
    edges = pl.read_parquet(tmp_path / "edges.parquet")
    assert edges.height > 7
    strongest = np.sort(np.abs(edges["pearson"].to_numpy()))[::-1]
    back = nx.read_graphml(tmp_path / "graph.graphml")
    assert back.number_of_edges() == 7
    kept = sorted((abs(w) for _, _, w in back.edges(data="pearson")), reverse=True)
    np.testing.assert_array_equal(kept, strongest[:7])
    assert set(back.nodes) == {n for e in back.edges for n in e}  # only the kept edges' nodes
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["edges"] == edges.height
    assert summary["graphml"] == {"max_edges": 7, "edges": 7, "strongest_only": True}


def test_an_empty_graph_keeps_its_schema_on_disk(graph_store, tmp_path):
    from featstore.analysis.graph import export_graph, read_edges

    store, _ = graph_store
    summary = export_graph(store, tmp_path, layers=[6, 7], threshold=1.0)
    assert summary["edges"] == 0 and summary["nodes"] == 0
    edges = read_edges(tmp_path).collect()
    assert edges.height == 0 and edges.columns[:4] == ["layer_a", "feature_a", "layer_b",
                                                       "feature_b"]  # fmt: skip
    assert nx.read_graphml(tmp_path / "graph.graphml").number_of_edges() == 0


def test_consumers_read_the_edge_table_lazily(graph_store, tmp_path):
    """Concept traces, erasure's unlinked features and the busiest features give the same from a
    scan of edges.parquet as from the networkx graph."""
    from featstore.analysis.cards import busiest_features
    from featstore.analysis.concepts import successors
    from featstore.analysis.erasure import unlinked
    from featstore.analysis.graph import export_graph, read_edges

    store, _ = graph_store
    export_graph(store, tmp_path, layers=[6, 7, 8], threshold=0.1)
    scan = read_edges(tmp_path)
    graph = nx.read_graphml(tmp_path / "graph.graphml")
    table = pl.read_parquet(tmp_path / "edges.parquet")
    assert busiest_features(scan, 5) == busiest_features(table, 5)
    alive = np.arange(32)
    for layer, other, out in ((6, 7, True), (7, 6, False), (7, 8, True)):
        linked = {graph.nodes[u if out else v]["feature"] for u, v in graph.edges
                  if graph.nodes[u]["layer"] == min(layer, other)
                  and graph.nodes[v]["layer"] == max(layer, other)}  # fmt: skip
        np.testing.assert_array_equal(unlinked(scan, layer, other, alive, out),
                                      sorted(set(range(32)) - linked))  # fmt: skip
    features = [3, 0, 17]
    want: dict[int, int] = {}
    for f in features:
        for v in sorted(graph.successors(f"L6:{f}"), key=lambda n: graph.nodes[n]["feature"]):
            want.setdefault(graph.nodes[v]["feature"], f)
    assert successors(scan, 6, features, 7) == want
