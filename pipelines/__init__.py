"""The Dagster side of featstore: assets, checks and sensors over `featstore`'s functions."""

from __future__ import annotations
