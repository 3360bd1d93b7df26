"""Our llama / qwen3 / qwen3_moe match transformers' logits on tiny random checkpoints.

Each tiny model is built by transformers with O(1)-scale random weights, saved as a real model
folder, and loaded by our loader. The engine then runs it through the paged cache (whole-prompt or
chunked prefill, then greedy decode) and every logit it computes is compared with transformers'
full recompute of the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from builders import TINY_KINDS, TinyModel, greedy, random_prompt, record_logits, run_to_completion
from safetensors import safe_open

from kvferry.engine.layers.rotary import inverse_frequencies

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4
PROMPT_LEN = 37
DECODE_STEPS = 16
KINDS = list(TINY_KINDS)


def _chunk_sizes(prompt_len: int, chunk: int) -> list[int]:
    return [min(chunk, prompt_len - s) for s in range(0, prompt_len, chunk)]


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_weights_equal_transformers(tiny_model: Callable[[str], TinyModel], kind: str) -> None:
    tm = tiny_model(kind)
    ours = tm.loaded.model.state_dict()
    theirs = tm.hf.state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    if tm.hf.config.tie_word_embeddings:
        assert (
            tm.loaded.model.lm_head.weight.data_ptr() == tm.loaded.model.model.embed_tokens.weight.data_ptr()
        )


def test_qwen3_moe_checkpoints_cover_both_expert_layouts(tiny_model: Callable[[str], TinyModel]) -> None:
    """The two qwen3_moe folders really hold the two layouts the loader must accept."""

    def keys(tm: TinyModel) -> set[str]:
        with safe_open(str(tm.path / "model.safetensors"), "pt") as f:
            return set(f.keys())

    per_expert = keys(tiny_model("qwen3_moe"))
    fused = keys(tiny_model("qwen3_moe_fused"))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in per_expert
    assert "model.layers.0.mlp.experts.gate_up_proj" not in per_expert
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    assert not any(".experts.0." in k for k in fused)


@pytest.mark.parametrize("kind", ["llama3_rope", "llama3_rope_legacy_keys"])
def test_llama3_rope_frequencies_match_transformers(
    tiny_model: Callable[[str], TinyModel], kind: str
) -> None:
    tm = tiny_model(kind)
    ours = tm.loaded.model.model.rotary.inv_freq
    theirs = tm.hf.model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    plain = inverse_frequencies(16, {"rope_theta": 10000.0, "rope_type": "default"})
    assert not torch.allclose(ours, plain), "llama3 scaling was not applied"
    if kind == "llama3_rope_legacy_keys":
        assert '"rope_scaling"' in (tm.path / "config.json").read_text()


@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("prefill_chunk", [64, 10], ids=["whole_prompt", "chunk10"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_logits_match_transformers(
    tiny_model: Callable[[str], TinyModel], kind: str, prefill_chunk: int, page_size: int
) -> None:
    tm = tiny_model(kind)
    engine = tm.engine(page_size=page_size, prefill_chunk=prefill_chunk)
    prompt = random_prompt(PROMPT_LEN, tm.vocab_size, seed=1000 + prefill_chunk + page_size)
    with record_logits(engine.model) as rows:
        (seq,) = run_to_completion(engine, [prompt], [greedy(DECODE_STEPS + 1)])
    out = seq.output_token_ids
    assert len(out) == DECODE_STEPS + 1 and seq.finish_reason == "length"
    # The engine really ran the prompt in the intended chunks, then one token per decode step.
    assert [r.shape[0] for r in rows] == _chunk_sizes(PROMPT_LEN, prefill_chunk) + [1] * DECODE_STEPS
    ours = torch.cat(rows)  # [37 + 16, V]: every fed position
    ref = tm.reference_logits(prompt + out[:DECODE_STEPS])
    assert ref.std() > 0.5, "reference logits are too flat to tell models apart"
    prefill_diff = (ours[:PROMPT_LEN] - ref[:PROMPT_LEN]).abs().max().item()
    decode_diff = (ours[PROMPT_LEN:] - ref[PROMPT_LEN:]).abs().max().item()
    assert prefill_diff <= ATOL, f"prefill logits differ by {prefill_diff}"
    assert decode_diff <= ATOL, f"decode logits differ by {decode_diff}"
    assert out == ref[PROMPT_LEN - 1 :].argmax(-1).tolist()
    engine.pool.assert_no_leaks()


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_runner_prefill_returns_last_prompt_token_logits(
    tiny_model: Callable[[str], TinyModel], kind: str
) -> None:
    """ModelRunner.prefill returns nothing until the last chunk, then the last prompt token's logits."""
    tm = tiny_model(kind)
    engine = tm.engine(page_size=4, prefill_chunk=10)
    prompt = random_prompt(PROMPT_LEN, tm.vocab_size, seed=7)
    seq = engine.make_sequence(prompt, greedy(4))
    engine.scheduler.add(seq)
    results = []
    while seq.num_prefilled < len(prompt):
        step = engine.scheduler.schedule()
        assert step is not None and step.seq is seq  # type: ignore[union-attr]
        results.append(engine.runner.prefill(seq, step.num_tokens))  # type: ignore[union-attr]
    assert [r is None for r in results] == [True, True, True, False]
    ref = tm.reference_logits(prompt)[-1]
    assert (results[-1] - ref).abs().max().item() <= ATOL
    engine.scheduler.finish(seq, "abort")
    engine.pool.assert_no_leaks()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe"])
def test_batched_decode_logits_match_transformers(tiny_model: Callable[[str], TinyModel], kind: str) -> None:
    """Sequences of different lengths (and page counts) decoded in one batch: each one's logits
    equal transformers' for that sequence alone."""
    tm = tiny_model(kind)
    engine = tm.engine(page_size=4, prefill_chunk=16)
    engine.scheduler.max_prefill_bypass = 0  # request order (the rows below are found by position)
    lengths = [5, 23, 37, 2]
    prompts = [random_prompt(n, tm.vocab_size, seed=50 + n) for n in lengths]
    steps = 8
    with record_logits(engine.model) as rows:
        seqs = run_to_completion(engine, prompts, [greedy(steps + 1) for _ in prompts])
    prefill_rows = sum(len(_chunk_sizes(n, 16)) for n in lengths)
    decode_rows = rows[prefill_rows:]
    assert [r.shape[0] for r in decode_rows] == [len(prompts)] * steps  # one batch per step
    # Prefill rows come per sequence in admission order.
    it = iter(rows[:prefill_rows])
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        prefill = torch.cat([next(it) for _ in _chunk_sizes(n, 16)])
        ours = torch.cat([prefill, torch.stack([r[i] for r in decode_rows])])
        ref = tm.reference_logits(prompts[i] + seq.output_token_ids[:steps])
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"sequence {i} (prompt {n}) differs by {diff}"
    engine.pool.assert_no_leaks()
