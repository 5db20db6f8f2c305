"""The store wing: the on-disk format and everything that reads or writes it.

- `spec`: names, attribute keys and the format version (docs/STORE_FORMAT.md).
- `local`: the `Store` on a local folder; `url`: the same on object storage (fsspec);
  `home`: `open_store`, which picks one.
- `blockpass`: compiled passes over a block of codes on its way in (dense to CSR; checks and
  per-feature sums in one pass); `chunks`: whole Zarr chunks written straight to the store.
- `check`: verifying a whole store; `ingest`: importing activations computed elsewhere;
  `sql`: read-only DuckDB over the store.

May import: the ground floor (`featstore.errors`, `files`, `tables`, ...). Never the other wings.
"""

from __future__ import annotations

from featstore.store.home import default_home, open_store
from featstore.store.local import FeatureStats, Store

__all__ = ["FeatureStats", "Store", "default_home", "open_store"]
