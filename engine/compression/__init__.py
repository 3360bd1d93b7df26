"""KV compression in prefill: scorers (a registry), budget policies, protection, select-and-pack.

Add a method: write engine/compression/<name>.py with a `@register("<name>")` Scorer subclass and
import it below.
"""

# Scorer modules register themselves on import.
from kvferry.engine.compression import baselines, compactor, kvcompress, snapkv  # noqa: F401
from kvferry.engine.compression.base import PromptShape, Scorer, make_scorer
from kvferry.engine.compression.observer import CompressionObserver, make_observer
from kvferry.engine.compression.params import BUDGETS, CompressionParams, as_compression_params
from kvferry.engine.compression.registry import SCORERS, register
from kvferry.engine.compression.select import compact_in_place, compress_kv, pack_kept, select_tokens

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
