"""The GGUF conversion cache (engine/loader/gguf_cache.py): a cached load gives the model the
conversion gives, with the same fingerprint (a prefill and a decode node must agree whichever of them
found the cache); a damaged entry is converted again; an unwritable cache is no error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvferry.engine.loader import gguf_file, load_model
from kvferry.engine.loader.default_model import default_model_path
from kvferry.engine.loader.gguf_cache import WEIGHTS_FILE, cached_weights, store_weights, weights_entry

pytestmark = pytest.mark.slow  # converts the bundled SmolLM2 GGUF (~12 s)


def test_a_cached_load_is_the_converted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFERRY_CACHE", str(tmp_path))
    path = Path(default_model_path())
    converted = load_model(None, torch.float32, "cpu")
    entry = weights_entry(path)
    assert (entry / WEIGHTS_FILE).exists()

    def no_conversion(_: Path) -> None:
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(gguf_file, "_convert", no_conversion)
    cached = load_model(None, torch.float32, "cpu")
    assert cached.fingerprint == converted.fingerprint  # what a prefill and a decode node compare
    assert cached.config.to_dict() == converted.config.to_dict()
    ours, theirs = cached.model.state_dict(), converted.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert cached.model.lm_head.weight.data_ptr() == cached.model.model.embed_tokens.weight.data_ptr()  # tied

    older = entry.with_name("0123456789abcdef")  # the same file before a reinstall, or an older converter
    shutil.copytree(entry, older)
    (entry / WEIGHTS_FILE).write_bytes(b"a truncated file")
    assert cached_weights(path) is None  # so the loader converts again, and rewrites the entry
    assert store_weights(path, converted.config, {"w": torch.ones(2)})
    config, state_dict = cached_weights(path)  # type: ignore[misc]
    assert config.to_dict() == converted.config.to_dict() and torch.equal(state_dict["w"], torch.ones(2))
    assert not older.exists()  # replaced by the new entry


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder that cannot be made (read-only home), a disk that fills up while writing (safetensors
    raises its own error type) and a conversion too large to cache all leave the load working."""
    from transformers import LlamaConfig

    path = Path(default_model_path())
    config = LlamaConfig(hidden_size=64, num_attention_heads=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KVFERRY_CACHE", str(blocker / "cache"))
    assert not store_weights(path, config, {"w": torch.ones(2)})
    assert cached_weights(path) is None

    monkeypatch.setenv("KVFERRY_CACHE", str(tmp_path / "cache"))

    def disk_full(*args: object, **kwargs: object) -> None:
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    assert not store_weights(path, config, {"w": torch.ones(2)})
    assert cached_weights(path) is None
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no temporary folder left behind

    monkeypatch.setattr("kvferry.engine.loader.gguf_cache.MAX_CACHED_BYTES", 4)
    assert not store_weights(path, config, {"w": torch.ones(2)})  # 8 bytes: over the limit
