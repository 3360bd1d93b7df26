"""Tokenizers rebuilt from a GGUF file, cached on disk (the rebuild takes seconds, a cached load does not)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    root = os.environ.get("KVFERRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvferry")
    return Path(root)


def gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a cache written by another transformers version: rebuild it
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
    try:
        tokenizer.save_pretrained(str(tmp))
        if not cached.exists():
            tmp.replace(cached)  # atomic: concurrent loaders never see a half-written cache
    except OSError:
        pass  # read-only home: work without a cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
