"""Qwen3-MoE (HF model_type `qwen3_moe`): Qwen3 attention with top-k routed experts."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvferry.engine.layers.mlp import GatedMLP
from kvferry.engine.layers.moe import SparseMoE
from kvferry.engine.models.decoder import CausalLM


class Qwen3MoeForCausalLM(CausalLM):
    qk_norm = True
    supports_cuda_graphs = False  # routing reads the chosen experts back to the host

    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        dense_layers = getattr(config, "mlp_only_layers", None) or []
        if layer_idx not in dense_layers and config.num_experts > 0 and (layer_idx + 1) % sparse_step == 0:
            return SparseMoE(config)
        return GatedMLP(config.hidden_size, config.intermediate_size)
