"""The GGUF conversion cache (engine/loader/gguf_cache.py): a cached load gives the model the
conversion gives, with the same fingerprint (a prefill and a decode node must agree whichever of them
found the cache); a damaged entry is converted again; an unwritable cache is no error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.loader import load_model
from engine.loader.default_model import default_model_path
from engine.loader.gguf_cache import WEIGHTS_FILE, cache_dir, cached_weights, file_key, store_weights

pytestmark = pytest.mark.slow  # converts the bundled SmolLM2 GGUF (~12 s)


def test_a_cached_load_is_the_converted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFERRY_CACHE", str(tmp_path))
    path = Path(default_model_path())
    converted = load_model(None, torch.float32, "cpu")
    entry = cache_dir() / "gguf" / file_key(path)
    assert (entry / WEIGHTS_FILE).exists()
    cached = load_model(None, torch.float32, "cpu")
    assert cached.fingerprint == converted.fingerprint
    assert cached.config.to_dict() == converted.config.to_dict()
    ours, theirs = cached.model.state_dict(), converted.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert cached.model.lm_head.weight.data_ptr() == cached.model.model.embed_tokens.weight.data_ptr()  # tied

    (entry / WEIGHTS_FILE).write_bytes(b"a truncated file")
    assert cached_weights(path) is None  # so the loader converts again, and rewrites the entry
    store_weights(path, converted.config, {"w": torch.ones(2)})
    config, state_dict = cached_weights(path)  # type: ignore[misc]
    assert config.to_dict() == converted.config.to_dict() and torch.equal(state_dict["w"], torch.ones(2))


def test_an_unwritable_cache_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KVFERRY_CACHE", str(blocker / "cache"))
    path = Path(default_model_path())
    from transformers import LlamaConfig

    store_weights(
        path, LlamaConfig(hidden_size=64, num_attention_heads=4), {"w": torch.ones(2)}
    )  # cannot create the folder
    assert cached_weights(path) is None
