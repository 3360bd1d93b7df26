"""The compression methods by name. Each scorer module adds its class with `@register("name")` when
engine/compression/__init__.py imports it; CompressionParams checks `method` against these names.

Kept apart from base.py (the Scorer class, which needs the params) so that params.py can read the
names without importing the scorers: no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

C = TypeVar("C", bound=type)

SCORERS: dict[str, type] = {}  # name -> a Scorer subclass


def register(name: str) -> Callable[[C], C]:
    def add(cls: C) -> C:
        if name in SCORERS:
            raise ValueError(f"compression method {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        SCORERS[name] = cls
        return cls

    return add
