"""Qwen3 dense (HF model_type `qwen3`): Llama layout plus RMSNorm on each head's q and k."""

from __future__ import annotations

from kvferry.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
