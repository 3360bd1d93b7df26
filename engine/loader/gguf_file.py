"""A GGUF file (llama.cpp format): config, dequantized weights in HF naming, tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError

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


def read_gguf(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    import gguf
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        meta = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as e:  # a corrupt or foreign file
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}", field="model") from e
    cfg = dict(meta["config"])
    model_type = cfg.pop("model_type", None)
    cfg.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(model_type, **cfg) if model_type else None
    if config is None or model_type not in ("llama", "qwen3", "qwen3_moe"):
        raise ModelLoadError(f"GGUF architecture {model_type!r} is not supported", field="model")
    reader = gguf.GGUFReader(str(path))
    if "output.weight" not in {t.name for t in reader.tensors}:
        config.tie_word_embeddings = True
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
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return config, state_dict, tokenizer
