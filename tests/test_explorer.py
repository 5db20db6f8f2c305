"""The feature explorer: what its pages show equals the store (numpy on the dense activations, the
token tables, the pair statistics), corpus text is escaped, bad input is a one-line 4xx, and a
real browser (headless Chromium) renders a feature page, follows a successor link and a search."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import assert_one_line_error, build_store, cli, correlated_layers, table_measures
from test_shifted import reference_rows

from featstore.defaults import MIN_BOTH
from featstore.explorer import app, reads
from featstore.explorer.graphview import neighbourhood
from featstore.explorer.text import esc
from featstore.stats.query import PairQuery, pair_stats
from featstore.stats.shardsums import Variant
from featstore.store import spec
from featstore.store.sql import CAUSAL_EDGES_SCHEMA

VOCAB = [f"w{i}" for i in range(40)]
VOCAB[7] = "<script>alert('x')</script>"
VOCAB[8] = "\u202eevil\u202c"  # right-to-left override
VOCAB[9] = "a\x07b\nc"
SEQ = 8  # build_store's sequence length
SIZES = {"s0": 64, "s1": 56}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    acts = correlated_layers((6, 7, 8), n_tokens=120, d=10, seed=5)
    acts = {k: x.astype(np.float32) for k, x in acts.items()}
    halves = {
        k: {"s0": sp.csr_matrix(x[:64]), "s1": sp.csr_matrix(x[64:])} for k, x in acts.items()
    }
    store = build_store(tmp_path_factory.mktemp("explorer"), halves, vocab=VOCAB)
    for a, b in ((6, 7), (7, 8)):
        pair_stats(store, PairQuery(a, b, save=True))
    concepts = store.home / spec.CONCEPTS_DIR
    concepts.mkdir()
    pl.DataFrame({"concept": ["<b>bold</b>", "digits"], "layer": [7, 8], "feature": [2, 4],
                  "auroc": [0.91, 0.8]}).write_parquet(concepts / reads.CONCEPTS_FILE)  # fmt: skip
    rows = {"layer_a": [7, 7, 6, 7], "feature_a": [2, 2, 1, 3], "layer_b": [8, 8, 7, 8],
            "feature_b": [0, 5, 2, 2], "relative_effect": [0.1, -0.5, None, 0.9]}  # fmt: skip
    empty = pl.from_arrow(CAUSAL_EDGES_SCHEMA.empty_table())
    causal = pl.DataFrame({c: rows.get(c, [None] * 4) for c in empty.columns}).cast(empty.schema)
    (store.home / spec.CAUSAL_DIR).mkdir()
    causal.write_parquet(store.home / spec.CAUSAL_DIR / spec.CAUSAL_EDGES_FILE)
    tokens = np.concatenate([store.tokens(s)["token"].to_numpy() for s in ("s0", "s1")])
    return store, {k: v.astype(np.float64) for k, v in acts.items()}, tokens


def top_rows(x: np.ndarray, n: int) -> np.ndarray:
    order = np.argsort(-x, kind="stable")[:n]
    return order[x[order] > 0]


def test_hits_histogram_and_label_tokens_equal_numpy(setup):
    store, acts, tokens = setup
    ex = reads.Explorer(store)
    for f in range(10):
        x = acts[7][:, f]
        hits = ex.hits(7, f)
        rows = hits.row + np.where(hits.shard == 1, SIZES["s0"], 0)
        np.testing.assert_array_equal(rows, np.flatnonzero(x))
        np.testing.assert_allclose(hits.value, x[rows], rtol=1e-6)
        np.testing.assert_array_equal(hits.token, tokens[rows])
        bins = np.searchsorted(reads.HIST_EDGES, x[x > 0].astype(np.float32), side="right")
        np.testing.assert_array_equal(
            hits.histogram(), np.bincount(bins, minlength=reads.HIST_EDGES.size + 1)
        )
        top = tokens[top_rows(x, reads.LABEL_HITS)]
        ids, counts = np.unique(top, return_counts=True)
        want = sorted(zip(-counts, ids, strict=True))[:5]
        assert ex.top_tokens(7, f) == [(VOCAB[i], -c) for c, i in want]


def test_strongest_is_a_stable_sort_by_value():
    rng = np.random.default_rng(3)
    for _ in range(500):
        values = rng.integers(0, 5, size=rng.integers(0, 30)).astype(np.float32)
        n = int(rng.integers(0, 35))
        want = np.argsort(-values, kind="stable")[:n]
        np.testing.assert_array_equal(reads.strongest(values, min(n, values.size)), want)


def test_feature_view_equals_store(setup):
    store, acts, tokens = setup
    ex = reads.Explorer(store, top=4)
    view = ex.feature(7, 2, "jaccard", n=50)
    x = acts[7][:, 2]
    assert (view.count, view.n_tokens) == (int((x > 0).sum()), 120)
    assert view.total == pytest.approx(x.sum(), rel=1e-6)
    for ctx, r in zip(view.contexts, top_rows(x, 4), strict=True):
        start = r - r % SEQ
        window = np.arange(
            max(r - reads.CONTEXT[0], start), min(r + reads.CONTEXT[1] + 1, start + SEQ)
        )
        assert ctx.texts == [VOCAB[t] for t in tokens[window]]
        np.testing.assert_allclose(ctx.values, x[window], rtol=1e-6)
        assert window[ctx.active] == r and ctx.value == pytest.approx(x[r], rel=1e-6)
    assert list(view.concepts["concept"]) == ["<b>bold</b>"]
    sides = {p.layer: p for p in view.partners}
    assert (sides[6].side, sides[8].side) == ("predecessors", "successors")
    for other, pick in ((6, lambda f: (f, 2)), (8, lambda f: (2, f))):
        a, b = sorted((7, other))
        ref = table_measures(acts[a], acts[b])
        frame = sides[other].frame
        assert sorted(frame["feature"]) == [
            f for f in range(10) if ref["n_both"][pick(f)] >= MIN_BOTH
        ]
        for row in frame.iter_rows(named=True):
            assert row["jaccard"] == pytest.approx(ref["jaccard"][pick(row["feature"])], rel=1e-9)
            assert row["jaccard_lo"] <= row["jaccard"] <= row["jaccard_hi"]
        assert frame["jaccard"].to_list() == sorted(frame["jaccard"], reverse=True)


def null_reference(store, acts, a, b, fa, fb, measure, shifts):
    """`measure` of (a:fa, b:fb) with layer b's rows realigned by each shift, by numpy."""
    values = []
    for k in range(1, shifts + 1):
        perm, start = [], 0
        for shard in ("s0", "s1"):
            t = store.tokens(shard)
            perm.append(start + reference_rows(t["seq"].to_numpy(), t["pos"].to_numpy(), k))
            start += t.height
        y = acts[b][np.concatenate(perm)]
        values.append(table_measures(acts[a][:, [fa]], y[:, [fb]])[measure][0, 0])
    return np.array(values)


