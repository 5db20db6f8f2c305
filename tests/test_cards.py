"""Feature cards: numbers equal numpy on the dense data; pages are self-contained and escaped."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, correlated_layers, table_measures, token_frame

from featstore.analysis import cards
from featstore.cli import main
from featstore.errors import FeatstoreError

VOCAB = [f"w{i}" for i in range(40)]
VOCAB[7] = "<script>alert('x')</script>"
VOCAB[8] = " & <b>"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    acts = correlated_layers((6, 7, 8), n_tokens=120, d=10, seed=5)
    acts = {k: x.astype(np.float32).astype(np.float64) for k, x in acts.items()}
    halves = {
        k: {"s0": sp.csr_matrix(x[:64]), "s1": sp.csr_matrix(x[64:])} for k, x in acts.items()
    }
    store = build_store(tmp_path_factory.mktemp("cards"), halves, vocab=VOCAB)
    tokens = np.concatenate([token_frame(64, seed=0)["token"], token_frame(56, seed=1)["token"]])
    return store, acts, tokens


def test_card_numbers_match_numpy(setup):
    store, acts, tokens = setup
    card = cards.feature_card(store, 7, 2, top=4, partners=50, min_both=2)
    x = acts[7][:, 2]
    assert (card.n_tokens, card.count) == (120, int((x > 0).sum()))
    assert card.frequency == pytest.approx(np.mean(x > 0))
    assert card.mean_active == pytest.approx(x[x > 0].mean(), rel=1e-6)
    order = np.argsort(-x, kind="stable")[:4]
    np.testing.assert_allclose(card.contexts["value"], x[order], rtol=1e-6)
    for r, row in zip(order, card.contexts.iter_rows(named=True), strict=True):
        seq_start = r - r % 8  # build_store's sequences: 8 tokens, shards 64 and 56 rows
        lo = max(r - 5, seq_start)
        assert row["before"] == "".join(VOCAB[t] for t in tokens[lo:r])
        assert row["token"] == VOCAB[tokens[r]]
        assert row["after"] == "".join(VOCAB[t] for t in tokens[r + 1 : min(r + 3, seq_start + 8)])
    for frame, (a, b), side in ((card.predecessors, (6, 7), 1), (card.successors, (7, 8), 0)):
        ref = table_measures(acts[a], acts[b])
        pick = (lambda f: (f, 2)) if side else (lambda f: (2, f))  # noqa: E731
        partners = [f for f in range(10) if ref["n_both"][pick(f)] >= 2]
        assert sorted(frame["feature"]) == partners and set(frame["layer"]) == {a if side else b}
        for row in frame.iter_rows(named=True):
            for m in ("pearson", "sufficiency", "necessity", "mutual_information", "jaccard"):
                assert row[m] == pytest.approx(ref[m][pick(row["feature"])], rel=1e-9), m
            assert row["pearson_lo"] <= row["pearson"] <= row["pearson_hi"]
        assert frame["pearson"].to_list() == sorted(frame["pearson"], reverse=True)


def test_cards_of_many_features_equal_single_cards(setup):
    store, _, _ = setup
    keys = [(8, 1), (6, 3), (8, 0)]
    many = cards.feature_cards(store, keys, top=3)
    for key, card in zip(keys, many, strict=True):
        one = cards.feature_card(store, *key, top=3)
        assert card.contexts.equals(one.contexts)
        assert card.successors.equals(one.successors) and card.predecessors.equals(one.predecessors)
    assert many[1].predecessors.width == 0  # layer 6 is the store's first


def test_html_is_escaped_and_links_to_written_cards(setup, tmp_path):
    store, _, _ = setup
    edges = pl.DataFrame({"layer_a": [6, 6, 7], "feature_a": [1, 1, 2],
                          "layer_b": [7, 7, 8], "feature_b": [2, 3, 2]})  # fmt: skip
    keys = cards.busiest_features(edges, 2)
    assert keys == [(6, 1), (7, 2)]
    paths = cards.write_cards(store, keys, tmp_path / "cards", top=50)
    page = (tmp_path / "cards" / "L7_2.html").read_text()
    assert "<script>" not in page
    assert 'href="L6_1.html"' in page  # a predecessor that has its own card
    assert paths[0].name == "index.html" and 'href="L7_2.html"' in paths[0].read_text()


def test_every_text_of_a_page_is_escaped():
    texts = {"before": [VOCAB[7]], "token": [VOCAB[8]], "after": ["\n\"'"]}
    contexts = pl.DataFrame({"shard": ["<s>"], "seq": [0], "pos": [1], "value": [2.0], **texts})
    partners = pl.DataFrame({"layer": [6], "feature": [1], "pearson": [0.5]})
    card = cards.FeatureCard(7, 2, 10, 1, 2.0, contexts, partners, partners.clear())
    page = cards.card_html(card)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script>" not in page
    assert "<mark> &amp; &lt;b&gt;</mark>" in page and "&lt;s&gt;" in page
    assert "<p>none</p>" in page  # no successors


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(setup, tmp_path):
    store, acts, _ = setup
    card = cards.feature_card(store, 7, 2, top=3)
    path = tmp_path / "card.html"
    path.write_text(cards.card_html(card), encoding="utf-8")
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "<h1>Feature L7:2</h1>" in dom
    assert f"active on {int((acts[7][:, 2] > 0).sum())} of 120 tokens" in dom
    assert dom.count("<mark>") == 3 and "<script>alert" not in dom
    assert "Predecessors" in dom and "Successors" in dom


def test_feature_command_prints_the_card(setup, tmp_path, capsys):
    store, acts, _ = setup
    html = tmp_path / "f.html"
    assert (
        main(["--home", str(store.home), "feature", "8:4", "--top", "2", "--html", str(html)]) == 0
    )
    out = capsys.readouterr().out
    assert "feature 4 of layer 8" in out and f"active on {int((acts[8][:, 4] > 0).sum())}" in out
    assert "successors:\n(none)" in out and html.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    "key, extra, message",
    [
        ("7", [], "LAYER:ID"),
        ("7:x", [], "LAYER:ID"),
        ("5:1", [], "layer 5 not in store"),
        ("7:10", [], "feature 10 outside"),
        ("7:1", ["--sort-by", "decoder_cosine"], "data measure"),
    ],
)
def test_feature_command_bad_input_is_one_line(setup, capsys, key, extra, message):
    store, _, _ = setup
    assert main(["--home", str(store.home), "feature", key, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parse_key():
    assert cards.parse_key("9:24575") == (9, 24575)
    with pytest.raises(FeatstoreError):
        cards.parse_key("a:b")
