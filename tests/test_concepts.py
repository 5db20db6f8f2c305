"""Concepts: labels follow their rules character by character; scores equal scipy's
Mann-Whitney AUROC; traces follow the feature graph."""

from __future__ import annotations

import networkx as nx
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import (
    SMALL_VOCAB,
    model_store,
    one_torch_thread,
    random_model,
    random_saes,
    random_tokens,
)
from matplotlib.image import imread
from scipy.stats import mannwhitneyu

from featstore.analysis.concepts import (
    best_features,
    concept_scores,
    default_set,
    load_concepts,
    run_concepts,
    score_store,
    token_labels,
    trace_concept,
)
from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.names import node_id
from featstore.sources.extract import ExtractConfig, extract_shard
from featstore.sources.registry import get_source
from featstore.store.home import open_store


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize("name", ["python", "english"])
def test_shipped_concept_sets_load(name):
    concepts = load_concepts(name)
    assert len(concepts) >= 10
    assert all(c.description for c in concepts)


def test_default_sets_follow_the_sources():
    assert default_set("tiny") == "python"
    assert default_set("gpt2-small") == "english"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("concepts:\n  x: {token: '(', }\n", "bad regular expression", id="regex"),
        pytest.param("concepts:\n  x: {token: a, span: b}\n", "exactly one", id="two-rules"),
        pytest.param("concepts: []\n", "non-empty", id="empty"),
        pytest.param("concepts: [\n", "not valid YAML", id="yaml"),
    ],
)
def test_bad_concept_files_fail_in_one_line(tmp_path, text, problem):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(FeatstoreError, match=problem) as info:
        load_concepts(path)
    assert "\n" not in str(info.value) and "mine.yaml" in str(info.value)


