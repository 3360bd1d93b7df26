"""A Hugging Face model folder: config.json, *.safetensors, tokenizer files (no network access)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

from kvferry.engine.errors import ModelLoadError
from kvferry.engine.models import model_class

_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def read_hf_folder(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any | None]:
    from transformers import AutoConfig, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"model: {path} has no config.json", field="model")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model: {config_file} is not a valid JSON config: {e}", field="model") from e
    # Refuse an architecture we do not run before reading weights (transformers may not know it either).
    model_class(SimpleNamespace(model_type=raw.get("model_type") if isinstance(raw, dict) else None))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model: {path} has no *.safetensors weight files", field="model")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        state_dict.update(load_file(f))
    tokenizer = None
    if any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return config, fuse_experts(state_dict), tokenizer


def fuse_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert MoE weights (`experts.7.gate_proj.weight`) -> stacked `gate_up_proj`, `down_proj`."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for key, value in state_dict.items():
        m = _PER_EXPERT.match(key)
        if m:
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = value
        else:
            out[key] = value
    for prefix, parts in groups.items():
        n = len(parts["gate_proj"])
        gate = torch.stack([parts["gate_proj"][e] for e in range(n)])  # [E, I, H]
        up = torch.stack([parts["up_proj"][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])  # [E, H, I]
    return out