@pytest.mark.parametrize("measure", ["pearson", "jaccard"])
def test_partners_against_the_null_model_equal_numpy(setup, measure):
    store, acts, _ = setup
    ex = reads.Explorer(store, null_shifts=6)
    view = ex.feature(7, 2, measure, n=3)
    assert view.partners
    for p in view.partners:
        for row in p.frame.iter_rows(named=True):
            a, b = sorted((7, p.layer))
            fa, fb = (row["feature"], 2) if p.layer < 7 else (2, row["feature"])
            null = null_reference(store, acts, a, b, fa, fb, measure, 6)
            value = table_measures(acts[a][:, [fa]], acts[b][:, [fb]])[measure][0, 0]
            assert row[measure] == pytest.approx(value, rel=1e-9)
            assert row["null_mean"] == pytest.approx(null.mean(), rel=1e-9, abs=1e-12)
            assert row["null_sd"] == pytest.approx(null.std(ddof=1), rel=1e-9, abs=1e-12)
            if null.std() > 0:
                z = (value - null.mean()) / null.std(ddof=1)
                assert row["null_z"] == pytest.approx(z, rel=1e-6)
            assert row["null_p"] == pytest.approx((1 + (null >= value - 1e-12).sum()) / 7)


def test_shift_one_is_the_stores_null_model(setup):
    store, _, _ = setup
    ex = reads.Explorer(store, null_shifts=3)
    hits = ex.hits(7, 2)
    got = ex.null_values(7, 2, hits, 8, list(range(10))).filter(pl.col("shift") == 1)
    want = pair_stats(store, PairQuery(7, 8, features_a=(2, 3), all_pairs=True,
                                       variant=Variant(null=True)))  # fmt: skip
    got, want = (f.sort("feature_b") for f in (got, want))
    assert got["feature_b"].to_list() == want["feature_b"].to_list()
    np.testing.assert_array_equal(got["n_both"], want["n_both"])
    np.testing.assert_allclose(got["sum_xy"], want["sum_xy"], rtol=1e-12)
    np.testing.assert_allclose(got["pearson"], want["pearson"], rtol=1e-9)


