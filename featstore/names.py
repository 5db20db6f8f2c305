"""How features are named across modules and files (ground floor)."""

from __future__ import annotations


def node_id(layer: int, feature: int) -> str:
    return f"L{layer}:{feature}"
