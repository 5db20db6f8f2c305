"""The findings table: its evidence against numpy, its verdict rule, and its verdicts on
synthetic activations with planted gates and pass-through chains."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from helpers import build_store, sparse_acts

from featstore.analysis import evidence, findings
from featstore.sources.synth import SynthConfig, generate, shard_names
from featstore.store import spec, sql
from featstore.store.home import open_store

CFG = SynthConfig(
    d_sae=256, layers=(6, 7, 8, 9), n_tokens=4000, n_planted=16, l0=12, block_tokens=2000,
    seed=2, n_chains=8, n_gates=6, n_vanishing=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("findings"), create=True)
    for shard in shard_names(2):
        generate(store, CFG, shard)
    return store


@pytest.mark.parametrize(
    ("lo", "hi", "word"),
    [(0.1, 0.3, "supported"), (-0.3, -0.1, "not supported"), (-0.3, 0.0, "not supported"),
     (-0.1, 0.2, "inconclusive"), (0.0, 0.2, "inconclusive"), (np.nan, 0.1, "inconclusive")],
)  # fmt: skip
def test_verdict_rule(lo, hi, word):
    assert findings.verdict(lo, hi) == word


def test_bootstrap_interval_is_the_percentiles_of_resampled_means():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    value, lo, hi = findings.bootstrap([x], lambda s: float(np.mean(s[0])), 2000, 0)
    assert value == pytest.approx(x.mean())
    half = 1.96 * x.std() / np.sqrt(x.size)  # the normal interval it should come close to
    assert lo == pytest.approx(x.mean() - half, abs=0.03)
    assert hi == pytest.approx(x.mean() + half, abs=0.03)
    assert findings.bootstrap([np.full(5, 2.0)], lambda s: float(np.mean(s[0])), 100, 0) == (
        2.0, 2.0, 2.0)  # fmt: skip


def test_token_explained_is_eta_squared_of_the_activation_on_the_token(tmp_path):
    x = sparse_acts(160, 6, 0.3, 0).toarray().astype(np.float64)
    store = build_store(tmp_path / "h", {6: {"s": sp.csr_matrix(x)}})
    tokens = store.tokens("s")["token"].to_numpy()
    x[:, 0] = (tokens % 3 == 0) * (1.0 + tokens)  # a function of the token: eta^2 = 1
    store = build_store(tmp_path / "h2", {6: {"s": sp.csr_matrix(x)}})
    got = evidence.token_explained(store, 6, ["s"])
    for f, eta2 in zip(got["feature"], got["eta2"], strict=True):
        col = x[:, f]
        means = {t: col[tokens == t].mean() for t in np.unique(tokens)}
        between = sum((tokens == t).sum() * (m - col.mean()) ** 2 for t, m in means.items())
        assert eta2 == pytest.approx(between / ((col - col.mean()) ** 2).sum(), rel=1e-9)
    assert got.filter(pl.col("feature") == 0)["eta2"][0] == pytest.approx(1.0)


def test_findings_on_planted_structure(planted, tmp_path):
    cfg = findings.FindingsConfig(layers=CFG.layers, n_boot=200)
    frame, paths = findings.run_findings(planted, cfg, tmp_path / "out")
    c2 = frame.filter(pl.col("conjecture") == "C2").row(0, named=True)
    assert c2["verdict"] == "supported" and c2["control_value"] == 0.0
    assert c2["observed"] > 0  # the planted AND and OR gates' children
    fade, passing = frame.filter(pl.col("conjecture") == "C3").iter_rows(named=True)
    assert passing["verdict"] == "supported"
    alive = sum(int((planted.feature_stats(a, "synth-000").count > 0).sum()) for a in (6, 7, 8))
    assert passing["observed"] == pytest.approx(3 * CFG.n_chains / alive, rel=0.05)
    assert fade["verdict"] == "supported"  # planted relations link successive layers only
    c3a = frame.filter(pl.col("conjecture") == "C3a").row(0, named=True)
    assert c3a["verdict"] == "inconclusive" and "model" in c3a["statistic"]
    assert set(frame["source"]) == {"synthetic"}
    page = paths["findings_page"].read_text()
    assert "These verdicts are about `synthetic`" in page and "| C2 |" in page
    for name in ("c1", "c2", "c3_pass_through", "convergence_plot", "pass_through_plot"):
        assert paths[name].stat().st_size > 1000
    gates = pl.read_parquet(paths["gates"])  # the planted AND and OR gates
    assert gates.height == 2 * CFG.n_gates * (len(CFG.layers) - 1)
    assert pl.read_parquet(paths["convergence"])["shards"].max() == 2
    gone = pl.read_parquet(paths["vanishing"])  # the planted vanishing features among them
    assert gone.height >= CFG.n_vanishing * 3 and gone["survival"].null_count() == gone.height


def test_findings_asset_shows_its_page(planted):
    import dagster as dg

    from pipelines.assets.findings import FindingsAssetConfig, findings
    from pipelines.resources import FeatstoreResource

    resource = FeatstoreResource(home=str(planted.home))  # source tiny: not the store's
    result = dg.materialize(
        [findings], resources={"featstore": resource},
        run_config={"ops": {"findings": {"config": FindingsAssetConfig(n_boot=100).model_dump()}}},
    )  # fmt: skip
    assert result.success
    meta = result.asset_materializations_for_node("findings")[0].metadata
    assert "These verdicts are about `synthetic`" in meta["page"].value
    assert meta["dagster/row_count"].value == 6 and "c2" in meta


def test_findings_view_in_sql(planted, tmp_path):
    store = build_store(tmp_path / "h", {6: {"s": sparse_acts(16, 4)}})
    assert sql.query(store, "select count(*) as n from findings")["n"][0] == 0  # empty: absent
    cfg = findings.FindingsConfig(layers=CFG.layers, n_boot=100)
    findings.run_findings(planted, cfg, planted.home / spec.FINDINGS_DIR)
    got = sql.query(planted, "select conjecture, verdict from findings order by conjecture")
    assert got["conjecture"].to_list()[:2] == ["C1", "C1"] and got.height == 6


def test_c3_curve_over_distances_is_the_mean_best_pearson_of_numpy(planted, tmp_path):
    cfg = findings.FindingsConfig(layers=CFG.layers, n_boot=200)
    shards = planted.shards(6)
    best = findings.best_pearson(planted, cfg, shards)
    assert set(best) == {(a, b) for a in CFG.layers for b in CFG.layers if 0 < b - a <= 3}
    curve = findings.distance_curve(planted, cfg, shards, best, tmp_path)
    assert (tmp_path / "c3_distance.png").stat().st_size > 1000
    assert pl.read_parquet(tmp_path / "c3_distance.parquet").equals(curve)
    dense = {
        layer: sp.vstack([planted.read(layer, s) for s in shards]).toarray().astype(np.float64)
        for layer in CFG.layers
    }
    for a, b in best:
        x, y = dense[a], dense[b]
        alive = np.flatnonzero((x > 0).any(0))
        with np.errstate(invalid="ignore"):
            r = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1] :]
        r = np.where(((x > 0).T.astype(float) @ (y > 0)) >= 2, r, -np.inf)  # MIN_BOTH tokens
        want = np.maximum(np.nan_to_num(r[alive], nan=-np.inf).max(1), 0.0)
        got = curve.filter((pl.col("start") == str(a)) & (pl.col("distance") == b - a)).row(
            0, named=True
        )
        assert got["n"] == alive.size
        assert got["mean_best_pearson"] == pytest.approx(want.mean(), rel=1e-9)
        assert got["lo"] <= got["mean_best_pearson"] <= got["hi"]
    pooled = curve.filter(pl.col("start") == "all")
    assert pooled["distance"].to_list() == [1, 2, 3]
    means = pooled["mean_best_pearson"].to_list()
    assert means[0] > means[1] > 0 and means[0] > means[2]  # planted: successive layers only


TEST_VOCAB = ["<bos>", "(", ")", ":", ",", ".", '"', "#", "\n", " x", " y", "1", "23", " if"]
TEST_VOCAB += ['"'] * 4 + ["#"] * 2  # spans often enough in sequences of 8
TEST_VOCAB += [f" w{k}" for k in range(40 - len(TEST_VOCAB))]
TEST_CONCEPTS = """name: t
concepts:
  paren: {kind: syntax, token: '^[()]$'}
  punct: {kind: syntax, token: '^[:,.]$'}
  digit: {kind: lexical, token: '\\d'}
  quoted: {kind: context, span: '"[^"\\n]*"'}
  comment: {span: '#[^\\n]*'}
