"""Compression inside the engine, end to end on a tiny random Llama: every scorer and budget runs,
retention 1.0 is exactly uncompressed, stats report the real kept counts, protected tokens survive
in the pages, dropped pages return to the pool, and bad parameters are refused up front."""

from __future__ import annotations

import math

import pytest
import torch
from builders import HEAD_DIM, KV_HEADS, LAYERS, save_tiny_llama

from kvferry.engine import LLM, CompressionParams, InvalidArgumentError, SamplingParams
from kvferry.engine.compression import SCORERS
from kvferry.engine.compression.budget import uniform_share

PAGE = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return LLM(
        str(path), device="cpu", dtype="float32", page_size=PAGE, prefill_chunk=64, kv_cache_bytes=16 << 20
    )


def prompts(*lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, 300, (n,), generator=gen).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("method", sorted(SCORERS))
@pytest.mark.parametrize("budget", ["uniform", "adaptive", "global"])
def test_every_scorer_runs_and_reports_what_it_kept(llm: LLM, method: str, budget: str) -> None:
    batch = prompts(150, 229)
    params = CompressionParams(method=method, retention=0.4, budget=budget, sink=4, recent=8)
    outs = llm.generate(batch, GREEDY, compression=params)
    for prompt, out in zip(batch, outs):
        st = out.stats
        n = len(prompt)
        assert len(out.token_ids) == 12
        assert len(st.kept_tokens_per_layer) == LAYERS and sum(st.kept_tokens_per_layer) == st.kept_tokens
        assert st.full_tokens == n * LAYERS * KV_HEADS
        if method == "none":
            assert st.kept_tokens == st.full_tokens and st.kv_bytes == st.kv_bytes_full
            assert st.scoring_seconds == 0.0
            continue
        share = uniform_share(n, 0.4)
        if budget == "uniform":
            assert st.kept_tokens_per_layer == [KV_HEADS * share] * LAYERS
        elif budget == "adaptive":
            assert st.kept_tokens_per_layer == [KV_HEADS * share] * LAYERS  # the layer total is fixed
        else:
            assert st.kept_tokens == LAYERS * KV_HEADS * share
        assert st.kv_pages >= math.ceil(st.kept_tokens / PAGE)
        assert st.kv_bytes == st.kv_pages * llm.engine.pool.bytes_per_page < st.kv_bytes_full
        assert 0.0 < st.scoring_seconds < st.prefill_seconds
    llm.engine.pool.assert_no_leaks()


def test_full_retention_and_none_are_exactly_uncompressed(llm: LLM) -> None:
    batch = prompts(97, 200, 256)
    full = [o.token_ids for o in llm.generate(batch, GREEDY)]
    for method in sorted(SCORERS):
        outs = llm.generate(batch, GREEDY, compression=CompressionParams(method=method, retention=1.0))
        assert [o.token_ids for o in outs] == full, method
        assert all(o.stats.retention == 1.0 for o in outs)
    outs = llm.generate(batch, GREEDY, compression=CompressionParams(method="none", retention=0.1))
    assert [o.token_ids for o in outs] == full
    llm.engine.pool.assert_no_leaks()


def test_compression_changes_what_decode_attends_to(llm: LLM) -> None:
    # The guard for the test above: if decode ignored the compacted layout, nothing would change.
    batch = prompts(180, 240)
    full = [o.token_ids for o in llm.generate(batch, GREEDY)]
    squeezed = llm.generate(batch, GREEDY, compression=CompressionParams(method="random", retention=0.1))
    assert [o.token_ids for o in squeezed] != full


def test_per_prompt_compression_list(llm: LLM) -> None:
    batch = prompts(120, 130)
    outs = llm.generate(batch, GREEDY, compression=[None, CompressionParams(retention=0.5)])
    assert outs[0].stats.retention == 1.0
    assert outs[1].stats.kept_tokens == LAYERS * KV_HEADS * 65


