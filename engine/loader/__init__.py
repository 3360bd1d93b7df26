"""Load a model, its config and tokenizer from a HF folder, a GGUF file, or the bundled default."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvferry.engine.errors import ModelLoadError
from kvferry.engine.loader.default_model import default_model_path
from kvferry.engine.loader.gguf_file import read_gguf
from kvferry.engine.loader.hf_folder import read_hf_folder
from kvferry.engine.models import CausalLM, model_class


@dataclass
class LoadedModel:
    model: CausalLM
    config: Any
    tokenizer: Any | None  # a HF tokenizer, or None when the source ships none (token-id prompts only)
    fingerprint: str  # identifies architecture + weights source; prefill and decode must agree
    source: str
    # names the weights by their files' names and sizes: stable across library versions (the fingerprint
    # hashes the config as transformers renders it); what a calibration is keyed by. None: dummy weights
    weights_key: str | None = None


def load_model(
    path: str | None, dtype: torch.dtype, device: torch.device | str, load_format: str = "auto"
) -> LoadedModel:
    """`load_format` "auto" reads the weights; "dummy" builds random ones from config.json alone."""
    source = str(path) if path else default_model_path()
    p = Path(source)
    if not p.exists():
        raise ModelLoadError(f"model path {source!r} does not exist", field="model")
    if load_format == "dummy":
        return _load_dummy(p, dtype, device)
    if p.is_file() and p.suffix == ".gguf":
        config, state_dict, tokenizer = read_gguf(p)
    elif p.is_dir():
        config, state_dict, tokenizer = read_hf_folder(p)
    else:
        raise ModelLoadError(
            f"model {source!r} is neither a GGUF file nor a Hugging Face model folder", field="model"
        )
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = _load_weights(model, state_dict)
    if missing or unexpected:
        raise ModelLoadError(
            f"model: weights in {source!r} do not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}",
            field="model",
        )
    model = model.to(device=device, dtype=dtype).eval()
    # After the dtype cast, which would round the RoPE frequencies to bf16 (angles off by ~0.4% at
    # long positions): they stay float32, as in transformers.
    model.model.rotary.inv_freq = _fresh_inv_freq(model).to(device)
    return LoadedModel(model, config, tokenizer, _fingerprint(config, p), source, weights_key(p))


def _load_dummy(path: Path, dtype: torch.dtype, device: torch.device | str) -> LoadedModel:
    from kvferry.engine.loader.dummy import DUMMY_SEED, build_dummy, read_config

    config, tokenizer = read_config(path)
    model = build_dummy(config, dtype, device)
    model.model.rotary.inv_freq = _fresh_inv_freq(model).to(device)
    fingerprint = _fingerprint(config, path)[:8] + f"-dummy{DUMMY_SEED}"
    return LoadedModel(model, config, tokenizer, fingerprint, str(path))


def _fresh_inv_freq(model: CausalLM) -> torch.Tensor:
    # Buffers built on the meta device hold no values; recompute them on CPU.
    from kvferry.engine.layers.rotary import inverse_frequencies, rope_parameters

    head_dim = model.model.layers[0].self_attn.head_dim
    return inverse_frequencies(head_dim, rope_parameters(model.config))


def _load_weights(model: CausalLM, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        state_dict.pop("lm_head.weight", None)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = list(result.missing_keys)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    return missing, list(result.unexpected_keys)


def _fingerprint(config: Any, path: Path) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for f in _weight_files(path):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _weight_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))


def weights_key(path: Path) -> str | None:
    """sha256 of the weight files' names and sizes (16 hex digits); None when there are none."""
    files = _weight_files(path)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]