def test_causal_effects_of_and_on_the_feature_strongest_first(setup):
    store, _, _ = setup
    frame = reads.Explorer(store).causal(7, 2)
    assert frame.select("layer_a", "feature_a", "feature_b").rows() == [
        (7, 2, 5),
        (7, 2, 0),
        (6, 1, 2),
    ]


def test_search_by_id_token_and_concept(setup):
    store, acts, tokens = setup
    search = reads.Search(reads.Explorer(store))
    assert search("L7:3") == [((7, 3), "feature")] and search("7/3") == [((7, 3), "feature")]
    assert [n for n, _ in search("4")] == [(6, 4), (7, 4), (8, 4)]
    assert search("9:1") == [] and search("7:99") == []
    assert search("BOLD")[0][0] == (7, 2)
    found = search("w5")
    want = sorted((-int(((acts[x][:, f] > 0) & (tokens == 5)).sum()), x, f)
                  for x in (6, 7, 8) for f in range(10))  # fmt: skip
    want = [((x, f), f"active {-n} times on 'w5'") for n, x, f in want if n < 0]
    assert found == want and found


def test_neighbourhood_follows_the_strongest_partners(setup):
    store, acts, _ = setup
    nb = neighbourhood(reads.Explorer(store), 7, 2, "pearson", threshold=0.2, k=2)
    ref = table_measures(acts[7], acts[8])["pearson"][2]
    best = [int(f) for f in np.argsort(-ref)[:2] if ref[f] >= 0.2]
    assert [f for x, f in nb.nodes if x == 8] == best
    assert (nb.edges["pearson"] >= 0.2).all()


def test_pages_escape_corpus_text(setup, tmp_path):
    store, _, _ = setup
    paths = app.export(store, tmp_path / "site", [(7, 2), (8, 4), (6, 1)])
    texts = {p: p.read_text() for p in paths}
    for path, text in texts.items():
        assert "<script>alert" not in text and "\u202e" not in text and "\x07" not in text, path
        assert "<b>bold" not in text
        assert not re.search(r"(src|href|action)=\"?(https?:)?//", text), path
    assert esc("\u202eevil<b>\x07\n") == "\\u202eevil&lt;b&gt;\\u0007⏎"
    for href in re.findall(r'href="([^"]+)"', "".join(texts.values())):
        assert not href.startswith("/")


def test_export_links_resolve(setup, tmp_path):
    store, _, _ = setup
    out = tmp_path / "site"
    paths = app.export(store, out, [(7, 2), (8, 4)])
    for path in paths:
        for href in re.findall(r'href="([^"?]+)', path.read_text()):
            assert (path.parent / href).resolve().is_file(), (path, href)


def test_bad_requests_are_one_line_4xx(setup):
    from starlette.testclient import TestClient

    store, _, _ = setup
    client = TestClient(app.create_app(store))
    ok = client.get("/features/7/2")
    assert ok.status_code == 200 and "default-src 'none'" in ok.headers["content-security-policy"]
    for url, status, needle in [
        ("/features/5/2", 404, "layer 5 not in store"), ("/features/7/10", 404, "outside"),
        ("/features/7/2?measure=drop%20table", 400, "unknown measure"),
        ("/graph/7/2?threshold=nan", 400, "threshold"), ("/features/7/-1", 404, ""),
    ]:  # fmt: skip
        got = client.get(url)
        assert got.status_code == status, url
        assert needle in got.text and "Traceback" not in got.text


