"""A feature's neighbourhood across layers: the strongest partners layer by layer, as SVG.

From the centre feature the walk goes up (successors of successors) and down (predecessors of
predecessors) through every layer with merged pair statistics, keeping at each step the `k`
strongest partners of each node by the chosen measure that reach `threshold`, and at most
`per_layer` nodes a layer. Edges carry every measure, so the page can recolour and filter them
without asking again.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from featstore.defaults import DEFAULT_MEASURE
from featstore.explorer.reads import MEASURES, Explorer, check_measure_name

Node = tuple[int, int]


@dataclass(frozen=True)
class Neighbourhood:
    centre: Node
    measure: str
    threshold: float
    nodes: list[Node]  # by layer, then rank of discovery
    edges: pl.DataFrame  # layer_a, feature_a, layer_b, feature_b + every measure


def _step(ex: Explorer, node: Node, other: int, measure: str, threshold: float, k: int):
    frame = ex.pair_rows(node[0], other, node[1]).filter(pl.col(measure) >= threshold)
    return frame.sort(measure, descending=True, nulls_last=True).head(k)


def neighbourhood(
    ex: Explorer, layer: int, feature: int, measure: str = DEFAULT_MEASURE, threshold: float = 0.1,
    k: int = 4, per_layer: int = 8,
) -> Neighbourhood:  # fmt: skip
    """The centre's neighbourhood over the store's layers (see module doc)."""
    ex.check(layer, feature)
    check_measure_name(measure)
    nodes: dict[int, list[int]] = {layer: [feature]}
    edges = []
    for direction in (1, -1):
        frontier, here = [feature], layer
        later = [x for x in ex.layers if (x - layer) * direction > 0]
        for other in sorted(later, key=lambda x: abs(x - layer)):
            found: list[int] = []
            for f in frontier:
                step = _step(ex, (here, f), other, measure, threshold, k)
                key = "feature_b" if direction > 0 else "feature_a"
                for g in step[key].to_list():
                    if g not in found and len(found) < per_layer:
                        found.append(g)
                edges.append(step.filter(pl.col(key).is_in(found)))
            nodes[other], frontier, here = found, found, other
            if not found:
                break
    frame = pl.concat([e.select("layer_a", "feature_a", "layer_b", "feature_b", *MEASURES)
                       for e in edges]) if edges else pl.DataFrame()  # fmt: skip
    order = [(x, f) for x in sorted(nodes) for f in nodes[x]]
    ex.label_tokens(order)  # every node's label in one query a layer
    return Neighbourhood(
        (layer, feature), measure, threshold, order, frame.unique(maintain_order=True)
    )
