"""Building a frozen config dataclass in one call from any object carrying its fields.

The CLI's parsed arguments, a Dagster `Config` and a resource all carry a config's fields as
attributes; `of` takes those present and set (the rest keep their defaults: None means unset)
plus explicit overrides, so no caller rebuilds a config field by field. `defaults` names a
config's defaults once for a Dagster `Config` that exposes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def of(cls: type[T], settings: Any, **overrides: Any) -> T:
    """`cls` (a dataclass) from the attributes of `settings` named as its fields, then
    `overrides`; a field `settings` lacks or leaves None keeps its default."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in overrides]  # type: ignore[arg-type]
    found = {n: getattr(settings, n, None) for n in names}
    # Lists (argparse's nargs, a Dagster list field) become the tuples a frozen config holds.
    given = {n: tuple(v) if isinstance(v, list) else v for n, v in found.items() if v is not None}
    return cls(**given, **overrides)


def defaults(cls: type) -> dict[str, Any]:
    """Each field of `cls` (a dataclass) with its default (a factory's value made once)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
