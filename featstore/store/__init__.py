"""The store wing: the on-disk format and everything that reads or writes it.

- `spec`: names, attribute keys and the format version (docs/STORE_FORMAT.md).
- `encodings`: every on-disk encoding's stamp, attribute check and value checks, registered by
  (encoding-type, encoding-version); readers dispatch on them.
- `local`: the `Store` on a local folder (its reads, and its writes as whole groups); `url`: the
  same on object storage (fsspec); `home`: `open_store`, which picks one.
- `transaction`: groups staged and committed together (`Store.transaction`, commit records,
  recovery of what a killed writer left); `writers`: how a group's arrays are written and the
  values that may enter them (`GroupWriter`, `ActivationWriter`, `FeatureStats`).
- `blockpass`: compiled passes over a block of codes on its way in (dense to CSR; checks and
  per-feature sums in one pass); `chunks`: whole Zarr chunks and `zarr.json`
  documents written straight to the store.
- `check`: verifying a whole store; `ingest`: importing activations computed elsewhere;
  `sql`: read-only DuckDB over the store (`sqlguard` its rules, `sqlcatalog` + `sqlindex`
  the columnar SQL index kept in step with the store, `sqlfiles` the Parquet tables).

May import: the ground floor (`featstore.errors`, `files`, `tables`, ...). Never the other wings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FeatureStats", "Store", "default_home", "open_store"]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (zarr only when a store is opened)."""
    if name in ("default_home", "open_store"):
        from featstore.store import home

        return getattr(home, name)
    if name in ("FeatureStats", "Store"):
        from featstore.store import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
