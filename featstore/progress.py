"""Progress of long steps: a callback that takes one line (`print`, Dagster's `context.log.info`).

Library functions that run longer than a few seconds take `progress: Progress | None`; `Ticker`
turns their loop steps into a line at most every few seconds (and at the last step), with the
time spent and an estimate of the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str], None]


class Ticker:
    """Counts the `total` steps of `what`, reporting to `progress` (None: silent) at most every
    `every` seconds, and at the last step."""

    def __init__(self, progress: Progress | None, what: str, total: int, every: float = 5.0):
        self.progress, self.what, self.total, self.every = progress, what, max(total, 1), every
        self.done = 0
        self.start = self.last = time.monotonic()

    def step(self, n: int = 1, note: str = "") -> None:
        """`n` more steps done; `note` goes after the count."""
        self.done += n
        now = time.monotonic()
        if self.progress is None or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        spent = now - self.start
        left = spent / self.done * (self.total - self.done)
        tail = f", about {left:.0f}s left" if self.done < self.total else ""
        self.progress(f"{self.what}: {self.done}/{self.total}{note} ({spent:.0f}s{tail})")


def say(progress: Progress | None, message: str) -> None:
    """Report one line (None: nothing)."""
    if progress is not None:
        progress(message)
