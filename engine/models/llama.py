"""Llama 3.x and SmolLM2 (HF model_type `llama`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvferry.engine.layers.mlp import GatedMLP
from kvferry.engine.models.decoder import CausalLM


class LlamaForCausalLM(CausalLM):
    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        return GatedMLP(
            config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        )