def test_concurrent_requests_see_what_one_at_a_time_sees(setup):
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    store, _, _ = setup
    urls = [f"/features/{x}/{f}?measure={m}" for x in (6, 7, 8) for f in (1, 2, 4)
            for m in ("pearson", "jaccard")] + ["/graph/7/2", "/search?q=w5", "/"]  # fmt: skip
    one = TestClient(app.create_app(store))
    want = {u: one.get(u).text for u in urls}
    client = TestClient(app.create_app(store, warm=True))  # warming up while pages are asked
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(urls, pool.map(lambda u: client.get(u).text, urls), strict=True))
    assert got == want


def test_damaged_chunk_is_reported_not_shown_as_zeros(setup, tmp_path):
    from starlette.testclient import TestClient

    store, _, _ = setup
    shutil.copytree(store.home, tmp_path / "home")
    chunks = sorted(
        (tmp_path / "home" / spec.ROOT / "activations" / "layer_7" / "s0" / "data").rglob("c/*")
    )
    chunks[0].write_bytes(b"not a chunk" + chunks[0].read_bytes()[11:])
    from featstore.store.home import open_store

    got = TestClient(app.create_app(open_store(tmp_path / "home"))).get("/features/7/2")
    assert got.status_code == 400 and "layer 7 shard s0" in got.text, got.text
    assert "Traceback" not in got.text and len(got.text.splitlines()) == 1


def test_export_takes_the_measure(setup, capsys, tmp_path):
    store, acts, _ = setup
    status, out, _ = cli(capsys, store.home, "serve", "--export", str(tmp_path / "site"),
                         "--features", "7:2", "--measure", "jaccard")  # fmt: skip
    assert status == 0 and "wrote" in out
    dom = Dom((tmp_path / "site" / "features" / "7" / "2.html").read_text())
    ref = table_measures(acts[7], acts[8])
    succ = [r for r in dom.partner_rows if r["layer"] == 8]
    want = sorted((f for f in range(10) if ref["n_both"][2, f] >= MIN_BOTH),
                  key=lambda f: (-ref["jaccard"][2, f], f))  # fmt: skip
    assert [r["feature"] for r in succ] == want[: len(succ)] and succ
    for r in succ:
        assert r["value"] == pytest.approx(ref["jaccard"][2, r["feature"]], rel=1e-9)
    assert "<option selected>jaccard</option>" in (tmp_path / "site" / "graph" / "7" /
                                                     "2.html").read_text()  # fmt: skip
    status, _, err = cli(capsys, store.home, "serve", "--export", str(tmp_path / "bad"),
                         "--measure", "drop table")  # fmt: skip
    assert_one_line_error(status, err, "unknown measure 'drop table'")
    assert not (tmp_path / "bad").exists()


def test_export_takes_the_null_shifts(setup, capsys, tmp_path):
    store, acts, _ = setup
    status, _, _ = cli(capsys, store.home, "serve", "--export", str(tmp_path / "site"),
                       "--features", "7:2", "--null-shifts", "4")  # fmt: skip
    assert status == 0
    dom = Dom((tmp_path / "site" / "features" / "7" / "2.html").read_text())
    assert "realigned 4 ways" in dom.ids["null-note"]
    row = next(r for r in dom.partner_rows if r["layer"] == 8)
    null = null_reference(store, acts, 7, 8, 2, row["feature"], "pearson", 4)
    assert row["null-mean"] == pytest.approx(null.mean(), rel=1e-9, abs=1e-12)
    for bad in ("1", "-3", "x"):
        status, _, err = cli(capsys, store.home, "serve", "--export", str(tmp_path / "bad"),
                             "--null-shifts", bad)  # fmt: skip
        assert_one_line_error(status, err, "null-shifts")
        assert not (tmp_path / "bad").exists()


def test_cli_refuses_bad_port_and_missing_store(capsys, tmp_path):
    assert_one_line_error(*cli(capsys, tmp_path, "serve", "--port", "70000")[::2], "port")
    status, _, err = cli(capsys, tmp_path / "none", "serve", "--export", str(tmp_path / "o"))
    assert_one_line_error(status, err, "no featstore store")
    assert not (tmp_path / "o").exists()


