"""load_format="dummy": random weights from config.json alone, identical in every process (prefill and
decode nodes must agree), with the RoPE frequencies kept in float32 whatever the model dtype."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import TinyModel

from kvferry.engine.errors import InvalidArgumentError, ModelLoadError
from kvferry.engine.loader import load_model


@pytest.fixture
def config_only(tiny_model: Callable[[str], TinyModel], tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text((tiny_model("llama").path / "config.json").read_text())
    return tmp_path


def test_dummy_weights_are_reproducible(config_only: Path) -> None:
    a = load_model(str(config_only), torch.float32, "cpu", load_format="dummy")
    b = load_model(str(config_only), torch.float32, "cpu", load_format="dummy")
    assert a.fingerprint == b.fingerprint and a.fingerprint.endswith("dummy0")
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.tokenizer is None


def test_rope_frequencies_stay_float32_in_bf16(
    config_only: Path, tiny_model: Callable[[str], TinyModel]
) -> None:
    dummy = load_model(str(config_only), torch.bfloat16, "cpu", load_format="dummy")
    real = load_model(str(tiny_model("llama").path), torch.bfloat16, "cpu")
    for loaded in (dummy, real):
        assert loaded.model.model.rotary.inv_freq.dtype == torch.float32
        assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_dummy_needs_a_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), torch.float32, "cpu", load_format="dummy")


def test_load_format_is_validated() -> None:
    from kvferry.engine.config import EngineConfig

    with pytest.raises(InvalidArgumentError) as err:
        EngineConfig(load_format="random")
    assert err.value.field == "load_format"
