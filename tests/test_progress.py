"""Progress of long steps: one line at most every few seconds, and always at the last step."""

from __future__ import annotations

from helpers import build_store, sparse_acts

from featstore.progress import Ticker
from featstore.stats.query import PairQuery, pair_blocks


def test_the_ticker_reports_the_last_step_and_stays_quiet_between():
    lines: list[str] = []
    ticker = Ticker(lines.append, "work", 10, every=3600)
    for _ in range(9):
        ticker.step()
    assert lines == []  # within the interval: nothing
    ticker.step()
    assert len(lines) == 1 and lines[0].startswith("work: 10/10")
    Ticker(None, "silent", 1).step()  # no callback: nothing to call


def test_every_step_reports_with_an_interval_of_zero():
    lines: list[str] = []
    ticker = Ticker(lines.append, "layers", 3, every=0)
    for k in range(3):
        ticker.step(note=f" (layer {k})")
    assert [line.split(" (")[0] for line in lines] == ["layers: 1/3", "layers: 2/3", "layers: 3/3"]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_pair_statistics_report_the_features_of_layer_a_done(tmp_path):
    d = 30
    acts = {6: {"s0": sparse_acts(200, d, 0.2, 1)}, 7: {"s0": sparse_acts(200, 20, 0.2, 2)}}
    store = build_store(tmp_path / "home", acts)
    lines: list[str] = []
    query = PairQuery(6, 7, max_block_pairs=50)  # several blocks of layer 6's features
    rows = sum(frame.height for frame, _ in pair_blocks(store, query, progress=lines.append))
    assert rows > 0
    assert lines and lines[-1].startswith(f"pair statistics 6-7: {d}/{d} features of layer a")
