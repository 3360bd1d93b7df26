"""How much of its prompt KV a request asks to keep: a ratio in (0, 1], `"auto"` (the prefill chooses
the ratio from the context, to keep a share `quality_target` of the full cache's quality), or a budget
in tokens (`keep_tokens`). The rules live here, torch-free, so that CompressionParams and the services'
operator policy (a coordinator never imports torch) check the same things the same way.
"""

from __future__ import annotations

import math
from typing import Any

from kvferry.engine.errors import require

AUTO = "auto"
DEFAULT_RETENTION = 0.5  # compression asked for with neither a retention nor keep_tokens
DEFAULT_QUALITY_TARGET = 0.95


def check_retention(value: Any, field: str = "retention") -> float | str:
    """A number in (0, 1] (returned as float) or "auto"."""
    if isinstance(value, str):
        require(value == AUTO, field, f'is a fraction of the KV kept in (0, 1] or "{AUTO}", got {value!r}')
        return AUTO
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    require(ok, field, f'is the fraction of KV kept and must be in (0, 1] or "{AUTO}", got {value!r}')
    return float(value)


def check_quality_target(value: Any, field: str = "quality_target") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    require(ok, field, f"is the share of full-cache quality to keep and must be in (0, 1], got {value!r}")
    return float(value)


def check_keep_tokens(value: Any, field: str = "keep_tokens") -> int:
    integral = isinstance(value, int) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )
    ok = integral and not isinstance(value, bool) and value >= 1
    require(ok, field, f"is a budget in prompt tokens per KV head and must be an integer >= 1, got {value!r}")
    return int(value)


def parse_retention(text: str, field: str = "retention") -> float | str:
    """A retention given as text (a flag, an environment variable): "auto" or a number."""
    text = text.strip().lower()
    if text == AUTO:
        return AUTO
    try:
        value: Any = float(text)
    except ValueError:
        value = text
    return check_retention(value, field)
