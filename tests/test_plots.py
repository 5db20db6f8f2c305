"""The plots: each writes a readable PNG; the numbers drawn equal an independent computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, correlated_layers, dense_pair_frames
from matplotlib.image import imread

from featstore.analysis.graph import MIN_BOTH, above, build_graph
from featstore.analysis.plots import (
    block_heatmap,
    cooccurrence_histograms,
    layered_drawing,
    layered_positions,
    pair_matrix,
    plot_numbers,
    threshold_bars,
)
from featstore.cli import main

LAYERS = (6, 7, 8, 9)
CONTEXT = "source test, layers 6-9, threshold 0.2"


@pytest.fixture(scope="module")
def acts() -> dict[int, np.ndarray]:
    return correlated_layers(LAYERS, d=40, n_tokens=300)


@pytest.fixture(scope="module")
def frames(acts):
    return dense_pair_frames(acts, all_pairs=True)


def assert_png(path: Path) -> np.ndarray:
    """A PNG that opens, is of a sensible size and is not a blank page."""
    assert path.suffix == ".png" and path.exists()
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.005 < ink < 0.95
    assert not list(path.parent.glob(".*tmp*"))  # the temporary file was renamed away
    return image


def test_pair_matrix_is_the_correlation_block(acts, frames):
    x, y = acts[6], acts[7]
    reference = np.corrcoef(x[:, :30], y[:, :30], rowvar=False)[:30, 30:]
    np.testing.assert_allclose(pair_matrix(frames[(6, 7)], (0, 30), "pearson"), reference)
    offset = pair_matrix(frames[(6, 7)], (10, 20), "pearson")
    np.testing.assert_allclose(offset, reference[10:20, 10:20])


def test_pair_matrix_leaves_missing_pairs_nan(frames):
    sparse = frames[(6, 7)].filter(above("pearson", 0.2))
    matrix = pair_matrix(sparse, (0, 40), "pearson")
    assert np.isfinite(matrix).sum() == sparse.height


def test_block_heatmap(frames, tmp_path: Path):
    path = block_heatmap(
        frames, tmp_path / "heatmap.png", title_context=CONTEXT, features=(0, 40), threshold=0.2
    )
    image = assert_png(path)
    assert image.shape[1] > 2 * image.shape[0]  # three blocks side by side


@pytest.fixture(scope="module")
def planted(acts):
    """The layers, float32, with a pair seen together once (Pearson 1): no graph edge."""
    x = {k: v.astype(np.float32).astype(np.float64) for k, v in acts.items()}
    for layer in (6, 7):
        x[layer][:, 39] = 0.0
        x[layer][5, 39] = 1.0
    return x


@pytest.fixture(scope="module")
def store(planted, tmp_path_factory):
    # Two shards a layer: the pass adds them as the saved sums would.
    shards = {k: {"s0": sp.csr_matrix(x[:170]), "s1": sp.csr_matrix(x[170:])}
              for k, x in planted.items()}  # fmt: skip
    return build_store(tmp_path_factory.mktemp("plots") / "home", shards)


THRESHOLDS = {"pearson": 0.2, "agreement": 0.8, "jaccard": 0.1}


def test_plot_numbers_equal_numpy_over_every_co_active_pair(store, planted):
    """Histograms, counts above threshold and the strongest edges from the one pass equal numpy
    over the dense table of every pair, co-active pairs only."""
    got = plot_numbers(store, LAYERS, THRESHOLDS, bins=40, n_edges=25)
    x = planted
    frames = dense_pair_frames(x, all_pairs=True)
    on = {k: (v > 0).sum(0) for k, v in x.items()}
    strongest = []
    for (a, b), frame in frames.items():
        co = frame.filter(pl.col("n_both") >= 1)
        for m, (edges, counted) in got.histograms.items():
            values = co[m].to_numpy()
            np.testing.assert_array_equal(counted[(a, b)], np.histogram(values, bins=edges)[0])
            assert counted[(a, b)].sum() == co.height  # no co-active pair outside the bins
        for m, t in THRESHOLDS.items():
            want = co.filter(above(m, t)).height
            assert got.counts.filter((pl.col("layer_a") == a) & (pl.col("metric") == m))[
                "count"].item() == want  # fmt: skip
        # agreement's bins start at the lowest value a co-active pair can take
        n = x[a].shape[0]
        lowest = 1 - (on[a].max() + on[b].max() - 2) / n
        assert got.histograms["agreement"][0][0] <= lowest + 1e-12
        strongest.append(co.filter(above("pearson", 0.2) & (pl.col("n_both") >= MIN_BOTH))
                         .with_columns(layer_a=pl.lit(a), layer_b=pl.lit(b)))  # fmt: skip
    want = pl.concat(strongest).sort(pl.col("pearson").abs(), descending=True)
    assert got.edges.height == 25
    np.testing.assert_allclose(np.sort(got.edges["pearson"].to_numpy()),
                               np.sort(want["pearson"].head(25).to_numpy()), rtol=1e-9)  # fmt: skip
    every = plot_numbers(store, LAYERS, THRESHOLDS, n_edges=10**6).edges
    keys = ["layer_a", "feature_a", "layer_b", "feature_b"]
    assert sorted(every.select(keys).iter_rows()) == sorted(want.select(keys).iter_rows())
    assert (6, 39, 7, 39) not in set(every.select(keys).iter_rows())  # co-active once
    assert got.histograms["jaccard"][0][[0, -1]].tolist() == [0.0, 1.0]


def test_cooccurrence_histograms(store, tmp_path: Path):
    numbers = plot_numbers(store, LAYERS, THRESHOLDS)
    assert_png(
        cooccurrence_histograms(
            numbers.histograms, tmp_path / "hist.png", title_context=CONTEXT,
            thresholds={"jaccard": 0.2},
        )  # fmt: skip
    )


def test_threshold_bars(store, tmp_path: Path):
    counts = plot_numbers(store, LAYERS, THRESHOLDS).counts
    path = threshold_bars(
        counts, tmp_path / "counts.png", title_context=CONTEXT, thresholds=THRESHOLDS
    )
    assert_png(path)


def test_layered_positions_put_layers_in_columns(frames):
    graph = build_graph(frames, threshold=0.2)
    pos = layered_positions(graph)
    assert {pos[n][0] for n in graph} == set(LAYERS)
    for layer in LAYERS:
        heights = [y for n, (x, y) in pos.items() if x == layer]
        assert len(set(heights)) == len(heights)  # no two nodes on top of each other


def test_layered_drawing(frames, tmp_path: Path):
    graph = build_graph(frames, threshold=0.2)
    assert_png(layered_drawing(graph, tmp_path / "graph.png", title_context=CONTEXT, n_edges=30))


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda f, p: block_heatmap({}, p, title_context=CONTEXT), id="heatmap"),
        pytest.param(
            lambda f, p: layered_drawing(build_graph(f, threshold=1.0), p, title_context=CONTEXT),
            id="graph",
        ),
    ],
)
def test_empty_input_still_makes_a_png_saying_so(frames, tmp_path: Path, draw):
    image = imread(draw(frames, tmp_path / "empty.png"))
    assert (image[..., :3] < 0.9).any()


def test_a_chain_through_the_layers_is_drawn_on_one_row():
    frames = {
        (6, 7): pl.DataFrame({"feature_a": [1, 5, 5], "feature_b": [2, 6, 7], "pearson": 0.9}),
        (7, 8): pl.DataFrame({"feature_a": [2], "feature_b": [3], "pearson": 0.9}),
    }
    pos = layered_positions(build_graph(frames))
    assert pos["L6:1"][1] == pos["L7:2"][1] == pos["L8:3"][1]
    assert pos["L7:6"][1] != pos["L7:7"][1]
    assert pos["L6:5"][1] not in {pos["L6:1"][1]}


def test_plots_command_writes_every_figure(acts, tmp_path: Path):
    store = {k: {"s0": sp.csr_matrix(x.astype(np.float32))} for k, x in acts.items()}
    build_store(tmp_path / "home", store)
    out = tmp_path / "out"
    argv = ["--home", str(tmp_path / "home"), "plots", "--features", "0:30", "--out", str(out)]
    assert main(argv) == 0
    names = ["heatmap.png", "cooccurrence.png", "threshold_counts.png", "graph.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert_png(out / name)


def test_plots_command_rejects_a_range_beyond_the_features(acts, tmp_path: Path, capsys):
    store = {k: {"s0": sp.csr_matrix(x)} for k, x in acts.items() if k in (6, 7)}
    build_store(tmp_path / "home", store)
    argv = ["--home", str(tmp_path / "home"), "plots", "--layers", "6", "7"]
    assert main([*argv, "--features", "50:60", "--out", str(tmp_path / "out")]) == 2
    assert "feature range 50:60 is outside 0:40" in capsys.readouterr().err
