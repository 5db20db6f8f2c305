"""Tiny builders shared by the tests (add functions; don't remove others')."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import polars as pl
import scipy.stats

# -- pair statistics built by brute force from dense activations (graph and plot tests) ----------


def correlated_layers(
    layers: tuple[int, ...] = (6, 7, 8, 9), n_tokens: int = 400, d: int = 24, seed: int = 0
) -> dict[int, np.ndarray]:
    """Dense (tokens x d) nonnegative activations; a quarter of each layer echoes the previous."""
    rng = np.random.default_rng(seed)
    acts: dict[int, np.ndarray] = {}
    for layer in layers:
        x = rng.exponential(1.0, (n_tokens, d)) * (rng.random((n_tokens, d)) < 0.15)
        if acts:
            prev = acts[max(acts)]
            echo = rng.permutation(d)[: d // 4]
            x[:, : d // 4] = prev[:, echo] * rng.uniform(0.5, 2.0, d // 4) + 0.3 * x[:, : d // 4]
        acts[layer] = x
    return acts


def dense_pair_frame(x: np.ndarray, y: np.ndarray, all_pairs: bool = False) -> pl.DataFrame:
    """`pair_stats`-shaped frame for two dense matrices; rows for co-active pairs (or all)."""
    n = x.shape[0]
    on_x, on_y = (x > 0).astype(np.int64), (y > 0).astype(np.int64)
    both = on_x.T @ on_y
    either = on_x.sum(0)[:, None] + on_y.sum(0)[None, :] - both
    sum_xy = x.T @ y
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = sum_xy / n - np.outer(x.mean(0), y.mean(0))
        scale = np.outer(x.std(0), y.std(0))
        pearson = np.where(scale > 0, cov / scale, np.nan)  # null for a flat feature, as in stats
        jaccard = both / either
    agreement = (n - either + both) / n  # stand-in: share of tokens where both or neither fire
    fa, fb = np.nonzero(np.ones_like(both, dtype=bool) if all_pairs else both > 0)
    return pl.DataFrame(
        {
            "feature_a": fa,
            "feature_b": fb,
            "n_tokens": np.full(fa.size, n),
            "n_both": both[fa, fb],
            "n_either": either[fa, fb],
            "sum_xy": sum_xy[fa, fb],
            "pearson": pl.Series(pearson[fa, fb], nan_to_null=True),
            "agreement": agreement[fa, fb],
            "jaccard": jaccard[fa, fb],
        }
    )


def dense_pair_frames(
    acts: dict[int, np.ndarray], all_pairs: bool = False
) -> dict[tuple[int, int], pl.DataFrame]:
    """Frames for each adjacent pair of layers."""
    return {
        (a, b): dense_pair_frame(acts[a], acts[b], all_pairs)
        for a, b in itertools.pairwise(sorted(acts))
    }


# -- every measure of the 2 x 2 table by brute force (measures and compare tests) ----------


def table_measures(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Every measure of every pair (d_a x d_b arrays, NaN where undefined) by brute force."""
    on_x, on_y = x > 0, y > 0
    n = x.shape[0]
    c_a, c_b = on_x.sum(0), on_y.sum(0)
    p_a, p_b = c_a[:, None] / n, c_b[None, :] / n
    c_both = (on_x[:, :, None] & on_y[:, None, :]).sum(0)
    both = c_both / n
    out = {k: np.full(both.shape, np.nan) for k in ("sufficiency", "necessity", "pmi", "mi")}
    for i in range(x.shape[1]):
        for j in range(y.shape[1]):
            if c_a[i] > 0:
                out["sufficiency"][i, j] = c_both[i, j] / c_a[i]
            if c_b[j] > 0:
                out["necessity"][i, j] = c_both[i, j] / c_b[j]
            if p_a[i, 0] > 0 and p_b[0, j] > 0:
                with np.errstate(divide="ignore"):
                    out["pmi"][i, j] = np.log(both[i, j] / (p_a[i, 0] * p_b[0, j]))
            joint = np.histogram2d(on_x[:, i], on_y[:, j], bins=2, range=[[0, 1], [0, 1]])[0]
            h = scipy.stats.entropy
            out["mi"][i, j] = h(joint.sum(1)) + h(joint.sum(0)) - h(joint.ravel())
    out["mutual_information"] = out.pop("mi")
    with np.errstate(invalid="ignore", divide="ignore"):
        out["pearson"] = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1] :]
        out["jaccard"] = c_both / (c_a[:, None] + c_b[None, :] - c_both)
    out["agreement"] = (on_x[:, :, None] == on_y[:, None, :]).mean(0)
    out["n_both"] = c_both
    return out


