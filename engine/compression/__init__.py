"""KV compression in prefill: scorers (a registry), budget policies, protection, select-and-pack.

Add a method: write engine/compression/<name>.py with a `@register("<name>")` Scorer subclass and
import it below.
"""

# Scorer modules register themselves on import.
from engine.compression import baselines, compactor, kvcompress, snapkv  # noqa: F401
from engine.compression.base import SCORERS, PromptShape, Scorer, make_scorer, register
from engine.compression.observer import CompressionObserver, make_observer
from engine.compression.params import BUDGETS, CompressionParams, as_compression_params
from engine.compression.select import compact_in_place, compress_kv, pack_kept, select_tokens

__all__ = [
    "BUDGETS",
    "SCORERS",
    "CompressionObserver",
    "CompressionParams",
    "PromptShape",
    "Scorer",
    "as_compression_params",
    "compact_in_place",
    "compress_kv",
    "make_observer",
    "make_scorer",
    "pack_kept",
    "register",
    "select_tokens",
]