# -- in a real browser -----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Dom(HTMLParser):
    """Text by id, the rows of tables, links: enough of the rendered DOM to compare."""

    CELLS = ("value", "null-mean", "null-z", "null-p")

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.links: list[str] = []
        self.partner_rows: list[dict] = []
        self.spans: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._open.append((tag, a.get("id")))
        if a.get("id"):
            self.ids[a["id"]] = ""
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "tr" and a.get("class") == "partner":
            self.partner_rows.append(
                {"layer": int(a["data-layer"]), "feature": int(a["data-feature"])}
            )
        if tag == "td" and self.partner_rows and a.get("class") in self.CELLS:
            value = a.get("data-value")
            self.partner_rows[-1][a["class"]] = float(value) if value else None
        if tag == "span" and "data-value" in a:
            self.spans.append("")

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, id_ in self._open:
            if id_:
                self.ids[id_] += data
        if self._open and self._open[-1][0] == "span" and self.spans:
            self.spans[-1] += data


def dump_dom(url: str) -> str:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.stdout


@pytest.fixture(scope="module")
def server(setup):
    store, _, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "featstore.cli",
        "--home",
        str(store.home),
        "serve",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/", timeout=5)
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_shows_the_store(setup, server):
    store, acts, tokens = setup
    x = acts[7][:, 2]
    dom = Dom(dump_dom(f"{server}/features/7/2"))
    assert int(dom.ids["count"]) == int((x > 0).sum()) and int(dom.ids["n_tokens"]) == 120
    assert dom.ids["label"] == "<b>bold</b>"
    rows = top_rows(x, 20)
    start = rows[0] - rows[0] % SEQ
    first = tokens[
        max(rows[0] - reads.CONTEXT[0], start) : min(rows[0] + reads.CONTEXT[1] + 1, start + SEQ)
    ]
    shown = "".join(dom.spans[: len(first)])
    assert shown == "".join(VOCAB[t] for t in first).replace("\u202e", "\\u202e").replace(
        "\u202c", "\\u202c").replace("\x07", "\\u0007").replace("\n", "⏎")  # fmt: skip
    ref = table_measures(acts[7], acts[8])
    succ = [r for r in dom.partner_rows if r["layer"] == 8]
    want = sorted(
        (f for f in range(10) if ref["n_both"][2, f] >= MIN_BOTH),
        key=lambda f: -ref["pearson"][2, f],
    )
    assert [r["feature"] for r in succ] == want[: len(succ)] and succ
    shifts = reads.Explorer(store).ks.size
    for r in succ[:3]:  # each partner against the null model, as numpy computes it
        null = null_reference(store, acts, 7, 8, 2, r["feature"], "pearson", shifts)
        assert r["value"] == pytest.approx(ref["pearson"][2, r["feature"]], rel=1e-9)
        assert r["null-mean"] == pytest.approx(null.mean(), rel=1e-9, abs=1e-12)
        assert r["null-p"] == pytest.approx((1 + (null >= r["value"] - 1e-12).sum()) / (shifts + 1))
    assert "realigned" in dom.ids["null-note"]
    link = next(h for h in dom.links if h.endswith(f"/8/{succ[0]['feature']}"))
    target = urllib.parse.urljoin(f"{server}/features/7/2", link)
    dom8 = Dom(dump_dom(target))
    assert int(dom8.ids["count"]) == int((acts[8][:, succ[0]["feature"]] > 0).sum())
    preds = [r["feature"] for r in dom8.partner_rows if r["layer"] == 7]
    assert 2 in preds
    found = Dom(dump_dom(f"{server}/search?q=bold"))
    assert "L7:2" in found.ids["results"]
    graph = dump_dom(f"{server}/graph/7/2")
    assert 'data-layer="8"' in graph and "<script>alert" not in graph


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_exported_search_runs_in_the_browser(setup, tmp_path):
    store, _, _ = setup
    app.export(store, tmp_path / "site", [(7, 2), (8, 4)])
    found = Dom(dump_dom((tmp_path / "site" / "search.html").as_uri() + "?q=bold"))
    assert found.ids["results"] == "L7:2 <b>bold</b>"
    assert found.links[-1] == "features/7/2.html"