def reference_labels(concepts, vocab, sequences) -> np.ndarray:
    """Character by character: a span concept marks the characters inside its matches."""
    out = []
    for seq in sequences:
        texts = [vocab[t] for t in seq]
        text = "".join(texts)
        cols = []
        for c in concepts:
            if c.rule == "token":
                cols.append([bool(c.pattern.search(t)) for t in texts])
                continue
            inside = np.zeros(len(text), bool)
            for m in c.pattern.finditer(text):
                inside[m.start() : m.end()] = True
            bounds = np.cumsum([0] + [len(t) for t in texts])
            cols.append([inside[a:b].any() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        out.append(np.array(cols).T)
    return np.concatenate(out)


def test_labels_equal_a_character_level_reference():
    concepts = load_concepts("python")
    sequences = random_tokens(n_seq=20, seq_len=24, seed=3)
    got = token_labels(concepts, SMALL_VOCAB, sequences)
    np.testing.assert_array_equal(got, reference_labels(concepts, SMALL_VOCAB, sequences))
    assert got.any(0).sum() >= 10  # most concepts occur in the small vocabulary


def test_string_and_comment_spans_on_a_readable_line():
    vocab = ["x", " =", " '", "a b", "'", " #", " note", "\n", "    ", "y"]
    concepts = {c.name: k for k, c in enumerate(load_concepts("python"))}
    labels = token_labels(load_concepts("python"), vocab, np.arange(10)[None, :])
    assert labels[:, concepts["string"]].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert labels[:, concepts["comment"]].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert labels[:, concepts["indentation"]].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]


def test_scores_equal_mann_whitney_and_counts():
    rng = np.random.default_rng(0)
    n, d, c = 300, 12, 3
    dense = rng.integers(0, 4, (n, d)) * (rng.random((n, d)) < 0.3)  # many tied values
    dense[:, 5] = 0  # a feature that never fires
    labels = rng.random((n, c)) < [0.1, 0.4, 0.0]  # the last concept never occurs
    scores = concept_scores(sp.csr_matrix(dense.astype(np.float32)), labels)
    for k in range(c):
        for f in range(d):
            pos, neg = dense[labels[:, k], f], dense[~labels[:, k], f]
            if pos.size == 0:
                assert np.isnan(scores["auroc"][k, f])
                continue
            u = mannwhitneyu(pos, neg).statistic
            assert scores["auroc"][k, f] == pytest.approx(u / (pos.size * neg.size))
            both = ((dense[:, f] > 0) & labels[:, k]).sum()
            assert scores["n_both"][k, f] == both
            fire = (dense[:, f] > 0).sum()
            if fire:
                assert scores["precision"][k, f] == pytest.approx(both / fire)
            assert scores["recall"][k, f] == pytest.approx(both / pos.size)


def test_trace_follows_graph_successors_and_restarts_without_them():
    auroc = {  # (layer, feature) -> AUROC; feature 0 is each layer's best
        (6, 0): 0.9, (6, 1): 0.8, (6, 2): 0.5,
        (7, 0): 0.95, (7, 1): 0.7, (7, 2): 0.6,
        (8, 0): 0.9, (8, 1): 0.85, (8, 2): 0.55,
    }  # fmt: skip
    scores = pl.DataFrame([{"layer": k[0], "feature": k[1], "auroc": v} for k, v in auroc.items()])
    graph = nx.DiGraph()
    for (la, fa), (lb, fb) in [((6, 1), (7, 1)), ((6, 2), (7, 2)), ((6, 2), (7, 0))]:
        graph.add_node(node_id(la, fa), layer=la, feature=fa)
        graph.add_node(node_id(lb, fb), layer=lb, feature=fb)
        graph.add_edge(node_id(la, fa), node_id(lb, fb))
    trace = trace_concept(scores, graph, [6, 7, 8], beam=2)
    rows = trace.select("layer", "feature", "predecessor", "reached").rows()
    # layer 6: its best two (0, 1); layer 7: successors of those only (1, from 1);
    # layer 8: no edge from layer 7 feature 1: restart from the best two
    assert rows == [
        (6, 0, None, False),
        (6, 1, None, False),
        (7, 1, 1, True),
        (8, 0, None, False),
        (8, 1, None, False),
    ]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    model = random_model()
    tokens = random_tokens(n_seq=10, seq_len=16, seed=1)
    saes = random_saes(model, tokens)
    return model_store(tmp_path_factory.mktemp("concepts"), model, saes, tokens)


def test_run_concepts_ranks_by_an_independent_auroc(small_store, tmp_path):
    concepts = load_concepts("python")
    graph = nx.DiGraph()
    paths = run_concepts(small_store, "python", [6, 7], graph, tmp_path, top=3)
    best = pl.read_parquet(paths["best_features"])
    sequences = small_store.tokens("s0")["token"].to_numpy().reshape(-1, 16)
    labels = token_labels(concepts, SMALL_VOCAB, sequences)
    keep = np.tile(np.arange(16) > 0, len(sequences))
    codes = small_store.read(7, "s0").toarray()[keep]
    k = next(i for i, c in enumerate(concepts) if c.name == "keyword")
    y = labels[keep, k]
    ref = [mannwhitneyu(codes[y, f], codes[~y, f]).statistic / (y.sum() * (~y).sum())
           for f in range(codes.shape[1]) if (codes[:, f] > 0).any()]  # fmt: skip
    top = best.filter((pl.col("concept") == "keyword") & (pl.col("layer") == 7))
    assert top["auroc"][0] == pytest.approx(max(ref))
    assert top["rank"].to_list() == [1, 2, 3]
    image = imread(paths["plot_keyword"])
    assert image.shape[0] > 100 and image.std() > 0


def test_cli_concepts_writes_tables(small_store, tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["--home", str(small_store.home), "concepts", "--set", "python", "--layers", "6", "7"]
    assert main([*argv, "--threshold", "0.1", "--out", str(out)]) == 0
    traces = pl.read_parquet(out / "concept_traces.parquet")
    assert set(traces["concept"]) == {c.name for c in load_concepts("python")}
    assert main([*argv, "--set", "nope", "--out", str(out)]) == 2
    assert "no concept set 'nope'" in capsys.readouterr().err


def test_tiny_source_concepts_are_found(tmp_path):
    """On the real embedded model: single-token concepts each have a layer-6 detector.

    (A union concept such as `keyword` has no single detector at this size: its best is ~0.65.)
    """
    source = get_source("tiny")
    try:
        source.load_sae(6)
    except (FeatstoreError, OSError) as exc:
        pytest.skip(f"the embedded tiny model/SAEs are not there yet ({exc})")
    store = open_store(tmp_path, create=True)
    shard = source.shard_names()[0]
    extract_shard(store, ExtractConfig(layers=(6,), max_sequences=16), shard)
    scores = score_store(store, load_concepts("python"), [6])
    best = best_features(scores, top=1)
    for concept in ("open_bracket", "self", "colon"):
        assert best.filter(pl.col("concept") == concept)["auroc"][0] > 0.9, concept


def test_scores_by_feature_blocks_equal_the_whole(small_store, monkeypatch):
    """Scoring a few features at a time (what bounds memory at 24,576 features) changes nothing."""
    from featstore.analysis import concepts as module

    concepts = load_concepts("python")
    whole = module.score_store(small_store, concepts, [6, 7])
    monkeypatch.setattr(module, "FEATURE_BLOCK", 7)
    blocked = module.score_store(small_store, concepts, [6, 7])
    assert blocked.equals(whole)
