"""What a GGUF file converts to, cached on disk: its config and dequantized weights, and its tokenizer.

Reading the bundled SmolLM2 GGUF takes about 12 s of CPU per process (parsing the metadata, ~50K
vocabulary entries one field at a time, and dequantizing 4-bit blocks). A local cluster starts three
processes that each load it. The cache holds the converted float32 weights as safetensors, which load
in a fraction of a second, and the rebuilt tokenizer.

- An entry is keyed by the file's path, size and modification time, and for weights also by the
  converter's version (CONVERSION_VERSION, the gguf package's): a changed converter never serves an
  old conversion, and a new entry removes the older ones of the same file.
- Float32 weights take ~4.5x a 4-bit file (514 MB for SmolLM2's 98 MB): only conversions of up to
  MAX_CACHED_BYTES are cached, and only while the disk keeps twice that free.
- An entry is written to a temporary folder and renamed into place (concurrent loaders never see half
  of one); temporary folders older than an hour (a killed writer's) are swept; an unreadable entry is
  converted and written again.
- Any failure to write (read-only home, full disk) leaves the load working without a cache.

`KVFERRY_CACHE` moves the cache (default ~/.cache/kvferry).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SOURCE_FILE = "source.txt"  # the GGUF's path: a newer entry for it replaces the older ones
CONVERSION_VERSION = 1  # bump when engine/loader/gguf_file.py converts differently
MAX_CACHED_BYTES = 4 << 30
STALE_TMP_SECONDS = 3600


def cache_dir() -> Path:
    root = os.environ.get("KVFERRY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvferry")
    return Path(root)


def file_key(path: Path, *extra: object) -> str:
    stat = path.stat()
    text = ":".join(str(part) for part in (path.resolve(), stat.st_size, stat.st_mtime_ns, *extra))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_entry(path: Path) -> Path:
    return cache_dir() / "gguf" / file_key(path, CONVERSION_VERSION, _gguf_version())


@functools.cache
def _gguf_version() -> str:
    """The installed gguf package's version, from its metadata: importing gguf would cost a cached
    load 0.13 s, and the module carries no version of its own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _store(entry: Path, write: Callable[[Path], None]) -> None:
    """Write a cache entry through a temporary folder renamed into place; never raises."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_tmp(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp", dir=entry.parent))
    except OSError as e:
        log.info("no cache entry %s: %s", entry, e)
        return
    try:
        write(tmp)
        if entry.exists():  # unreadable (being rewritten), or just written by a concurrent loader
            shutil.rmtree(entry, ignore_errors=True)
        tmp.replace(entry)
    except Exception as e:  # noqa: BLE001  (disk full: safetensors raises its own error type)
        log.warning(
            "could not write the cache entry %s (%s: %s): loading without it", entry, type(e).__name__, e
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_tmp(folder: Path) -> None:
    """Temporary folders a killed writer left behind."""
    now = time.time()
    for tmp in folder.glob("*.tmp*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def cached_weights(path: Path) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """(config, state_dict) converted from the GGUF at `path` earlier, or None."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    entry = weights_entry(path)
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


def store_weights(path: Path, config: Any, state_dict: dict[str, torch.Tensor]) -> bool:
    """Cache a conversion if it is small enough and the disk has room; whether it was written."""
    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    entry = weights_entry(path)
    if size > MAX_CACHED_BYTES:
        log.info(
            "not caching the %.1f GiB conversion of %s (over %d GiB)",
            size / 2**30,
            path,
            MAX_CACHED_BYTES >> 30,
        )
        return False
    try:
        free = shutil.disk_usage(_existing_parent(entry)).free
    except OSError:
        return False
    if free < 2 * size:
        log.info("not caching the conversion of %s: %.1f GiB free on disk", path, free / 2**30)
        return False

    def write(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / WEIGHTS_FILE))
        (folder / SOURCE_FILE).write_text(str(path.resolve()))

    _store(entry, write)
    if not entry.exists():
        return False
    _drop_older_entries(path, entry)
    return True


def _drop_older_entries(path: Path, keep: Path) -> None:
    """Entries of the same file from before it changed (a reinstall) or from an older converter."""
    source = str(path.resolve())
    for other in keep.parent.iterdir():
        try:
            if other != keep and (other / SOURCE_FILE).read_text() == source:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            continue


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