def held_heads(llm: LLM, prompt: list[int], compression: object) -> list[list[torch.Tensor]]:
    """Prefill with hold_kv and read back what each (layer, head) holds: [L][H] -> K [len, D]."""
    engine = llm.engine
    seq = engine.add_request(prompt, GREEDY, compression, hold_kv=True)
    while engine.has_unfinished():
        engine.step()
    layout, page_ids = engine.held_kv(seq.request_id)
    assert engine.pool.num_used == layout.num_pages == seq.stats.kv_pages
    keys = engine.pool.kv[page_ids, 0].reshape(-1, HEAD_DIM)  # pages in (layer, head, page) order
    out, at = [], 0
    for layer in range(LAYERS):
        row = []
        for head in range(KV_HEADS):
            n = int(layout.head_lens[layer, head])
            row.append(keys[at : at + n].clone())
            at += -(-n // PAGE) * PAGE
        out.append(row)
    engine.release(seq.request_id)
    engine.pool.assert_no_leaks()
    return out


@pytest.mark.parametrize("method", ["compactor", "snapkv", "kvcompress", "random"])
def test_protected_tokens_survive_in_every_head(llm: LLM, method: str) -> None:
    (prompt,) = prompts(300)
    spans = [(40, 52), (100, 101)]
    full = held_heads(llm, prompt, None)
    params = CompressionParams(method=method, retention=0.15, sink=3, recent=6, protected_spans=spans)
    kept = held_heads(llm, prompt, params)
    protected = [*range(3), *range(40, 52), 100, *range(294, 300)]
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            assert len(kept[layer][head]) == uniform_share(300, 0.15)
            rows = {tuple(r.tolist()) for r in kept[layer][head]}
            # every kept key is a real prompt key (moved, not altered), and every protected one is there
            assert rows <= {tuple(r.tolist()) for r in full[layer][head]}
            assert all(tuple(full[layer][head][p].tolist()) in rows for p in protected)


def test_pages_freed_equal_pages_dropped(llm: LLM) -> None:
    (prompt,) = prompts(333)
    pool = llm.engine.pool
    free_at_start = pool.num_free
    engine = llm.engine
    seq = engine.add_request(prompt, GREEDY, CompressionParams(retention=0.3), hold_kv=True)
    while seq.num_prefilled < len(prompt) - 64:  # every chunk but the last: nothing dropped yet
        engine.step()
    assert pool.num_free == free_at_start - LAYERS * KV_HEADS * math.ceil(seq.num_prefilled / PAGE)
    while engine.has_unfinished():
        engine.step()
    kept_pages = int(seq.kv.pages_per_head(seq.kv.head_lens).sum())
    assert kept_pages == seq.stats.kv_pages < LAYERS * KV_HEADS * math.ceil(333 / PAGE)
    assert pool.num_free == free_at_start - kept_pages  # full pages were taken, the dropped came back
    engine.release(seq.request_id)
    pool.assert_no_leaks()


def test_invalid_compression_is_refused_before_anything_is_queued(llm: LLM) -> None:
    batch = prompts(50, 60)
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate(batch, GREEDY, compression=[CompressionParams(), {"retention": 0}])
    assert err.value.field == "retention"
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate(batch, GREEDY, compression="h2o")
    assert err.value.field == "method"
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate(batch, GREEDY, compression=0.5)
    assert err.value.field == "compression"
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()


def test_chat_protection_keeps_the_system_prompt_and_the_question(chat_llm: LLM) -> None:
    from kvferry.engine.prompt_regions import encode_request

    tok = chat_llm.tokenizer
    messages = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Notes: " + "the red fox ran far away. " * 40},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Which animal ran?"},
        {"role": "assistant", "content": "The animal was"},
    ]
    both = CompressionParams(protect_system_prompt=True, protect_last_user_turn=True)
    encoded = encode_request(tok, messages=messages, compression=both)
    ids, params = encoded.ids, encoded.compression
    system, last = params.protected_spans
    assert "Answer with one word." in tok.decode(ids[slice(*system)])
    assert "Notes" not in tok.decode(ids[slice(*system)])
    tail = tok.decode(ids[slice(*last)])
    assert tail.startswith("<|im_start|>user\nWhich animal ran?") and tail.endswith("The animal was")
    assert last[1] == len(ids)

    params = CompressionParams(retention=0.05, sink=0, recent=0)
    plain = chat_llm.generate_chat([messages], GREEDY, compression=params)[0]
    guarded = chat_llm.generate_chat(
        [messages],
        GREEDY,
        compression=CompressionParams(
            retention=0.05, sink=0, recent=0, protect_system_prompt=True, protect_last_user_turn=True
        ),
    )[0]
    num_protected = (system[1] - system[0]) + (last[1] - last[0])
    assert plain.stats.kept_tokens == LAYERS * KV_HEADS * uniform_share(len(ids), 0.05)
    assert num_protected > uniform_share(len(ids), 0.05)
    assert guarded.stats.kept_tokens == LAYERS * KV_HEADS * num_protected
    chat_llm.engine.pool.assert_no_leaks()