# -- small stores of random activations (sql and stats tests) ------------------------------------


def sparse_acts(n_tokens: int, d: int, density: float = 0.1, seed: int = 0):
    """A random non-negative tokens x d CSR matrix (float32)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    m = sp.random(n_tokens, d, density=density, format="csr", rng=rng, dtype=np.float32)
    m.data = (m.data * 3 + 0.01).astype(np.float32)
    return m


def token_frame(n_tokens: int, seq_len: int = 8, vocab_size: int = 40, seed: int = 0):
    """A token table of `n_tokens` rows: sequences of `seq_len` positions, random token ids."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n_tokens)
    return pl.DataFrame(
        {
            "seq": rows // seq_len,
            "pos": rows % seq_len,
            "token": rng.integers(0, vocab_size, n_tokens),
        }
    )


def build_store(home, acts: dict, vocab: list[str] | None = None, seed: int = 0):
    """A store at `home` holding `acts[layer][shard]` (CSR) and a token table per shard."""
    from featstore.store.home import open_store

    store = open_store(home, create=True)
    shards: dict[str, int] = {}
    for layer, per_shard in acts.items():
        for shard, matrix in per_shard.items():
            store.write_activations(layer, shard, matrix, {"source": "test"})
            shards[shard] = matrix.shape[0]
    for i, (shard, n) in enumerate(sorted(shards.items())):
        store.write_tokens(shard, token_frame(n, seed=seed + i))
    if vocab is not None:
        store.write_vocab(vocab)
    return store


# -- small random-weight model and SAEs (patching, concepts, erasure tests) ----------------------

SMALL_VOCAB = [
    "<|endoftext|>",
    "\n",
    "    ",
    "  ",
    " ",
    "#",
    " #",
    "'",
    '"',
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ":",
    ",",
    ".",
    "=",
    " =",
    "+",
    "-",
    "*",
    "0",
    "1",
    "42",
    "7",
    " def",
    " class",
    "def",
    " return",
    " if",
    " for",
    " in",
    " import",
    "import",
    " None",
    " True",
    " x",
    " y",
    "self",
    " self",
    " Foo",
    "Bar",
    " the",
    " value",
    "_",
    "abc",
    " a",
    "Z",
]  # 50 decoded tokens: the small model's vocabulary, Python-ish so concepts have hits


def random_model(seed: int = 0):
    """A 10-layer random-weight HookedTransformer (d_model 32) with nonzero biases."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=10,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=32,
        d_vocab=len(SMALL_VOCAB),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):  # zero at init: make bias terms testable
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def random_tokens(n_seq: int = 6, seq_len: int = 16, seed: int = 0) -> np.ndarray:
    """(n_seq, seq_len) token ids of the small model, each sequence starting with BOS (0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, len(SMALL_VOCAB), (n_seq, seq_len))
    tokens[:, 0] = 0
    return tokens


