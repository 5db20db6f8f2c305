"""featstore: sparse SAE activations across layers, their statistics and the feature graph."""

from __future__ import annotations

from featstore.errors import FeatstoreError
from featstore.store import Store, open_store

__all__ = ["FeatstoreError", "Store", "open_store"]
