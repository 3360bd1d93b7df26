"""A GGUF file (llama.cpp format): config, dequantized weights in HF naming, tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvferry.engine.errors import ModelLoadError, UnsupportedModelError

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_ARCH_MODEL_TYPE = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
# GGUF metadata key (after the "<arch>." prefix) -> HF config attribute
_CONFIG_FIELDS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _config(reader: Any, tensor_names: set[str]) -> Any:
    from transformers import AutoConfig

    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_MODEL_TYPE:
        raise UnsupportedModelError(
            f"model: GGUF architecture {arch!r} is not supported; kvferry runs {sorted(_ARCH_MODEL_TYPE)}",
            field="model",
        )
    values = {hf: _field(reader, f"{arch}.{key}") for key, hf in _CONFIG_FIELDS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if "head_dim" not in values and arch == "llama":
        values["head_dim"] = _field(reader, "llama.rope.dimension_count")
    if "vocab_size" not in values:
        values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = _field(reader, f"tokenizer.ggml.{name.replace('pad_', 'padding_')}")
        if value is not None:
            values[name] = value
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch == "qwen3moe":
        values["norm_topk_prob"] = True
    return AutoConfig.for_model(_ARCH_MODEL_TYPE[arch], **values)


def read_gguf(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    """(config, state dict in HF naming, tokenizer); converted once, then read from the disk cache."""
    from kvferry.engine.loader.gguf_cache import cached_weights, gguf_tokenizer, store_weights

    cached = cached_weights(path)
    if cached is not None:
        return (*cached, gguf_tokenizer(path))
    config, state_dict = _convert(path)
    store_weights(path, config, state_dict)
    return config, state_dict, gguf_tokenizer(path)


def _convert(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a corrupt or foreign file
        raise ModelLoadError(f"model: cannot read GGUF file {path}: {e}", field="model") from e
    config = _config(reader, {t.name for t in reader.tensors})
    model_type = config.model_type
    state_dict: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        value = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        m = _TENSOR.match(t.name)
        if m is None:
            base, _, kind = t.name.rpartition(".")
            if base not in _TOP_NAMES:
                raise ModelLoadError(f"unknown GGUF tensor {t.name}", field="model")
            state_dict[f"{_TOP_NAMES[base]}.{kind}"] = value
            continue
        layer, part, kind = int(m[1]), m[2], m[3]
        if model_type == "llama" and part == "attn_q":
            value = _unpermute(value, config.num_attention_heads)
        elif model_type == "llama" and part == "attn_k":
            value = _unpermute(value, config.num_key_value_heads)
        if part in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):  # stacked experts [E, rows, cols]
            experts.setdefault(layer, {})[part] = value
            continue
        if part not in _BLOCK_NAMES:
            raise ModelLoadError(f"unknown GGUF tensor {t.name}", field="model")
        state_dict[f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"] = value
    for layer, parts in experts.items():
        state_dict[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat(
            [parts["ffn_gate_exps"], parts["ffn_up_exps"]], dim=1
        )
        state_dict[f"model.layers.{layer}.mlp.experts.down_proj"] = parts["ffn_down_exps"]
    return config, state_dict
