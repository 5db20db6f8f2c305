"""The one exception type users see: a one-line message naming what is wrong."""

from __future__ import annotations


class FeatstoreError(Exception):
    """A user-facing error; the CLI prints it on one line and exits with status 2."""


class StoreBusyError(FeatstoreError):
    """Another writer holds the lock of the shard being written."""
