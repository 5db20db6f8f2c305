"""Synthetic SAE activations at GPT-2 scale, with planted cross-layer relations to recover.

Each layer's features fire independently with Zipf-like frequencies (a few dense features, a long
tail of rare ones) and log-normal values. Between successive layers a known set of relations is
planted: a feature of layer b *copies* one of layer a, *merges* two (sums what each carries over),
or two features of b *split* one of a (each token it fires on goes to one child). Every relation
carries a token over with probability `strength` and scales its value by `gain` times log-normal
noise; children also fire on their own at `leak` times their planted rate. On request
(`n_chains`, `n_gates`, `n_vanishing`), `featstore.sources.planted` adds exact pass-through
chains, AND and OR gates and vanishing features for the analyses to recover.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.optimize import brentq

from featstore import settings
from featstore.defaults import SYNTH_SOURCE
from featstore.errors import FeatstoreError
from featstore.files import atomic_file
from featstore.sources import planted as planting
from featstore.sources.registry import default_layers, get_source
from featstore.store.local import Store

VOCAB_SIZE = 50257  # GPT-2's vocabulary
KINDS = ("copy", "merge", "split")
EDGE_SCHEMA = {
    "layer_a": pl.Int32,
    "feature_a": pl.Int32,
    "layer_b": pl.Int32,
    "feature_b": pl.Int32,
    "kind": pl.Utf8,
    "strength": pl.Float64,
    "gain": pl.Float64,
}


@dataclass(frozen=True)
class SynthConfig:
    """Shape, sparsity and planted structure of a synthetic store; `n_tokens` is per shard."""

    d_sae: int = field(default_factory=lambda: get_source(SYNTH_SOURCE).d_sae)
    layers: tuple[int, ...] = field(default_factory=lambda: default_layers(SYNTH_SOURCE))
    n_tokens: int = 100_000
    l0: float = 50.0  # expected active features per token, every layer
    zipf: float = 0.9  # feature frequency ~ rank ** -zipf
    max_freq: float = 0.2  # no feature fires on more than this share of tokens
    n_planted: int = 512  # relations per pair of successive layers
    kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # copy, merge, split
    min_strength: float = 0.1
    max_strength: float = 0.9
    leak: float = 0.1
    value_sigma: float = 0.6  # log-normal spread of activation values
    noise_sigma: float = 0.3  # log-normal noise on carried-over values
    seq_len: int = 128
    block_tokens: int = 16384
    seed: int = 0
    n_chains: int = 0  # pass-through chains through every layer (`planted`)
    n_gates: int = 0  # AND gates and OR gates, each, per pair of successive layers
    n_vanishing: int = 0  # features per layer (but the last) that nothing follows

    of = classmethod(settings.of)  # from CLI arguments

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        checks = [
            (self.d_sae >= 16, f"d_sae must be at least 16, got {self.d_sae}"),
            (len(self.layers) >= 1, "no layers given"),
            (
                list(self.layers) == sorted(set(self.layers)),
                f"layers must be increasing: {self.layers}",
            ),
            (min(self.layers, default=0) >= 0, f"layers must be non-negative: {self.layers}"),
            (self.n_tokens >= 1, f"n_tokens must be positive, got {self.n_tokens}"),
            (0 < self.max_freq <= 1, f"max_freq must be in (0, 1], got {self.max_freq}"),
            (
                0 < self.l0 < 0.5 * self.d_sae * self.max_freq,
                f"l0 {self.l0} must be positive and below d_sae * max_freq / 2",
            ),
            (self.zipf >= 0, f"zipf must be non-negative, got {self.zipf}"),
            (
                0 <= self.n_planted <= self.d_sae // 8,
                f"n_planted must be in [0, d_sae / 8 = {self.d_sae // 8}], got {self.n_planted}",
            ),
            (
                len(self.kind_weights) == 3
                and min(self.kind_weights) >= 0
                and sum(self.kind_weights) > 0,
                f"kind_weights must be three non-negative weights, got {self.kind_weights}",
            ),
            (
                0 < self.min_strength <= self.max_strength <= 1,
                f"need 0 < min_strength <= max_strength <= 1, got "
                f"{self.min_strength}, {self.max_strength}",
            ),
            (0 <= self.leak <= 1, f"leak must be in [0, 1], got {self.leak}"),
            (self.value_sigma >= 0 and self.noise_sigma >= 0, "sigmas must be non-negative"),
            (self.seq_len >= 1, f"seq_len must be positive, got {self.seq_len}"),
            (self.block_tokens >= 1, f"block_tokens must be positive, got {self.block_tokens}"),
            (self.seed >= 0, f"seed must be non-negative, got {self.seed}"),
            (
                min(self.n_chains, self.n_gates, self.n_vanishing) >= 0,
                "n_chains, n_gates and n_vanishing must be non-negative",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise FeatstoreError(f"synth config: {message}")


@dataclass(frozen=True)
class Transfer:
    """Relations from layer a to layer b, one row per (parent, carry) rule."""

    parent: np.ndarray  # (R,) feature of layer a, all distinct
    child: np.ndarray  # (R, 2) feature of layer b a carried token goes to (two differ: a split)
    kind: np.ndarray  # (R,) index into KINDS
    strength: np.ndarray  # (R,) probability a parent's token is carried over
    gain: np.ndarray  # (R,) value scaling


@dataclass(frozen=True)
class World:
    """Everything fixed by the seed: per-layer frequencies and scales, planted transfers."""

    freq: dict[int, np.ndarray]  # layer -> (d,) independent firing probability
    scale: dict[int, np.ndarray]  # layer -> (d,) typical value
    transfers: dict[int, Transfer]  # layer b -> relations from the layer before it
    structures: dict[int, planting.Structures]  # layer b -> `planted` from the layer before it


def zipf_frequencies(weights: np.ndarray, total: float, max_freq: float) -> np.ndarray:
    """`min(c * weights, max_freq)` with c chosen so the frequencies sum to `total`."""
    if total <= 0:
        return np.zeros_like(weights)

    def excess(c: float) -> float:
        return float(np.minimum(c * weights, max_freq).sum() - total)

    c = brentq(excess, 0.0, max_freq / weights[weights > 0].min(), xtol=1e-12, rtol=1e-10)
    return np.minimum(c * weights, max_freq)


def _zipf_weights(rng: np.random.Generator, d: int, exponent: float) -> np.ndarray:
    """Zipf weights by rank, dealt to features in random order."""
    return rng.permutation(np.arange(1, d + 1, dtype=np.float64) ** -exponent)


def _plant(rng: np.random.Generator, cfg: SynthConfig, parent_freq: np.ndarray) -> Transfer:
    """Draw `n_planted` relations; parents come from the mid-to-frequent features of layer a."""
    lo, hi = np.quantile(parent_freq, [0.5, 0.99])
    pool = np.flatnonzero((parent_freq >= lo) & (parent_freq <= hi))
    p = np.asarray(cfg.kind_weights) / sum(cfg.kind_weights)
    kinds = rng.choice(len(KINDS), size=cfg.n_planted, p=p)
    # Rows per relation: a merge has two parents, the others one; a split has two children.
    n_parents = np.where(kinds == KINDS.index("merge"), 2, 1)
    n_children = np.where(kinds == KINDS.index("split"), 2, 1)
    if n_parents.sum() > pool.size:
        raise FeatstoreError(
            f"synth config: {cfg.n_planted} relations need {n_parents.sum()} parents, "
            f"only {pool.size} features qualify: lower n_planted or raise d_sae"
        )
    parents = rng.choice(pool, size=n_parents.sum(), replace=False)
    children = rng.choice(cfg.d_sae, size=n_children.sum(), replace=False)
    rel_of_row = np.repeat(np.arange(cfg.n_planted), n_parents)
    first_child = np.cumsum(n_children) - n_children
    child = np.stack([first_child, first_child + n_children - 1], axis=1)[rel_of_row]
    strength = rng.uniform(cfg.min_strength, cfg.max_strength, cfg.n_planted)[rel_of_row]
    gain = np.exp(rng.uniform(np.log(0.5), np.log(2.0), cfg.n_planted))[rel_of_row]
    return Transfer(parents, children[child], kinds[rel_of_row], strength, gain)


def build_world(cfg: SynthConfig) -> World:
    """The seeded structure behind every shard of a synthetic store."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    d = cfg.d_sae
    freq: dict[int, np.ndarray] = {}
    scale: dict[int, np.ndarray] = {}
    transfers: dict[int, Transfer] = {}
    structures: dict[int, planting.Structures] = {}
    extra_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
    extra = (cfg.n_chains, cfg.n_gates, cfg.n_vanishing)
    expected = np.zeros(0)  # the previous layer's firing rate, planted share included
    previous = -1
    for layer in cfg.layers:
        weights = _zipf_weights(rng, d, cfg.zipf)
        scale[layer] = rng.lognormal(0.0, 0.5, d)
        planted = np.zeros(d)
        if expected.size:
            t = transfers[layer] = _plant(rng, cfg, expected)
            # Rate each child gets from planting (a merge's sum is close for rare parents).
            planted = np.bincount(
                t.child.ravel(),
                weights=np.repeat(t.strength * expected[t.parent] / 2, 2),
                minlength=d,
            )
            # A child's own firings look like its carried ones (same typical value).
            scale[layer][t.child.ravel()] = np.repeat(t.gain * scale[previous][t.parent], 2)
            chain = structures[previous].pass_child if previous in structures else None
            st = structures[layer] = planting.plant(
                extra_rng, extra, expected, t.parent, t.child.ravel(), chain
            )
            weights[st.children] = 0.0  # they fire only through their parents
        # Children leak at a share of their planted rate; the others fill the layer up to l0.
        is_child = planted > 0
        budget = max(cfg.l0 - (1 + cfg.leak) * planted.sum(), 0.1 * cfg.l0)
        rest = zipf_frequencies(np.where(is_child, 0.0, weights), budget, cfg.max_freq)
        freq[layer] = np.where(is_child, cfg.leak * planted, rest)
        rates = structures[layer].child_rates(expected) if layer in structures else {}
        expected, previous = freq[layer] + planted, layer
        expected[list(rates)] += list(rates.values())
    return World(freq, scale, transfers, structures)


