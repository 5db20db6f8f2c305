"""Where a store lives: the default home and `open_store`, which picks the backend (a local
folder, or a Zarr hierarchy at a URL with `featstore.store.url`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.errors import FeatstoreError
from featstore.store import spec

if TYPE_CHECKING:  # imported when a store is opened: `featstore sql` starts without zarr
    from featstore.store.local import Store

DEFAULT_HOME = "featstore-data"


def default_home() -> Path:
    """`$FEATSTORE_HOME`, else `./featstore-data`."""
    return Path(os.environ.get("FEATSTORE_HOME", DEFAULT_HOME))


def open_store(
    home: str | os.PathLike[str] | None = None, *, create: bool = False, url: str | None = None
) -> Store:
    """Open the store under `home` (default `$FEATSTORE_HOME` or `./featstore-data`).

    With `url` (default `$FEATSTORE_STORE_URL`), e.g. `s3://bucket/prefix/store.zarr`, the Zarr
    hierarchy lives there (fsspec) and `home` keeps only locks and derived files.
    """
    from featstore.store.local import Store
    from featstore.store.url import UrlStore

    home_path = Path(home) if home is not None else default_home()
    if not str(home_path).strip() or (home_path.exists() and not home_path.is_dir()):
        raise FeatstoreError(f"store home {str(home_path)!r} is not a folder")
    url = url or os.environ.get(spec.STORE_URL_ENV) or None
    if url is not None and "://" in url and not url.startswith("file://"):
        return UrlStore(home_path, url, create=create)
    if url is not None:
        return Store(home_path, create=create, root=Path(url.removeprefix("file://")))
    return Store(home_path, create=create)
