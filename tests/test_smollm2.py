"""The bundled SmolLM2-135M-Instruct GGUF through our engine equals transformers on the same file:
same weights (our dequantization and q/k un-permutation), same config and tokenizer, and greedy
generation token for token on three chat prompts, one of them >= 1,500 tokens (chunked prefill).

Marked slow (it loads the real model twice, ~30 s) but it runs in CI like every other test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import long_document, record_logits

from kvferry.engine import LLM, SamplingParams
from kvferry.engine.tokenizer import Message, encode_chat

pytestmark = pytest.mark.slow

NEW_TOKENS = 48
SECRET = "4817"
CHATS: list[list[Message]] = [
    [{"role": "user", "content": "What is 2+2? Answer with just the number."}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [
        {
            "role": "user",
            "content": long_document(64, f"The secret code of the blue door is {SECRET}.", seed=1)
            + "\n\nWhat is the secret code of the blue door?",
        },
        {"role": "assistant", "content": "The secret code of the blue door is"},  # answer prefix
    ],
]
# Our logits vs transformers' after 30 fp32 layers (different attention arithmetic); measured ~1e-5.
FIRST_LOGITS_ATOL = 1e-3


@dataclass
class Run:
    prompt_ids: list[int]
    ours: Any  # RequestOutput
    ours_first_logits: torch.Tensor
    hf_tokens: list[int]
    hf_first_logits: torch.Tensor


@pytest.fixture(scope="module")
def runs(smollm2: LLM, smollm2_hf: Any) -> list[Run]:
    """Our engine generates all three chats as ONE batch; transformers generates each alone."""
    engine = smollm2.engine
    prompts = [encode_chat(smollm2.tokenizer, c) for c in CHATS]
    engine.scheduler.max_prefill_bypass = 0  # prompts prefill in request order (shortest first is
    try:  # test_batching's), so the rows below are found by position
        with record_logits(engine.model) as rows:
            outs = smollm2.generate_chat(CHATS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
    finally:
        engine.scheduler.max_prefill_bypass = engine.config.max_prefill_bypass
    # All three are admitted at once and prefills run before any decode step, chunk by chunk in
    # request order; the last row of each request's last chunk predicted its first token.
    chunk = engine.scheduler.prefill_chunk
    prefill_rows = iter(rows)
    firsts = []
    for ids in prompts:
        for _ in range(-(-len(ids) // chunk)):
            last_chunk = next(prefill_rows)
        firsts.append(last_chunk[-1])
    result = []
    for ids, out, first in zip(prompts, outs, firsts):
        gen = smollm2_hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=sorted(engine.eos_ids),
            pad_token_id=smollm2.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        hf_tokens = gen.sequences[0, len(ids) :].tolist()
        result.append(Run(ids, out, first, hf_tokens, gen.logits[0][0].float()))
    engine.pool.assert_no_leaks()
    return result


def test_weights_equal_transformers(smollm2: LLM, smollm2_hf: Any) -> None:
    ours = smollm2.engine.model.state_dict()
    theirs = smollm2_hf.state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype == torch.float32, name
        assert torch.equal(ours[name], value), f"{name} differs by {(ours[name] - value).abs().max()}"


def test_config_matches_transformers(smollm2: LLM, smollm2_hf: Any) -> None:
    ours, theirs = smollm2.engine.loaded.config, smollm2_hf.config
    assert ours.model_type == theirs.model_type == "llama"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == (30, 9, 3)
    torch.testing.assert_close(
        smollm2.engine.model.model.rotary.inv_freq, smollm2_hf.model.rotary_emb.inv_freq, rtol=0, atol=0
    )
    assert 2 in smollm2.engine.eos_ids  # <|im_end|>


def test_tokenizer_matches_transformers(smollm2: LLM) -> None:
    from transformers import AutoTokenizer

    gguf = Path(smollm2.engine.loaded.source)
    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = ["Hello, world!", "  spaces\tand\nnewlines  ", "Zürich costs 4,817.50 €", CHATS[2][0]["content"]]
    for text in texts:
        assert smollm2.tokenizer(text).input_ids == theirs(text).input_ids
        assert smollm2.tokenizer.decode(theirs(text).input_ids) == theirs.decode(theirs(text).input_ids)
    for chat in CHATS:
        prefix = chat[-1]["role"] == "assistant"
        ids = theirs.apply_chat_template(
            chat, add_generation_prompt=not prefix, continue_final_message=prefix, tokenize=True
        )
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        assert encode_chat(smollm2.tokenizer, chat) == list(ids)


def test_long_prompt_is_long_and_chunked(smollm2: LLM, runs: list[Run]) -> None:
    assert len(runs[2].prompt_ids) >= 1500
    assert len(runs[2].prompt_ids) > 2 * smollm2.engine.scheduler.prefill_chunk


@pytest.mark.parametrize("i", range(len(CHATS)), ids=["arithmetic", "explain", "long_doc"])
def test_greedy_generation_matches_transformers(runs: list[Run], i: int) -> None:
    run = runs[i]
    assert run.ours.token_ids == run.hf_tokens
    diff = (run.ours_first_logits - run.hf_first_logits).abs().max().item()
    assert diff <= FIRST_LOGITS_ATOL, f"first-token logits differ by {diff}"


def test_answers_are_sensible(smollm2: LLM, runs: list[Run]) -> None:
    """What a user sees: a short answer ends on <|im_end|>, the long document's fact is recalled."""
    short = runs[0].ours
    assert short.finish_reason == "stop" and short.token_ids[-1] in smollm2.engine.eos_ids
    assert "4" in short.text
    assert runs[1].ours.finish_reason == "length" and len(runs[1].ours.token_ids) == NEW_TOKENS
    assert SECRET in runs[2].ours.text
