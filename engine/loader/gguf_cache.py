"""What a GGUF file converts to, cached on disk: its config and dequantized weights, and its tokenizer.

Reading the bundled SmolLM2 GGUF takes about 12 s of CPU per process (parsing the metadata, ~50K
vocabulary entries one field at a time, and dequantizing 4-bit blocks). A local cluster starts three
processes that each load it. The cache holds the converted float32 weights as safetensors, which load
in a fraction of a second, and the rebuilt tokenizer. An entry is keyed by the file's path, size and
modification time, is written to a temporary folder and renamed into place (concurrent loaders never
see half of one), and is rebuilt when unreadable. `KVFERRY_CACHE` moves the cache (default
~/.cache/kvferry); a read-only home just works without one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FILE = "model.safetensors"


def cache_dir() -> Path:
    root = os.environ.get("KVFERRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvferry")
    return Path(root)


def file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _store(entry: Path, write: Callable[[Path], None]) -> None:
    """Write a cache entry through a temporary folder renamed into place."""
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if entry.exists():  # unreadable (it is being rewritten) or just written by another process
            shutil.rmtree(entry, ignore_errors=True)
        tmp.replace(entry)
    except OSError:
        pass  # read-only or full disk: work without a cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_weights(path: Path) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """(config, state_dict) converted from the GGUF at `path` earlier, or None."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    entry = cache_dir() / "gguf" / file_key(path)
    if not (entry / WEIGHTS_FILE).exists():
        return None
    try:
        config = AutoConfig.from_pretrained(str(entry), local_files_only=True)
        state_dict = load_file(str(entry / WEIGHTS_FILE))
    except Exception:  # truncated, or written by another version: convert again
        return None
    # As the conversion leaves it (AutoConfig.for_model): the model's fingerprint hashes the config,
    # and a prefill and a decode node must agree whichever of them found the cache.
    config.name_or_path = ""
    return config, state_dict


def store_weights(path: Path, config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        folder.mkdir()
        config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / WEIGHTS_FILE))

    _store(cache_dir() / "gguf" / file_key(path), write)


def gguf_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer, rebuilt by transformers once (seconds) and then loaded from the cache."""
    from transformers import AutoTokenizer

    cached = cache_dir() / "tokenizers" / file_key(path)
    if (cached / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a cache written by another transformers version: rebuild it
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _store(cached, lambda folder: tokenizer.save_pretrained(str(folder)))
    return tokenizer
