"""Pair sufficient statistics of two layers per shard, kept in the store and merged.

Each shard's pair sums (`featstore.pairsums.PairCounts`: n_both and sum_xy of every co-active
feature pair) are saved at `pairs/{a}-{b}/{shard}` (encoding "pair_stats_coo": COO arrays
feature_a, feature_b, n_both, sum_xy sorted by (feature_a, feature_b), plus `indptr` by
feature_a), so a new shard costs only its own work; sums over shards are merged by adding.
Three engines give the same sums: `sparse` (one compiled pass, `pairsums.coactive_block`;
default), `polars` (join + group-by) and `duckdb` (`sql/pair_counts.sql` over `featstore sql`'s
views).
`featstore.pairscan` adds them up block by block of feature_a, computing those not saved in
memory; `featstore.stats` turns them into Pearson, agreement, Jaccard and `featstore.measures`'
others. Sums are saved by `update_shard_pairs` (the `shard_pair_stats` asset) and by calls that
ask to save, not by queries.

A `Variant` keys other sums of the same shards, kept beside the plain ones at
`pairs/{a}-{b}[.t{T}][.r{R}-{key}][.nobos][.null]/{shard}`: an `active_threshold` T (activations
<= T count as zero, for every statistic), a `relative_threshold` R (activations <= R x the
feature's maximum over the shards `over` count as zero; `key` names those shards), `bos=False`
(each sequence's first position left out) and the null model (`null`: layer b's sequences
deranged, `null_rows`), each with its own per-feature sums (arrays
`stats_{a,b}_{count,total,sumsq}`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
import zarr

from featstore import defaults
from featstore.errors import FeatstoreError
from featstore.stats.kernel import (
    PAIR_ARRAYS,
    PairCounts,
    Range,
    Screen,
    balanced_ranges,
    iter_sparse_pair_counts,
    polars_pair_counts,
    sparse_pair_counts,
)
from featstore.store import encodings, spec
from featstore.store.local import FeatureStats, Store
from featstore.store.snapshot import Snapshot

ENGINES = defaults.ENGINES  # re-exported: featstore.defaults is the one place
# Tokens per block: the sparse engine holds a block of both layers (~0.6 GB per 1M tokens at
# L0 50); the polars engine holds every co-activation of a block.
BLOCK_TOKENS = {"sparse": 1 << 20, "polars": 1 << 16}


def duckdb_pair_counts(store: Store, a: int, b: int, shard: str) -> PairCounts:
    """The same sums by `sql/pair_counts.sql` over the `activations` view of `featstore sql`."""
    from featstore.store import sql

    n_tokens, d_a, d_b = check_shard(store, a, b, shard)
    if shard not in store.token_shards():
        raise FeatstoreError(f"the duckdb engine joins on the token table: shard {shard} has none")
    con = sql.connect(store)
    try:
        params = {"layer_a": a, "layer_b": b, "shard": shard}
        out = con.sql(sql.named_query("pair_counts"), params=params).fetchnumpy()
    finally:
        con.close()
    cols = [out[c] for c in ("feature_a", "feature_b", "n_both", "sum_xy")]
    return PairCounts.from_coo(n_tokens, d_a, d_b, *cols)


@dataclass(frozen=True)
class Variant:
    """Which sums of a shard: activations above `active_threshold` only (the rest count as
    zero), and above `relative_threshold` x each feature's maximum over the shards `over`
    (spar-2024's relative activity threshold, e.g. 0.2); with `bos` False each sequence's first
    position left out; with `null` layer b's tokens misaligned by a fixed derangement of
    sequences."""

    active_threshold: float = 0.0
    null: bool = False
    relative_threshold: float = 0.0
    bos: bool = True
    over: tuple[str, ...] = ()  # shards whose maxima set the relative thresholds (`resolved`)

    def __post_init__(self) -> None:
        t, r = self.active_threshold, self.relative_threshold
        if not (isinstance(t, int | float) and np.isfinite(t) and t >= 0):
            raise FeatstoreError(f"active_threshold must be a finite number >= 0, got {t!r}")
        if not (isinstance(r, int | float) and 0 <= r < 1):
            raise FeatstoreError(f"relative_threshold must be a number in [0, 1), got {r!r}")
        object.__setattr__(self, "over", tuple(sorted(set(self.over))) if r else ())

    @property
    def plain(self) -> bool:
        return self == Variant()

    def resolved(self, shards: Sequence[str]) -> Variant:
        """The variant whose relative thresholds come from the maxima over `shards`."""
        if not self.relative_threshold or self.over:
            return self
        return dataclasses.replace(self, over=tuple(shards))

    def describe(self) -> dict[str, float | bool | str]:
        """What the statistics were computed on, for an output's metadata."""
        return {
            "active_threshold": float(self.active_threshold),
            "relative_threshold": float(self.relative_threshold),
            "bos": "included" if self.bos else "excluded",
            "null": self.null,
        }

    def folder(self, a: int, b: int) -> str:
        name = f"{a}-{b}" + (f".t{float(self.active_threshold)!r}" if self.active_threshold else "")
        if self.relative_threshold:
            key = zlib.crc32("\n".join(self.over).encode())
            name += f".r{float(self.relative_threshold)!r}-{key:08x}"
        name += "" if self.bos else ".nobos"
        return f"{spec.PAIRS}/{name}{'.null' if self.null else ''}"

    def path(self, a: int, b: int, shard: str) -> str:
        return spec.pairs_path(a, b, shard) if self.plain else f"{self.folder(a, b)}/{shard}"


PLAIN = Variant()
STATS_ARRAYS = ("count", "total", "sumsq")


def null_rows(tokens: pl.DataFrame) -> np.ndarray:
    """Rows of layer b to pair with each row in the null model: each sequence gets the same
    positions of the next sequence of its length (cyclically, by seq id); a sequence alone of
    its length gets its own tokens rolled by half its length."""
    order = np.lexsort((tokens["pos"].to_numpy(), tokens["seq"].to_numpy()))
    seq = tokens["seq"].to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    lengths = np.diff(np.r_[starts, seq.size])
    by_length = np.lexsort((np.arange(starts.size), lengths))  # sequences by (length, seq)
    partner = np.empty(starts.size, np.int64)
    shift = np.zeros(starts.size, np.int64)
    group_start = np.flatnonzero(np.r_[True, np.diff(lengths[by_length]) != 0])
    for lo, hi in zip(group_start, np.r_[group_start[1:], starts.size], strict=True):
        members = by_length[lo:hi]
        partner[members] = np.roll(members, -1)
        if hi - lo == 1:
            shift[members] = lengths[members] // 2
    offset = np.arange(seq.size) - np.repeat(starts, lengths)
    source = np.repeat(starts[partner], lengths) + (offset + np.repeat(shift, lengths)) % np.repeat(
        lengths, lengths
    )
    rows = np.empty(seq.size, np.int64)
    rows[order] = order[source]
    return rows


def above_threshold(matrix: sp.csr_matrix, threshold: float | np.ndarray) -> sp.csr_matrix:
    """The activations above `threshold` (a number, or one per feature); the rest become
    (unstored) zeros."""
    out = sp.csr_matrix(matrix, copy=True)
    cut = threshold[out.indices] if isinstance(threshold, np.ndarray) else threshold
    out.data[out.data <= cut] = 0
    out.eliminate_zeros()
    return out


def _token_rows(store: Store, shard: str, why: str) -> pl.DataFrame:
    if shard not in store.token_shards():
        raise FeatstoreError(f"{why}: shard {shard} has no token table")
    return store.tokens(shard)


def past_bos(store: Store, shard: str) -> np.ndarray:
    """Rows of a shard past each sequence's first position (position 0)."""
    tokens = _token_rows(store, shard, "leaving out BOS needs positions")
    return np.flatnonzero(tokens["pos"].to_numpy() != 0)


@functools.lru_cache(maxsize=256)
def _shard_maxima(store: Store, layer: int, shard: str, bos: bool, stamp: tuple) -> np.ndarray:
    """Each feature's largest activation in a shard (`stamp`: what it was computed from)."""
    matrix = store.read(layer, shard)
    matrix = matrix if bos else matrix[past_bos(store, shard)]
    out = np.asarray(matrix.max(axis=0).todense(), np.float64).ravel()
    out.setflags(write=False)
    return out


def feature_maxima(store: Store, layer: int, shards: Sequence[str], bos: bool = True) -> np.ndarray:
    """Each feature's largest activation over `shards` (without BOS positions unless `bos`)."""
    if not shards:
        raise FeatstoreError("relative thresholds need the shards their maxima come from")
    parts = []
    for shard in shards:
        info = store.info(layer, shard)
        stamp = (int(info["nnz"]), _activation_total(store, layer, shard))
        parts.append(_shard_maxima(store, layer, shard, bos, stamp))
    return functools.reduce(np.maximum, parts)


def cutoffs(store: Store, layer: int, variant: Variant) -> float | np.ndarray:
    """Activations at or below this (a number, or one per feature) count as zero."""
    if not variant.relative_threshold:
        return float(variant.active_threshold)
    if not variant.over:
        raise FeatstoreError("a relative threshold needs its shards: use Variant.resolved")
    maxima = feature_maxima(store, layer, variant.over, variant.bos)
    return np.maximum(variant.relative_threshold * maxima, variant.active_threshold)


def variant_matrices(
    store: Store, a: int, b: int, shard: str, variant: Variant
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Both layers of a whole shard as the variant sees them (one commit's)."""
    return store.consistently(_variant_matrices, store, a, b, shard, variant)


def _variant_matrices(
    store: Store, a: int, b: int, shard: str, variant: Variant
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    m_a, m_b = store.read(a, shard), store.read(b, shard)
    if variant.null:
        m_b = m_b[null_rows(_token_rows(store, shard, "the null model deranges sequences"))]
    if not variant.bos:
        rows = past_bos(store, shard)
        m_a, m_b = m_a[rows], m_b[rows]
    return (
        above_threshold(m_a, cutoffs(store, a, variant)),
        above_threshold(m_b, cutoffs(store, b, variant)),
    )


# -- per shard: check, compute, save, load --------------------------------------------------------


def check_layers(store: Store, *layers: int) -> None:
    for layer in layers:
        if layer not in store.layers():
            raise FeatstoreError(
                f"layer {layer} not in store {store.home} (layers: {store.layers()})"
            )


def check_shard(store: Store, a: int, b: int, shard: str) -> tuple[int, int, int]:
    """(n_tokens, d_a, d_b) of a shard both layers hold on the same tokens, or a one-line error."""
    check_layers(store, a, b)
    for layer in (a, b):
        if shard not in store.shards(layer):
            raise FeatstoreError(
                f"layer {layer} has no shard {shard} (shards: {store.shards(layer)})"
            )
    info_a, info_b = store.info(a, shard), store.info(b, shard)
    n_a, n_b = info_a[spec.SHAPE][0], info_b[spec.SHAPE][0]
    if n_a != n_b:
        raise FeatstoreError(f"shard {shard}: layer {a} has {n_a} tokens, layer {b} has {n_b}")
    return int(n_a), int(info_a["d_sae"]), int(info_b["d_sae"])


def variant_shape(
    store: Store, a: int, b: int, shard: str, variant: Variant
) -> tuple[int, int, int]:
    """(n_tokens, d_a, d_b) of a shard as the variant sees it (`check_shard`)."""
    n_tokens, d_a, d_b = check_shard(store, a, b, shard)
    return (n_tokens if variant.bos else int(past_bos(store, shard).size)), d_a, d_b


def iter_shard_pair_counts(
    store: Store,
    a: int,
    b: int,
    shard: str,
    engine: str = defaults.DEFAULT_ENGINE,
    block_tokens: int = 0,
    sort: bool = True,
    screen: Screen | None = None,
    variant: Variant = PLAIN,
) -> Iterator[PairCounts]:
    """Pair sums of one shard by `engine`, as blocks of feature_a in order (they concatenate;
    each feature's pairs lie in one block). Without `sort` a block's pairs may come unsorted by
    feature_b within each feature_a; with a `screen`, the sparse engine may keep only the pairs
    passing it (`iter_sparse_pair_counts`). A variant reads the shard whole
    (`variant_pair_counts`)."""
    if engine not in ENGINES:
        raise FeatstoreError(f"unknown engine {engine!r} (engines: {', '.join(ENGINES)})")
    if not variant.plain:
        m_a, m_b = variant_matrices(store, a, b, shard, variant)
        yield from variant_pair_counts(m_a, m_b, engine, sort, screen)
        return
    n_tokens, d_a, d_b = check_shard(store, a, b, shard)
    if engine == "duckdb":
        yield duckdb_pair_counts(store, a, b, shard)
        return
    block_tokens = block_tokens or BLOCK_TOKENS[engine]
    if engine == "sparse" and n_tokens <= block_tokens:  # stream the product's feature blocks
        m_a, m_b = store.consistently(lambda: (store.read(a, shard), store.read(b, shard)))
        yield from iter_sparse_pair_counts(m_a, m_b, sort=sort, screen=screen)
        return
    counts = sparse_pair_counts if engine == "sparse" else polars_pair_counts
    total = PairCounts.empty(0, d_a, d_b)
    snap = Snapshot()  # both layers' blocks of one commit
    blocks = zip(
        store.iter_blocks(a, shard, block_tokens, snap),
        store.iter_blocks(b, shard, block_tokens, snap),
        strict=True,
    )
    for (_, block_a), (_, block_b) in blocks:
        total = total + counts(block_a, block_b)  # a running sum keeps one block's pairs extra
    yield total


def shard_pair_counts(
    store: Store,
    a: int,
    b: int,
    shard: str,
    engine: str = defaults.DEFAULT_ENGINE,
    block_tokens: int = 0,
) -> PairCounts:
    """Pair sums of one shard, computed by `engine` over blocks of tokens (0: its default)."""
    parts = list(iter_shard_pair_counts(store, a, b, shard, engine, block_tokens))
    return PairCounts.total(parts, same_tokens=True)


def _activation_total(store: Store, layer: int, shard: str) -> float:
    """The sum of all activations of a (layer, shard), from its stored per-feature sums."""
    what = f"layer {layer} shard {shard}"
    group = store.group(spec.activation_path(layer, shard), what)
    return float(np.sum(store.read_array(group, "feature_sum", what)))


def _fingerprint(
    store: Store, a: int, b: int, shard: str, variant: Variant = PLAIN
) -> dict[str, int | float]:
    """What a saved shard's pair sums were computed from; a mismatch means they are stale."""
    info_a, info_b = store.info(a, shard), store.info(b, shard)
    extra = (
        {}
        if variant.plain
        else {"active_threshold": variant.active_threshold, "null": variant.null}
    )
    n_tokens = int(info_a[spec.SHAPE][0])
    if not variant.bos:
        extra["bos"], n_tokens = False, int(past_bos(store, shard).size)
    if variant.relative_threshold:
        maxima = [feature_maxima(store, x, variant.over, variant.bos) for x in (a, b)]
        extra["relative_threshold"] = variant.relative_threshold
        extra["maxima"] = zlib.crc32(b"".join(m.tobytes() for m in maxima))
    return {
        **extra,
        "n_tokens": n_tokens,
        "d_a": int(info_a["d_sae"]),
        "d_b": int(info_b["d_sae"]),
        "nnz_a": int(info_a["nnz"]),
        "nnz_b": int(info_b["nnz"]),
        "sum_a": _activation_total(store, a, shard),
        "sum_b": _activation_total(store, b, shard),
    }


@dataclass(frozen=True)
class SavedPairs:
    """What `update_shard_pairs` wrote for one shard."""

    shard: str
    n_tokens: int
    d_a: int
    d_b: int
    nnz: int  # co-active pairs


_DTYPES = {"feature_a": np.int32, "feature_b": np.int32, "n_both": np.int64, "sum_xy": np.float64}


def save_shard_pairs(
    store: Store,
    a: int,
    b: int,
    shard: str,
    counts: PairCounts | Iterable[PairCounts],
    variant: Variant = PLAIN,
    feature_stats: tuple[FeatureStats, FeatureStats] | None = None,
) -> SavedPairs:
    """Store one shard's pair sums at `pairs/{a}-{b}/{shard}`, replacing any earlier version.

    `counts` may come as blocks of feature_a in order, written as they come. Besides the COO
    arrays, `indptr` (d_a + 1, int64) gives the rows of each feature_a, so a range of features
    is read without scanning `feature_a`. A variant's record also holds its `feature_stats`.
    """
    fingerprint = _fingerprint(store, a, b, shard, variant)
    per_feature = np.zeros(fingerprint["d_a"], np.int64)
    last = -1
    with store.staged(variant.path(a, b, shard)) as writer:
        for name, dtype in _DTYPES.items():
            writer.create(name, dtype)
        for block in [counts] if isinstance(counts, PairCounts) else counts:
            if block.nnz and block.feature_a[0] < last:
                raise RuntimeError(f"pair blocks of shard {shard} are not in feature order")
            for name in PAIR_ARRAYS:
                writer.append(name, getattr(block, name))
            per_feature += np.bincount(block.feature_a, minlength=per_feature.size)
            last = int(block.feature_a[-1]) if block.nnz else last
        writer.append("indptr", np.r_[0, np.cumsum(per_feature)].astype(np.int64))
        for side, stats in zip("ab", feature_stats or (), strict=False):
            for name in STATS_ARRAYS:
                writer.append(f"stats_{side}_{name}", np.asarray(getattr(stats, name)))
        writer.attrs.update(
            {
                **fingerprint,
                **encodings.stamp(spec.PAIR_STATS),
                "layers": [int(a), int(b)],
                "shard": shard,
            }
        )
    d_a, d_b = fingerprint["d_a"], fingerprint["d_b"]
    return SavedPairs(shard, fingerprint["n_tokens"], d_a, d_b, int(per_feature.sum()))


def update_shard_pairs(
    store: Store,
    a: int,
    b: int,
    shard: str,
    engine: str = defaults.DEFAULT_ENGINE,
    variant: Variant = PLAIN,
) -> SavedPairs:
    """Compute one shard's pair sums and save them, block by block where the engine allows.

    A variant reads the shard whole (`variant_matrices`) and takes the sparse or polars engine.
    Everything read is of one commit of the shard (`Store.consistently`).
    """
    return store.consistently(_update_shard_pairs, store, a, b, shard, engine, variant)


def _update_shard_pairs(
    store: Store, a: int, b: int, shard: str, engine: str, variant: Variant
) -> SavedPairs:
    if variant.plain:
        counts = iter_shard_pair_counts(store, a, b, shard, engine)
        return save_shard_pairs(store, a, b, shard, counts)
    m_a, m_b = variant_matrices(store, a, b, shard, variant)
    parts = variant_pair_counts(m_a, m_b, engine)
    stats = (FeatureStats.of(m_a), FeatureStats.of(m_b))
    return save_shard_pairs(store, a, b, shard, parts, variant, stats)


def variant_pair_counts(
    m_a: sp.csr_matrix,
    m_b: sp.csr_matrix,
    engine: str,
    sort: bool = True,
    screen: Screen | None = None,
) -> Iterator[PairCounts]:
    """Pair sums of a variant's matrices (`variant_matrices`) by the sparse or polars engine,
    as blocks of feature_a in order (see `iter_sparse_pair_counts`)."""
    if engine not in ("sparse", "polars"):
        raise FeatstoreError(f"the {engine} engine computes only the plain sums: use sparse")
    if engine == "polars":
        return iter([polars_pair_counts(m_a, m_b)])
    return iter_sparse_pair_counts(m_a, m_b, sort=sort, screen=screen)


def _saved_group(
    store: Store, a: int, b: int, shard: str, variant: Variant = PLAIN
) -> zarr.Group | None:
    """The saved, fresh pair group of a shard, else None; an unknown encoding is an error."""
    if shard not in store.children(variant.folder(a, b)):
        return None
    what = f"pair statistics {a}-{b} of shard {shard}"
    group = store.encoded(variant.path(a, b, shard), what, spec.PAIR_STATS)
    attrs = dict(group.attrs)
    fresh = all(attrs.get(k) == v for k, v in _fingerprint(store, a, b, shard, variant).items())
    return group if fresh else None


def ensure_shard_pairs(
    store: Store,
    a: int,
    b: int,
    shards: Sequence[str],
    engine: str = defaults.DEFAULT_ENGINE,
    recompute: bool = False,
    variant: Variant = PLAIN,
) -> list[str]:
    """Compute and save the pair sums of the shards that lack fresh ones; returns those shards."""
    todo = [s for s in shards if recompute or _saved_group(store, a, b, s, variant) is None]
    for shard in todo:
        if variant.plain:  # the plain call keeps its five arguments (tests replace it)
            update_shard_pairs(store, a, b, shard, engine)
        else:
            update_shard_pairs(store, a, b, shard, engine, variant)
    return todo


def load_shard_pairs(
    store: Store,
    a: int,
    b: int,
    shard: str,
    features_a: Range | None = None,
    variant: Variant = PLAIN,
) -> PairCounts | None:
    """Saved pair sums of a shard (only feature_a in [lo, hi)), or None if missing or stale."""
    group = _saved_group(store, a, b, shard, variant)
    return None if group is None else read_pairs(store, group, features_a)


def read_pairs(store: Store, group: zarr.Group, features_a: Range | None = None) -> PairCounts:
    """The pair sums of a saved group (`_saved_group`), only feature_a in [lo, hi)."""
    what = f"pair statistics {group.path}"
    attrs = group.attrs
    lo, hi = (0, attrs["d_a"]) if features_a is None else features_a
    rows = store.read_array(group, "indptr", what, slice(lo, hi + 1))
    if rows.size != hi - lo + 1 or rows[0] < 0 or np.any(np.diff(rows) < 0):
        raise store.corrupt(what, group.path, f"indptr not monotone over features {lo}..{hi}")
    sel = slice(int(rows[0]), int(rows[-1]))
    arrays = {f: store.read_array(group, f, what, sel) for f in PAIR_ARRAYS}
    problem = encodings.pair_problem(arrays, attrs["d_a"], attrs["d_b"])
    if problem or arrays["feature_a"].size != sel.stop - sel.start:
        raise store.corrupt(what, group.path, problem or "fewer pairs than indptr says")
    return PairCounts(attrs["n_tokens"], attrs["d_a"], attrs["d_b"], **arrays)


def saved_groups(
    store: Store, a: int, b: int, shards: Sequence[str], variant: Variant = PLAIN
) -> dict[str, zarr.Group | None]:
    """Each shard's fresh saved pair group, or None where missing or stale."""
    return {s: _saved_group(store, a, b, s, variant) for s in shards}


def shards_of_pair(store: Store, a: int, b: int, shards: Sequence[str] | None) -> list[str]:
    """The shards to use (default: every shard of either layer), each checked."""
    check_layers(store, a, b)
    if shards is None:
        chosen = sorted(set(store.shards(a)) | set(store.shards(b)))
    else:  # a shard named twice counts once
        chosen = list(dict.fromkeys(shards))
    if not chosen:
        raise FeatstoreError(f"layers {a} and {b} have no shards")
    dims = {check_shard(store, a, b, s)[1:] for s in chosen}
    if len(dims) > 1:
        raise FeatstoreError(f"layers {a}, {b}: shards differ in d_sae: {sorted(dims)}")
    return chosen


def merged_pair_counts(
    store: Store,
    a: int,
    b: int,
    shards: Sequence[str] | None = None,
    *,
    engine: str = defaults.DEFAULT_ENGINE,
    features_a: Range | None = None,
    recompute: bool = False,
) -> PairCounts:
    """Pair sums over `shards` (default all): missing or stale shard sums are computed and
    saved first (by `engine`), then the saved ones are read (only `features_a`) and summed."""
    chosen = shards_of_pair(store, a, b, shards)
    ensure_shard_pairs(store, a, b, chosen, engine, recompute)
    return PairCounts.total([load_shard_pairs(store, a, b, s, features_a) for s in chosen])


def feature_blocks(
    store: Store,
    a: int,
    b: int,
    shards: Sequence[str],
    features_a: Range,
    max_pairs: int,
    variant: Variant = PLAIN,
) -> list[Range]:
    """Cut `features_a` into ranges of at most ~`max_pairs` saved pairs (all shards together)."""
    groups = saved_groups(store, a, b, shards, variant)
    return group_blocks(store, list(groups.values()), features_a, max_pairs)


def group_blocks(
    store: Store, groups: Sequence[zarr.Group], features_a: Range, max_pairs: int
) -> list[Range]:
    """`feature_blocks` of saved groups."""
    lo, hi = features_a
    per_feature = np.zeros(hi - lo, np.int64)
    for group in groups:
        what = f"pair statistics {group.path}"
        per_feature += np.diff(
            np.asarray(store.read_array(group, "indptr", what, slice(lo, hi + 1)))
        )
    return [(lo + x, lo + y) for x, y in balanced_ranges(per_feature, max_pairs)]


def merged_feature_stats(store: Store, layer: int, shards: Sequence[str]) -> FeatureStats:
    stats = [store.feature_stats(layer, shard) for shard in shards]
    return functools.reduce(operator.add, stats)


def variant_stats(
    store: Store,
    a: int,
    b: int,
    shards: Sequence[str],
    variant: Variant = PLAIN,
    computed: Sequence[str] = (),
) -> tuple[FeatureStats, FeatureStats]:
    """Per-feature sums of both layers as a variant sees them, over `shards`: from the saved
    (fresh) sums, or from the variant's matrices for the shards `computed` in memory."""
    if variant.plain:
        return merged_feature_stats(store, a, shards), merged_feature_stats(store, b, shards)
    parts = [_variant_stats_of(store, a, b, shard, variant, shard in computed) for shard in shards]
    return (
        functools.reduce(operator.add, [p[0] for p in parts]),
        functools.reduce(operator.add, [p[1] for p in parts]),
    )


def _variant_stats_of(
    store: Store, a: int, b: int, shard: str, variant: Variant, compute: bool
) -> tuple[FeatureStats, FeatureStats]:
    """One shard's per-feature sums as a variant sees them, as `update_shard_pairs` saves them."""
    if compute:
        m_a, m_b = variant_matrices(store, a, b, shard, variant)
        return FeatureStats.of(m_a), FeatureStats.of(m_b)
    group = _saved_group(store, a, b, shard, variant)
    if group is None:
        raise FeatstoreError(f"no fresh {variant} sums of {a}-{b} shard {shard}")
    n_tokens = int(group.attrs["n_tokens"])
    a_stats, b_stats = (
        FeatureStats(n_tokens, *[np.asarray(group[f"stats_{side}_{n}"][:]) for n in STATS_ARRAYS])
        for side in "ab"
    )
    return a_stats, b_stats
