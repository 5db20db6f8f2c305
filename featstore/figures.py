"""Saving matplotlib figures as PNG files atomically, and the small pieces every figure shares
(ground floor: imports nothing of featstore but `files`)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from featstore.files import atomic_file

DPI = 120


PathLike = str | os.PathLike[str]


def save(fig: Figure, path: PathLike) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return Path(path)


def pair_label(pair: tuple[int, int]) -> str:
    return f"L{pair[0]} → L{pair[1]}"


def no_data(fig: Figure, what: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.set_axis_off()
