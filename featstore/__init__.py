"""featstore: sparse SAE activations across layers, their statistics and the feature graph.

The package is a house with wings; imports flow one way, from the wings down:

- ground floor (this folder): `errors`, `files` (atomic writes), `figures` (saving PNGs),
  `tables` (rendering a frame), `sequences` (whole sequences read back), `names` (feature ids),
  `defaults` (every default: source, engines, thresholds, the pair table's schema; layers come
  from `sources/sources.yaml`), `settings` (a config built in one call from CLI arguments or a
  Dagster config).
  They import nothing of featstore but each other.
- `store/`: the on-disk format and everything that reads or writes it (spec, backends, check,
  ingest, SQL). Imports the ground floor.
- `sources/`: where activations come from (the registry of sources, extraction, the embedded
  model, sources generated on first use, synthetic data). Imports the ground floor and `store`.
- `stats/`: exact cross-layer pair statistics (kernel, per-shard sums, scans, measures, the
  query). Imports the ground floor and `store`.
- `analysis/`: what is built on them (graph, plots, patching and causal edges, comparison,
  concepts, erasure, cards). Imports everything below it.
- `explorer/`: `featstore serve`, the feature explorer (a local web app and its static export);
  reads everything below it, writes nothing to the store.
- `cli.py`: the command line, and `stages.py`: every stage in order without Dagster (for
  `bench/pipeline.py` and the end-to-end test), on top. Dagster lives outside, in `pipelines/`.

Public API: `open_store`, `Store`, `connect` (read-only SQL), `FeatstoreError`; the CLI; the
Dagster definitions. Names are imported on first use, so the CLI starts fast.
"""

from __future__ import annotations

from typing import Any

from featstore.errors import FeatstoreError

__all__ = ["FeatstoreError", "Store", "connect", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "open_store":
        from featstore.store.home import open_store

        return open_store
    if name == "Store":
        from featstore.store.local import Store

        return Store
    if name == "connect":
        from featstore.store.sql import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
