"""kvferry's inference engine: models, paged per-head KV cache, scheduler, sampler, offline API.

The names below load on first use, so `kvferry.engine.errors` (and other torch-free modules) import
without torch.
"""

from __future__ import annotations

from kvferry._lazy import lazy_exports

_MODULES = {
    "kvferry.engine.compression": ["CompressionParams"],
    "kvferry.engine.config": ["EngineConfig"],
    "kvferry.engine.errors": [
        "InvalidArgumentError",
        "KvferryError",
        "ModelLoadError",
        "ResourceExhaustedError",
        "UnsupportedModelError",
    ],
    "kvferry.engine.llm": ["LLM"],
    "kvferry.engine.llm_engine": ["LLMEngine"],
    "kvferry.engine.outputs": ["RequestOutput"],
    "kvferry.engine.sampling_params": ["SamplingParams"],
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})