"""


def _labels(pattern: str, rule: str, seqs: np.ndarray) -> np.ndarray:
    """Token labels by the rule, written here from the rule's words (BOS rows included)."""
    import re

    out = []
    for seq in seqs:
        texts = [TEST_VOCAB[t] for t in seq]
        if rule == "token":
            out += [bool(re.search(pattern, t)) for t in texts]
            continue
        inside = np.zeros(sum(map(len, texts)), bool)
        for m in re.finditer(pattern, "".join(texts)):
            inside[m.start() : m.end()] = True
        ends = np.cumsum([len(t) for t in texts])
        out += [bool(inside[e - len(t) : e].any()) for t, e in zip(texts, ends, strict=True)]
    return np.array(out)


def test_concept_auroc_by_kind_against_scipy_mann_whitney(tmp_path):
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(4)
    acts = {layer: sparse_acts(480, 10, 0.3, layer).toarray() for layer in (6, 7, 8)}
    store = build_store(tmp_path / "h", {6: {"s": sp.csr_matrix(acts[6])}}, vocab=TEST_VOCAB)
    tokens = store.tokens("s")["token"].to_numpy()
    for layer, x in acts.items():  # features following concepts, less each layer on
        noise = rng.random(x.shape[0]) < 0.15 * (layer - 5)
        x[:, 0] = np.isin(tokens, [1, 2]) ^ noise
        x[:, 1] = (tokens == 6) ^ noise
    store = build_store(tmp_path / "h2", {k: {"s": sp.csr_matrix(v)} for k, v in acts.items()},
                        vocab=TEST_VOCAB)  # fmt: skip
    (tmp_path / "t.yaml").write_text(TEST_CONCEPTS)
    got = evidence.concept_auroc(store, (6, 7, 8), ["s"], str(tmp_path / "t.yaml"))
    seqs = store.sequences("s")
    scored = np.arange(seqs.size) % seqs.shape[1] > 0  # BOS left out
    rules = {"paren": ("^[()]$", "token"), "punct": ("^[:,.]$", "token"),
             "digit": (r"\d", "token"), "quoted": ('"[^"\n]*"', "span"),
             "comment": ("#[^\n]*", "span")}  # fmt: skip
    kinds = {"paren": "syntax", "punct": "syntax", "digit": "lexical", "quoted": "context",
             "comment": "context"}  # fmt: skip
    assert got.height == 15
    for r in got.iter_rows(named=True):
        labels = _labels(*rules[r["concept"]], seqs)[scored]
        x = acts[r["layer"]][scored]
        aurocs = [mannwhitneyu(x[labels, f], x[~labels, f]).statistic
                  / (labels.sum() * (~labels).sum()) if (x[:, f] > 0).any() else -1
                  for f in range(x.shape[1])]  # fmt: skip
        assert r["kind"] == kinds[r["concept"]]
        assert r["best_auroc"] == pytest.approx(max(aurocs), rel=1e-9)
        assert r["feature"] == int(np.argmax(aurocs))
    cfg = findings.FindingsConfig(layers=(6, 7, 8), concept_set=str(tmp_path / "t.yaml"))
    c1 = findings.c1_concept_row(store, cfg, ["s"], tmp_path / "out")
    best = {(r["concept"], r["layer"]): r["best_auroc"] for r in got.iter_rows(named=True)}
    drop = {c: best[(c, 6)] - best[(c, 8)] for c in kinds}
    assert c1["observed"] == pytest.approx((drop["paren"] + drop["punct"]) / 2)
    assert c1["control_value"] == pytest.approx((drop["quoted"] + drop["comment"]) / 2)
    assert c1["effect"] == pytest.approx(c1["observed"] - c1["control_value"])
    assert c1["effect_lo"] <= c1["effect"] <= c1["effect_hi"] and c1["n"] == 4
    assert pl.read_parquet(tmp_path / "out" / "c1_concepts.parquet").equals(got)
    assert (tmp_path / "out" / "c1_concepts.png").stat().st_size > 1000


def test_c1_concept_row_needs_a_vocabulary(planted, tmp_path):
    cfg = findings.FindingsConfig(layers=CFG.layers, n_boot=100)
    c1 = findings.c1_concept_row(planted, cfg, planted.shards(6), tmp_path)
    assert c1["verdict"] == "inconclusive" and "no vocabulary" in c1["statistic"]
