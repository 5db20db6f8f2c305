"""Structures planted in synthetic activations for the analyses to recover (`featstore.synth`).

Beside synth's copy/merge/split relations, between successive layers a and b:
- **pass-through chains**: a feature of the first layer copied exactly (same value, every token)
  to one feature of each later layer, so each link is the other's best match with Pearson 1;
- **AND gates**: a feature of b that fires exactly where two features of a both fire (value:
  the geometric mean of theirs), so each parent has necessity 1 for it;
- **OR gates**: a feature of b that fires where either of two features of a fires (value: their
  sum), so each parent has sufficiency 1 for it;
- **vanishing features**: features of a that nothing of b follows (no relation starts there).
Gate and chain children fire only through their parents. A zero count plants nothing and draws
no random numbers, so stores of earlier configurations are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from featstore.errors import FeatstoreError

KINDS = ("pass", "and", "or")
STRUCTURE_SCHEMA = {
    "layer_a": pl.Int32,
    "feature_a": pl.Int32,
    "layer_b": pl.Int32,
    "feature_b": pl.Int32,  # -1 for a vanishing feature (no child)
    "kind": pl.Utf8,  # pass, and, or, vanishing
}


@dataclass(frozen=True)
class Structures:
    """What is planted from one layer into the next."""

    pass_parent: np.ndarray  # (C,) features of layer a
    pass_child: np.ndarray  # (C,) their exact copies in layer b
    and_parents: np.ndarray  # (G, 2)
    and_child: np.ndarray  # (G,)
    or_parents: np.ndarray  # (G, 2)
    or_child: np.ndarray  # (G,)
    vanishing: np.ndarray  # (V,) features of layer a that nothing follows

    @property
    def children(self) -> np.ndarray:
        return np.concatenate([self.pass_child, self.and_child, self.or_child])

    @property
    def parents(self) -> np.ndarray:
        return np.concatenate([self.pass_parent, self.and_parents.ravel(), self.or_parents.ravel()])

    def child_rates(self, expected: np.ndarray) -> dict[int, float]:
        """Each child's firing rate, from its parents' (independent) rates."""
        out = dict(zip(self.pass_child.tolist(), expected[self.pass_parent].tolist(), strict=True))
        p = expected[self.and_parents]
        out |= dict(zip(self.and_child.tolist(), (p[:, 0] * p[:, 1]).tolist(), strict=True))
        p = expected[self.or_parents]
        out |= dict(
            zip(self.or_child.tolist(), (p.sum(1) - p[:, 0] * p[:, 1]).tolist(), strict=True)
        )
        return out


def _take(rng: np.random.Generator, pool: np.ndarray, n: int, what: str) -> np.ndarray:
    if n > pool.size:
        raise FeatstoreError(
            f"synth config: {n} {what} need more features than the {pool.size} that qualify: "
            "plant fewer or raise d_sae"
        )
    return rng.choice(pool, size=n, replace=False) if n else np.zeros(0, np.int64)


def plant(
    rng: np.random.Generator,
    counts: tuple[int, int, int],
    expected: np.ndarray,
    taken_parents: np.ndarray,
    taken_children: np.ndarray,
    chain: np.ndarray | None,
) -> Structures:
    """Draw the structures from a layer (firing rates `expected`) into the next.

    `counts`: (chains, gates of each kind, vanishing features); `taken_*`: features synth's own
    relations use there; `chain`: the chain's features in layer a (None: start the chains)."""
    n_chains, n_gates, n_vanishing = counts
    d = expected.size
    free = np.setdiff1d(np.arange(d), taken_parents)
    if chain is None:  # chains start at mid-to-frequent features
        lo, hi = np.quantile(expected, [0.5, 0.99])
        chain = _take(
            rng, free[(expected[free] >= lo) & (expected[free] <= hi)], n_chains, "chains"
        )
    free = np.setdiff1d(free, chain)
    by_rate = free[np.argsort(-expected[free], kind="stable")]
    gate_parents = _take(rng, by_rate[: 8 * n_gates], 4 * n_gates, "gates").reshape(-1, 2)
    rest = np.setdiff1d(free, gate_parents)
    lo, hi = np.quantile(expected, [0.5, 0.99])
    pool = rest[(expected[rest] >= lo) & (expected[rest] <= hi)]
    vanishing = np.sort(_take(rng, pool, n_vanishing, "vanishing features"))
    open_children = np.setdiff1d(np.arange(d), taken_children)
    children = _take(rng, open_children, chain.size + 2 * n_gates, "chain and gate children")
    return Structures(
        chain, children[: chain.size], gate_parents[:n_gates],
        children[chain.size : chain.size + n_gates], gate_parents[n_gates:],
        children[chain.size + n_gates :], vanishing,
    )  # fmt: skip


def carried(parent: sp.csr_matrix, s: Structures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the structures carry from a block of layer a, as (rows, cols, values) of layer b."""
    parts = []
    if s.pass_parent.size:
        events = parent[:, s.pass_parent].tocoo()
        parts.append((events.row, s.pass_child[events.col], events.data))
    if s.and_child.size:
        both = [parent[:, s.and_parents[:, k]].toarray() for k in (0, 1)]
        rows, gate = np.nonzero((both[0] > 0) & (both[1] > 0))
        parts.append((rows, s.and_child[gate], np.sqrt(both[0][rows, gate] * both[1][rows, gate])))
    for k in (0, 1):  # an OR child sums what each parent brings (duplicates add up)
        if s.or_child.size:
            events = parent[:, s.or_parents[:, k]].tocoo()
            parts.append((events.row, s.or_child[events.col], events.data))
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def structure_frame(a: int, b: int, s: Structures) -> pl.DataFrame:
    """The planted structures of one layer pair as rows of `STRUCTURE_SCHEMA`."""
    kinds = ["pass"] * s.pass_parent.size + ["and"] * s.and_parents.size
    kinds += ["or"] * s.or_parents.size + ["vanishing"] * s.vanishing.size
    fa = np.concatenate([s.pass_parent, s.and_parents.ravel(), s.or_parents.ravel(), s.vanishing])
    fb = np.concatenate(
        [s.pass_child, np.repeat(s.and_child, 2), np.repeat(s.or_child, 2),
         np.full(s.vanishing.size, -1)]
    )  # fmt: skip
    return pl.DataFrame(
        {"layer_a": np.full(fa.size, a), "feature_a": fa, "layer_b": np.full(fa.size, b),
         "feature_b": fb, "kind": kinds},
        schema=STRUCTURE_SCHEMA,
    )  # fmt: skip
