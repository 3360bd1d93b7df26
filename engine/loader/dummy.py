"""Random weights for a model folder that holds only config.json (`load_format="dummy"`, as vLLM's
`--load-format dummy`): real shapes for speed work, no checkpoint to read.

Weights are built on the target device from a fixed seed, so two processes (a prefill and a decode
node) get identical weights. Each matrix has unit-variance outputs (std 1/sqrt(fan_in)) so logits are
sharp and greedy decoding has no near-ties that kernel rounding could flip."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kvferry.engine.errors import ModelLoadError
from kvferry.engine.models import CausalLM, model_class

DUMMY_SEED = 0


def read_config(path: Path) -> tuple[Any, Any | None]:
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"model: load_format dummy needs a folder with config.json, got {path}", field="model"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a config-only folder: token-id prompts only
        tokenizer = None
    return config, tokenizer


@torch.no_grad()
def build_dummy(config: Any, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    # Cast while on meta, so the device only ever holds the weights in their final dtype: filled in
    # fp32 and cast after, an 8B model peaked at 48 GB (32 + 16) per process, and a prefill and a
    # decode service starting together on one 80 GB GPU ran out of memory.
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(DUMMY_SEED)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