def planted_edges(cfg: SynthConfig, world: World | None = None) -> pl.DataFrame:
    """The planted relations as edges (layer_a, feature_a, layer_b, feature_b, kind, ...).

    `strength` is the probability that a token the parent fires on makes this child fire
    through this relation (a split's two children get half the relation's strength each).
    """
    world = world or build_world(cfg)
    frames = []
    for a, b in zip(cfg.layers[:-1], cfg.layers[1:], strict=True):
        t = world.transfers[b]
        is_split = t.child[:, 0] != t.child[:, 1]
        n_edges = np.where(is_split, 2, 1)
        row = np.repeat(np.arange(t.parent.size), n_edges)
        side = np.arange(row.size) - np.repeat(np.cumsum(n_edges) - n_edges, n_edges)
        frames.append(
            pl.DataFrame(
                {
                    "layer_a": np.full(row.size, a),
                    "feature_a": t.parent[row],
                    "layer_b": np.full(row.size, b),
                    "feature_b": t.child[row, side],
                    "kind": np.asarray(KINDS)[t.kind[row]],
                    "strength": t.strength[row] / n_edges[row],
                    "gain": t.gain[row],
                },
                schema=EDGE_SCHEMA,
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame(schema=EDGE_SCHEMA)


def planted_structures(cfg: SynthConfig, world: World | None = None) -> pl.DataFrame:
    """The `planted` structures (pass, and, or, vanishing) of every pair of successive layers."""
    world = world or build_world(cfg)
    frames = [
        planting.structure_frame(a, b, world.structures[b])
        for a, b in zip(cfg.layers[:-1], cfg.layers[1:], strict=True)
    ]
    return pl.concat(frames) if frames else pl.DataFrame(schema=planting.STRUCTURE_SCHEMA)


def _csr(n: int, d: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> sp.csr_matrix:
    """CSR from (row, col, value) triples, summing duplicates."""
    return sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, d))


def _independent(
    rng: np.random.Generator, freq: np.ndarray, scale: np.ndarray, n: int, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent firings of every feature on `n` tokens as (rows, cols, values)."""
    d = freq.size
    counts = rng.binomial(n, freq)
    cols = np.repeat(np.arange(d, dtype=np.int64), counts)
    # Draws that land twice on one token count once (a hair under `freq` for dense features).
    keys = np.sort(rng.integers(0, n, cols.size) * d + cols)
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # np.unique's hashing is 20x slower here
    rows, cols = np.divmod(keys, d)
    return rows, cols, scale[cols] * rng.lognormal(0.0, sigma, cols.size)


def _carried(
    rng: np.random.Generator, parent: sp.csr_matrix, t: Transfer, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the planted relations carry from a block of the parent layer, as triples."""
    events = parent[:, t.parent].tocoo()
    keep = rng.random(events.nnz) < t.strength[events.col]
    rows, rule, vals = events.row[keep], events.col[keep], events.data[keep]
    cols = t.child[rule, rng.integers(0, 2, rule.size)]
    return rows, cols, vals * t.gain[rule] * rng.lognormal(0.0, sigma, rule.size)


def generate_block(
    rng: np.random.Generator, cfg: SynthConfig, world: World, n: int
) -> dict[int, sp.csr_matrix]:
    """Activations of every layer for `n` tokens; each layer builds on the one before."""
    blocks: dict[int, sp.csr_matrix] = {}
    previous: int | None = None
    for layer in cfg.layers:
        own = _independent(rng, world.freq[layer], world.scale[layer], n, cfg.value_sigma)
        if previous is not None:
            carried = _carried(rng, blocks[previous], world.transfers[layer], cfg.noise_sigma)
            exact = planting.carried(blocks[previous], world.structures[layer])
            own = tuple(np.concatenate(p) for p in zip(own, carried, exact, strict=True))
        blocks[layer] = _csr(n, cfg.d_sae, *own)
        previous = layer
    return blocks


def token_table(rng: np.random.Generator, cfg: SynthConfig) -> pl.DataFrame:
    """Sequences of `seq_len` random token ids covering the shard."""
    index = np.arange(cfg.n_tokens)
    return pl.DataFrame(
        {
            "seq": index // cfg.seq_len,
            "pos": index % cfg.seq_len,
            "token": rng.integers(0, VOCAB_SIZE, cfg.n_tokens),
        }
    )


def _shard_rng(cfg: SynthConfig, shard: str, stream: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([cfg.seed, 1 + stream, zlib.crc32(shard.encode())])
    )


def generate(store: Store, cfg: SynthConfig, shard: str) -> pl.DataFrame:
    """Write one shard of every layer (block by block) and its tokens; returns the planted edges."""
    world = build_world(cfg)
    attrs = {"source": "synthetic", "synth": {**asdict(cfg), "layers": list(cfg.layers)}}
    rng = _shard_rng(cfg, shard, 0)
    with store.transaction(), contextlib.ExitStack() as stack:  # the shard whole, or nothing
        writers = {
            layer: stack.enter_context(store.activation_writer(layer, shard, cfg.d_sae, attrs))
            for layer in cfg.layers
        }
        for start in range(0, cfg.n_tokens, cfg.block_tokens):
            n = min(cfg.block_tokens, cfg.n_tokens - start)
            for layer, block in generate_block(rng, cfg, world, n).items():
                writers[layer].append(block)
        tokens = token_table(_shard_rng(cfg, shard, 1), cfg)
        store.write_tokens(shard, tokens, {"source": "synthetic"})
    return planted_edges(cfg, world)


def planted_path(home: str | Path) -> Path:
    """Where `featstore synth` keeps the planted edges of a store."""
    return Path(home) / "synthetic" / "planted.parquet"


def shard_names(n_shards: int) -> list[str]:
    return [f"synth-{i:03d}" for i in range(n_shards)]


def generate_all(
    store: Store, cfg: SynthConfig, n_shards: int, log: Callable[[str], None] | None = None
) -> pl.DataFrame:
    """Write `n_shards` shards and the planted edges (`planted_path`); returns the edges."""
    if n_shards < 1:
        raise FeatstoreError(f"need at least one shard, got {n_shards}")
    edges = planted_edges(cfg)
    for shard in shard_names(n_shards):
        start = time.perf_counter()
        generate(store, cfg, shard)
        if log:
            seconds = time.perf_counter() - start
            l0 = ", ".join(
                f"L{layer} {store.info(layer, shard)['nnz'] / cfg.n_tokens:.1f}"
                for layer in cfg.layers
            )
            log(f"shard {shard}: {cfg.n_tokens} tokens in {seconds:.1f}s; L0 {l0}")
    with atomic_file(planted_path(store.home)) as tmp:
        edges.write_parquet(tmp)
    with atomic_file(planted_path(store.home).with_name("structures.parquet")) as tmp:
        planted_structures(cfg).write_parquet(tmp)
    return edges
