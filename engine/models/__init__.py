"""Model registry keyed by the Hugging Face `config.model_type`."""

from __future__ import annotations

from typing import Any

from kvferry.engine.errors import UnsupportedModelError
from kvferry.engine.models.decoder import CausalLM
from kvferry.engine.models.llama import LlamaForCausalLM
from kvferry.engine.models.qwen3 import Qwen3ForCausalLM
from kvferry.engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}


def model_class(config: Any) -> type[CausalLM]:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; kvferry runs {sorted(MODEL_REGISTRY)}",
            field="model",
        )
    return MODEL_REGISTRY[model_type]