def random_saes(
    model,
    tokens: np.ndarray,
    layers=(6, 7, 8, 9),
    d_sae: int = 64,
    density: float = 0.15,
    seed: int = 0,
) -> dict:
    """Random StandardSAEs at each layer's resid_pre; each feature fires on ~`density` of the
    tokens of `tokens` (b_enc set from the pre-activation quantiles)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    _, cache = model.run_with_cache(torch.as_tensor(tokens))
    saes = {}
    for layer in layers:
        sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=d_sae)).eval()
        resid = cache[f"blocks.{layer}.hook_resid_pre"][:, 1:].reshape(-1, model.cfg.d_model)
        with torch.no_grad():
            sae.b_dec.copy_(resid.mean(0))
            pre = (resid - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(pre, 1 - density, dim=0))
        saes[layer] = sae
    return saes


def small_model_setup(home, seed: int, n_seq: int, seq_len: int = 12):
    """(model, saes, tokens, store): a random model, its random SAEs and a store of their codes
    on random tokens (erasure and findings tests)."""
    model = random_model(seed=seed)
    tokens = random_tokens(n_seq=n_seq, seq_len=seq_len, seed=seed)
    saes = random_saes(model, tokens, seed=seed)
    return model, saes, tokens, model_store(home, model, saes, tokens)


def model_store(home, model, saes: dict, tokens: np.ndarray, shard: str = "s0"):
    """A store holding the SAE codes of `tokens` at each layer, the token table and the vocab."""
    import torch

    from featstore.sources.extract import encode_batch, token_table
    from featstore.store.home import open_store

    store = open_store(home, create=True)
    hooks = {layer: f"blocks.{layer}.hook_resid_pre" for layer in saes}
    codes = encode_batch(model, saes, hooks, torch.as_tensor(tokens))
    for layer, csr in codes.items():
        store.write_activations(layer, shard, csr, {"source": "test"})
    store.write_tokens(shard, token_table(tokens), {"source": "test", "seq_len": tokens.shape[1]})
    if store.vocab() is None:
        store.write_vocab(SMALL_VOCAB)
    return store


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread: on a busy shared machine its thread pool spins far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- what a store holds, for before/after comparisons (fault and bad-input tests) ----------------


def file_snapshot(home) -> dict[str, bytes]:
    """Every file under a store home by relative path, lock files and the SQL index (derived,
    rebuilt by any query) left out."""
    from pathlib import Path

    from featstore.store import spec

    home = Path(home)
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and p.relative_to(home).parts[0] not in ("locks", spec.SQL_INDEX_DIR)
    }


def group_states(
    home, volatile: tuple[str, ...] = ("seconds", "featstore-commit")
) -> dict[str, tuple]:
    """Each Zarr group holding arrays under `store.zarr`, read with zarr alone (as a reader
    without featstore would), `_staging` and `_trash` left out: path -> (attrs, arrays), in a
    form `==` compares; attributes in `volatile` (timings, commit ids) are dropped."""
    import json
    from pathlib import Path

    import zarr

    from featstore.store import spec

    root = Path(home) / spec.ROOT
    states = {}
    for meta in sorted(root.rglob("zarr.json")):
        rel = meta.parent.relative_to(root)
        if not rel.parts or rel.parts[0] in (spec.STAGING, spec.TRASH):
            continue
        if json.loads(meta.read_text())["node_type"] != "group":
            continue
        group = zarr.open_group(root, path="/".join(rel.parts), mode="r")
        arrays = {name: (a.dtype.str, a[:].tobytes()) for name, a in group.arrays()}
        if arrays:
            attrs = {k: v for k, v in group.attrs.items() if k not in volatile}
            states[rel.as_posix()] = (json.dumps(attrs, sort_keys=True), arrays)
    return states


def cli(capsys, home, *args: str) -> tuple[int, str, str]:
    """`featstore --home HOME ARGS` in this process: (exit status, stdout, stderr)."""
    from featstore.cli import main

    capsys.readouterr()
    status = main(["--home", str(home), *args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *needles: str) -> None:
    """Exit status 2 and one line on stderr holding every needle, no traceback."""
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("featstore: error: "), err
    for needle in needles:
        assert needle in err, err
