"""Bad input raises a typed error naming the offending field; sampling options do what they say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from builders import TINY_KV_BYTES, TinyModel, greedy, random_prompt, record_logits
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from kvferry.engine import (
    LLM,
    EngineConfig,
    InvalidArgumentError,
    KvferryError,
    ModelLoadError,
    SamplingParams,
    UnsupportedModelError,
)

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_MODEL_LEN = 64


def expect(excinfo: pytest.ExceptionInfo[Any], cls: type[KvferryError], field: str) -> str:
    """The error is exactly `cls`, carries `field`, and its message names the field."""
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__} raised, {cls.__name__} expected: {err}"
    assert err.field == field
    assert field in str(err), f"message does not name {field!r}: {err}"
    return str(err)


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(tiny: TinyModel) -> Iterator[LLM]:
    """The offline API over the tiny llama (token-id prompts; it ships no tokenizer)."""
    llm = LLM(
        str(tiny.path),
        device="cpu",
        dtype="float32",
        page_size=4,
        kv_cache_bytes=TINY_KV_BYTES,
        max_model_len=MAX_MODEL_LEN,
    )
    yield llm
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()


# ---- request validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**options)
    expect(e, InvalidArgumentError, field)


def test_sampling_params_revalidated_by_engine(llm: LLM) -> None:
    """A SamplingParams changed after construction is checked again when the request arrives."""
    sp = greedy(4)
    sp.top_p = 0.0
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate([1, 2, 3], sp)
    expect(e, InvalidArgumentError, "top_p")


@pytest.mark.parametrize(
    ("prompt", "what"),
    [
        ("", "empty text"),
        ([[]], "empty token list"),
        ([[5, 300]], "token id >= vocab"),
        ([[-1]], "negative id"),
    ],
)
def test_bad_prompt(llm: LLM, prompt: Any, what: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(prompt, greedy(4))
    expect(e, InvalidArgumentError, "prompt")


def test_empty_prompt_on_engine(llm: LLM) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        llm.engine.add_request([], greedy(4))
    expect(e, InvalidArgumentError, "prompt")


def test_prompt_over_max_model_len(llm: LLM, tiny: TinyModel) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(random_prompt(MAX_MODEL_LEN, tiny.vocab_size, 1), greedy(4))
    assert "max_model_len" in expect(e, InvalidArgumentError, "prompt")
    # One position short of the limit is accepted; without max_new_tokens the output gets the positions left.
    prompt = random_prompt(MAX_MODEL_LEN - 3, tiny.vocab_size, 1)
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    (out,) = llm.generate(prompt, greedy(3))
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("max_new_tokens", [4, 10**9])
def test_max_new_tokens_beyond_max_model_len_is_refused_before_any_page(
    llm: LLM, tiny: TinyModel, max_new_tokens: int
) -> None:
    """A request may not ask for more tokens than max_model_len leaves after its prompt: asking for 10^9
    would reserve pages for the whole context (clamped, as before, it held 17.5% of a decode pool)."""
    prompt = random_prompt(MAX_MODEL_LEN - 3, tiny.vocab_size, 1)
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(prompt, greedy(max_new_tokens))
    assert "room for 3" in expect(e, InvalidArgumentError, "max_new_tokens")
    assert not llm.engine.has_unfinished()
    assert llm.engine.pool.num_used == llm.engine.pool.num_reserved == 0


@pytest.mark.parametrize(
    ("compression", "field"),
    [
        ({"method": "streaming", "protected_spans": [(0, 11)]}, "protected_spans"),  # past the 10 tokens
        ({"method": "streaming", "protected_spans": [(3, 2**32 - 1)]}, "protected_spans"),
        ({"method": "streaming", "sink": 2**32 - 1}, "sink"),
        ({"method": "streaming", "recent": MAX_MODEL_LEN + 1}, "recent"),
        ({"method": "snapkv", "window": 10**12}, "window"),
        ({"method": "snapkv", "pool_kernel": 65}, "pool_kernel"),
        ({"method": "compactor", "attention_block": 4096}, "attention_block"),
        ({"method": "compactor", "sketch_size": 10**6}, "sketch_size"),
        ({"method": "compactor", "leverage_block": (1 << 20) + 1}, "leverage_block"),
        ({"method": "compactor", "leverage_weight": float("inf")}, "leverage_weight"),
    ],
)
def test_out_of_range_compression_is_refused(
    llm: LLM, tiny: TinyModel, compression: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate(random_prompt(10, tiny.vocab_size, 4), greedy(2), compression=compression)
    expect(e, InvalidArgumentError, field)
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()


def test_bad_request_in_a_batch_queues_nothing(llm: LLM, tiny: TinyModel) -> None:
    good = random_prompt(10, tiny.vocab_size, 2)
    with pytest.raises(InvalidArgumentError):
        llm.generate([good, []], greedy(4))
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()


def test_bad_chat_messages(llm: LLM) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate_chat([[]])
    expect(e, InvalidArgumentError, "messages")
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate_chat([[{"role": "user"}]])
    expect(e, InvalidArgumentError, "messages")
    with pytest.raises(InvalidArgumentError) as e:
        llm.generate_chat([[{"role": "user", "content": "hi"}, {"role": "hacker", "content": "x"}]])
    assert "'hacker'" in expect(e, InvalidArgumentError, "messages[1].role")


def test_text_longer_than_max_model_len_can_hold_is_refused_before_tokenizing(
    smollm2: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is max_model_len x the longest token's bytes; a 10 MB prompt is refused in
    milliseconds instead of being tokenized (7-24 s of CPU and gigabytes of RSS)."""
    import time

    from kvferry.engine.tokenizer import max_token_bytes

    tokenizer, max_len = smollm2.tokenizer, smollm2.engine.max_model_len
    assert max_token_bytes(tokenizer) == 81  # SmolLM2's longest token: 81 bytes of text
    calls = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    for text, chat in (("x" * (10 << 20), False), ("é" * (max_len * 81 // 2 + 1), True)):
        start = time.perf_counter()
        with pytest.raises(InvalidArgumentError) as e:
            if chat:
                smollm2.generate_chat([[{"role": "user", "content": text}]], greedy(2))
            else:
                smollm2.generate(text, greedy(2))
        assert time.perf_counter() - start < 1.0
        assert "max_model_len" in expect(e, InvalidArgumentError, "messages" if chat else "prompt")
    assert calls == []  # never tokenized
    (out,) = smollm2.generate("Hello " * 50, greedy(2))  # a text under the bound is served as before
    assert len(out.token_ids) == 2 and calls


def test_duplicate_request_id(llm: LLM, tiny: TinyModel) -> None:
    engine = llm.engine
    engine.add_request(random_prompt(5, tiny.vocab_size, 3), greedy(2), request_id="dup")
    with pytest.raises(InvalidArgumentError) as e:
        engine.add_request(random_prompt(5, tiny.vocab_size, 4), greedy(2), request_id="dup")
    expect(e, InvalidArgumentError, "request_id")
    assert engine.abort("dup")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"page_size": 0}, "page_size"),
        ({"prefill_chunk": 0}, "prefill_chunk"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_prefill_bypass": -1}, "max_prefill_bypass"),
        ({"dtype": "float64"}, "dtype"),
        ({"max_model_len": 1}, "max_model_len"),
    ],
)
def test_bad_engine_config(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        EngineConfig(**options)
    expect(e, InvalidArgumentError, field)


# ---- model loading --------------------------------------------------------------------------
def _load_error(path: Path, cls: type[KvferryError]) -> str:
    with pytest.raises(ModelLoadError) as e:
        LLM(str(path), device="cpu", dtype="float32", kv_cache_bytes=TINY_KV_BYTES)
    return expect(e, cls, "model")


def test_missing_model_path(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope", ModelLoadError)


def test_folder_without_config(tmp_path: Path) -> None:
    assert "config.json" in _load_error(tmp_path, ModelLoadError)


def test_folder_without_safetensors(tmp_path: Path, tiny: TinyModel) -> None:
    shutil.copy(tiny.path / "config.json", tmp_path / "config.json")
    assert "safetensors" in _load_error(tmp_path, ModelLoadError)


def test_config_not_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in _load_error(tmp_path, ModelLoadError)


def test_weights_missing_a_tensor(tmp_path: Path, tiny: TinyModel) -> None:
    shutil.copy(tiny.path / "config.json", tmp_path / "config.json")
    tensors = load_file(str(tiny.path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert "model.layers.1.self_attn.k_proj.weight" in _load_error(tmp_path, ModelLoadError)


def test_unsupported_model_type_gpt2(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    assert "gpt2" in _load_error(tmp_path, UnsupportedModelError)


def test_unknown_model_type(tmp_path: Path, tiny: TinyModel) -> None:
    """A model_type transformers does not know either is still our typed error, not a ValueError."""
    cfg = json.loads((tiny.path / "config.json").read_text())
    cfg["model_type"] = "not_a_model"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(tiny.path / "model.safetensors", tmp_path / "model.safetensors")
    assert "not_a_model" in _load_error(tmp_path, UnsupportedModelError)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "gpt2" in _load_error(path, UnsupportedModelError)


def test_corrupt_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    assert "broken.gguf" in _load_error(path, ModelLoadError)


def test_not_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "notes.txt" in _load_error(path, ModelLoadError)


# ---- sampling -------------------------------------------------------------------------------
PROMPTS = [[7], [11, 12, 13, 14, 15, 16, 17], list(range(40, 80))]


def _tokens(llm: LLM, prompts: list[list[int]], sp: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, sp)]


def test_top_k_1_and_tiny_top_p_equal_greedy(llm: LLM) -> None:
    want = _tokens(llm, PROMPTS, greedy(16))
    for seed in (0, 1):
        top_k = SamplingParams(temperature=1.5, top_k=1, seed=seed, max_new_tokens=16, ignore_eos=True)
        assert _tokens(llm, PROMPTS, top_k) == want
        top_p = SamplingParams(temperature=1.5, top_p=1e-6, seed=seed, max_new_tokens=16, ignore_eos=True)
        assert _tokens(llm, PROMPTS, top_p) == want


def test_seed_reproducible(llm: LLM) -> None:
    def sp(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, max_new_tokens=24, ignore_eos=True)

    first = _tokens(llm, PROMPTS, sp(42))
    assert _tokens(llm, PROMPTS, sp(42)) == first
    assert _tokens(llm, [PROMPTS[1], PROMPTS[1]], [sp(42), sp(42)]) == [first[1], first[1]]
    other = _tokens(llm, PROMPTS, sp(43))
    assert all(a != b for a, b in zip(first, other))
    assert first != _tokens(llm, PROMPTS, greedy(24))


@pytest.mark.parametrize("cut", ["top_k", "top_p"])
def test_sampled_tokens_stay_inside_the_cut(llm: LLM, cut: str) -> None:
    """Every sampled token is among the top-k (or inside the top-p nucleus) of its own step's
    logits, and sampling does leave the argmax sometimes."""
    options = {"top_k": 3} if cut == "top_k" else {"top_p": 0.6}
    temperature = 2.0
    prompt = PROMPTS[1]
    sp = SamplingParams(temperature=temperature, seed=5, max_new_tokens=32, ignore_eos=True, **options)
    with record_logits(llm.engine.model) as rows:
        (out,) = llm.generate(prompt, sp)
    step_logits = torch.cat(rows)[len(prompt) - 1 :]  # the logits each token was sampled from
    assert step_logits.shape[0] == len(out.token_ids) == 32
    for token, logits in zip(out.token_ids, step_logits):
        if cut == "top_k":
            allowed = set(torch.topk(logits, 3).indices.tolist())
        else:
            probs, order = torch.sort(torch.softmax(logits / temperature, -1), descending=True)
            inside = (probs.cumsum(0) - probs) < 0.6
            allowed = set(order[inside].tolist())
        assert token in allowed
    assert out.token_ids != step_logits.argmax(-1).tolist()


def test_stop_token_ids(llm: LLM) -> None:
    (base,) = llm.generate(PROMPTS[2], greedy(24))
    stop = base.token_ids[8]
    first = base.token_ids.index(stop)
    (out,) = llm.generate(PROMPTS[2], greedy(24, stop_token_ids=[stop]))
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_max_new_tokens_finishes_with_length(llm: LLM) -> None:
    for n in (1, 2, 9):
        outs = llm.generate(PROMPTS, greedy(n))
        assert all(len(o.token_ids) == n and o.finish_reason == "length" for o in outs)


def test_eos_from_config_stops_unless_ignored(tiny: TinyModel, tmp_path: Path) -> None:
    """The checkpoint's eos_token_id ends generation (reason "stop"); ignore_eos runs on."""
    plain = LLM(str(tiny.path), device="cpu", dtype="float32", kv_cache_bytes=TINY_KV_BYTES)
    (base,) = plain.generate(PROMPTS[2], greedy(20))
    eos = base.token_ids[6]
    shutil.copytree(tiny.path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path / "m"), device="cpu", dtype="float32", kv_cache_bytes=TINY_KV_BYTES)
    sp = SamplingParams(temperature=0.0, max_new_tokens=20)
    (out,) = llm.generate(PROMPTS[2], sp)
    assert out.token_ids == base.token_ids[: base.token_ids.index(eos) + 1]
    assert out.finish_reason == "stop"
    sp.ignore_eos = True
    (out,) = llm.generate(PROMPTS[2], sp)
    assert out.token_ids == base.token_ids and out.finish_reason == "length"


@pytest.mark.slow
def test_stop_strings_truncate_text(smollm2: LLM) -> None:
    chat = [[{"role": "user", "content": "Tell me a short story about a cat who finds a key."}]]
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    (base,) = smollm2.generate_chat(chat, sp)
    words = base.text.split()
    assert len(words) > 12, base.text
    stop_a, stop_b = words[9], words[6]  # the earlier one in the text must win
    cut = min(base.text.find(stop_a), base.text.find(stop_b))
    assert cut > 0
    (out,) = smollm2.generate_chat(
        chat, SamplingParams(temperature=0.0, max_new_tokens=40, stop=[stop_a, stop_b])
    )
    assert out.finish_reason == "stop"
    assert out.text == base.text[:cut]
    assert len(out.token_ids) < len(base.token_ids)
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    smollm2.engine.pool.assert_no_leaks()
