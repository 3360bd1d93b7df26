"""The cache of compressed contexts (engine/context_cache.py), in the engine on tiny random models:
a hit gives exactly the tokens of a miss on a fresh engine, the question attends to each head's own
kept context, concurrent questions hold the context's pages once and compute it once, admission
reserves only a hit's own pages, LRU by bytes with spill to host and restore, contexts too large or
a cache full of contexts in use are served uncached, and no page leaks after eviction, abort or a
failed engine step. The real model (SmolLM2) checks the chat and text-context APIs at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from builders import TinyModel, greedy, random_prompt, record_logits

from kvferry.engine import CompressionParams, InvalidArgumentError, context_cache
from kvferry.engine.compression.select import round_up_kept
from kvferry.engine.errors import NotFoundError
from kvferry.engine.layers import paged_attention as ref
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.usefixtures("single_thread")

PAGE = 4  # the tiny engines' page size (builders.TinyModel.engine)
LAYERS, KV_HEADS = 2, 2  # the tiny llama
PAGE_BYTES = 2 * PAGE * 16 * 4  # K and V of 4 tokens, head_dim 16, float32
COMPACTOR = CompressionParams(method="compactor", retention=0.5)
ADAPTIVE = CompressionParams(method="compactor", retention=0.4, budget="adaptive")  # ragged heads


@pytest.fixture
def tm(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


def ask(
    engine: LLMEngine, context: list[int], question: list[int], compression: Any = COMPACTOR, **options: Any
) -> Sequence:
    max_new = options.pop("max_new_tokens", 8)
    return engine.add_request(
        context + question,
        greedy(max_new),
        compression,
        context_len=len(context),
        cache_context=True,
        **options,
    )


def run(engine: LLMEngine) -> None:
    for _ in range(100_000):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def answer(
    engine: LLMEngine, context: list[int], question: list[int], compression: Any = COMPACTOR, **options: Any
) -> Sequence:
    seq = ask(engine, context, question, compression, **options)
    run(engine)
    return seq


def assert_clean(engine: LLMEngine) -> None:
    engine.pool.assert_no_leaks()
    engine.context_cache.assert_idle()


def fresh_tokens(
    tm: TinyModel,
    context: list[int],
    question: list[int],
    compression: Any,
    max_new_tokens: int = 8,
    **options: Any,
) -> list[int]:
    """The request alone on a fresh engine (`options`: its EngineConfig): a miss."""
    engine = tm.engine(**options)
    seq = answer(engine, context, question, compression, max_new_tokens=max_new_tokens)
    assert seq.stats.context_cache == "miss"
    assert_clean(engine)
    return seq.output_token_ids


@pytest.mark.parametrize(
    "compression",
    [
        COMPACTOR,
        ADAPTIVE,
        CompressionParams(method="streaming", retention=0.3, budget="global"),
        CompressionParams(method="random", retention=0.5, budget="adaptive"),
        None,  # the context kept whole: an uncompressed cache
    ],
    ids=["compactor", "compactor-adaptive", "streaming-global", "random-adaptive", "keep-all"],
)
def test_a_hit_gives_exactly_the_tokens_of_a_miss_on_a_fresh_engine(tm: TinyModel, compression: Any) -> None:
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(150, tm.vocab_size, seed=1)  # 148 tokens cached: the last 2 join the question
    questions = [random_prompt(n, tm.vocab_size, seed=n) for n in (7, 30, 70)]  # 70: two chunks after it
    seqs = [answer(engine, context, q, compression) for q in questions]
    assert [s.stats.context_cache for s in seqs] == ["miss", "hit", "hit"]
    entry = engine.context_cache.lookup(seqs[0].context_handle)
    assert entry is not None and entry.num_tokens == 148
    assert bool((entry.head_lens % PAGE == 0).all()), "every kept head fills whole pages"
    for seq, q in zip(seqs, questions):
        st = seq.stats
        assert st.context_tokens == 148 and st.context_kept_tokens == int(entry.head_lens.sum())
        computed = len(context) + len(q) - (148 if st.context_cache == "hit" else 0)
        assert st.prefill_tokens_computed == computed
        assert seq.output_token_ids == fresh_tokens(tm, context, q, compression, prefill_chunk=64)
    if compression is None:
        assert int(entry.head_lens.sum()) == 148 * LAYERS * KV_HEADS
    else:
        assert int(entry.head_lens.sum()) < 148 * LAYERS * KV_HEADS
    state = engine.context_cache_state()
    assert (state.device_entries, state.hits, state.misses) == (1, 2, 1)
    assert state.device_bytes == entry.num_pages * PAGE_BYTES
    assert_clean(engine)


def test_an_uncompressed_context_gives_the_tokens_of_the_plain_request(tm: TinyModel) -> None:
    """A context kept whole, ending on a chunk edge: the question runs the very chunks and keys the
    plain request runs, so hit and miss give its tokens and its logits exactly (true RoPE positions)."""
    context = random_prompt(128, tm.vocab_size, seed=5)
    question = random_prompt(20, tm.vocab_size, seed=6)
    engine = tm.engine(prefill_chunk=64)
    with record_logits(engine.model) as plain_rows:
        plain = engine.add_request(context + question, greedy(10))
        run(engine)
    for expected in ("miss", "hit"):
        with record_logits(engine.model) as rows:
            seq = answer(engine, context, question, None)
        assert seq.stats.context_cache == expected
        assert seq.output_token_ids == plain.output_token_ids[:8]
        assert torch.equal(rows[-8], plain_rows[-10])  # the question's prefill: the last prompt row onwards
    assert_clean(engine)


def test_the_question_attends_to_each_heads_own_kept_context(tm: TinyModel) -> None:
    """Ragged per-head contexts (random scores, adaptive budget): the question prefilled in one chunk
    and one token per chunk (every token a 1-row chunk over the heads' prefixes) agree."""
    context = random_prompt(120, tm.vocab_size, seed=7)
    question = random_prompt(24, tm.vocab_size, seed=8)
    params = CompressionParams(method="random", retention=0.3, budget="adaptive", recent=4, seed=3)
    last_rows = []
    for chunk in (64, 1):
        engine = tm.engine(prefill_chunk=chunk)
        with record_logits(engine.model) as rows:
            seq = answer(engine, context, question, params)
        lens = engine.context_cache.lookup(seq.context_handle).head_lens
        assert len(set(lens.flatten().tolist())) > 1, "the heads keep different numbers of tokens"
        prompt_rows = torch.cat(rows)[: len(context) + len(question)]
        last_rows.append(prompt_rows[-len(question) :])
        assert_clean(engine)
    torch.testing.assert_close(last_rows[0], last_rows[1], rtol=1e-4, atol=1e-4)


def test_the_reference_attends_to_per_head_prefixes() -> None:
    """engine/layers/paged_attention.prefill_attention with per-head prefix lengths against a loop
    over heads: chunk token t sees its head's whole prefix and chunk tokens 0..t."""
    torch.manual_seed(0)
    page_size, heads, group, dim, t = 4, 3, 2, 8, 5
    prefix = torch.tensor([0, 8, 12])
    pool = torch.randn(40, 2, page_size, dim)
    table = torch.randperm(40)[: heads * 5].view(heads, 5).to(torch.int32)
    q = torch.randn(t, heads * group, dim)
    got = ref.prefill_attention(q, pool, table, prefix, dim**-0.5)
    for h in range(heads):
        k, v = ref.gather_heads(pool, table[h], 5)  # [20, D]
        for i in range(t):
            n = int(prefix[h]) + i + 1
            for g in range(group):
                w = torch.softmax(k[:n] @ q[i, h * group + g] * dim**-0.5, dim=0)
                torch.testing.assert_close(got[i, h * group + g], w @ v[:n])


def test_kept_counts_round_up_to_whole_pages_with_the_next_best_tokens() -> None:
    scores = torch.randn(2, 3, 30)
    mask = torch.zeros(2, 3, 30, dtype=torch.bool)
    mask[0, 0, :5] = mask[0, 1, 3:11] = mask[1, 2, :29] = True  # 5, 8 (whole), 0, ..., 29 (to 30, not 32)
    rounded = round_up_kept(mask, scores, 4)
    assert rounded.sum(-1).tolist() == [[8, 8, 0], [0, 0, 30]]
    assert bool((rounded | ~mask).all()), "every kept token stays kept"
    added = rounded[0, 0] & ~mask[0, 0]
    rest = scores[0, 0][~mask[0, 0]]
    assert set(scores[0, 0][added].tolist()) == set(rest.topk(3).values.tolist())


def test_concurrent_questions_hold_the_context_once_and_compute_it_once(tm: TinyModel) -> None:
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(200, tm.vocab_size, seed=11)
    questions = [random_prompt(9 + i, tm.vocab_size, seed=20 + i) for i in range(4)]
    seqs = [ask(engine, context, q, max_new_tokens=12) for q in questions]
    engine.step()  # the first request's first context chunk; the others wait for it without pages
    assert seqs[0].status == SequenceStatus.PREFILL and seqs[0].context_pending
    assert all(s.status == SequenceStatus.WAITING and s.kv is None for s in seqs[1:])
    while any(s.status != SequenceStatus.DECODE for s in seqs):
        engine.step()
    entry = engine.context_cache.lookup(seqs[0].context_handle)
    assert entry is not None and entry.pins == 4
    assert engine.pool.holders(entry.page_ids()).tolist() == [5] * entry.num_pages  # the cache + 4 requests
    own = sum(s.kv.num_pages_held - entry.num_pages for s in seqs)
    assert engine.pool.num_used == entry.num_pages + own  # the context's pages counted once
    state = engine.context_cache_state()
    assert (state.misses, state.hits, state.pinned_entries) == (1, 3, 1)
    run(engine)
    for seq, q in zip(seqs, questions):
        assert seq.output_token_ids == fresh_tokens(tm, context, q, COMPACTOR, 12, prefill_chunk=64)
    assert_clean(engine)


def test_a_request_waiting_for_its_context_does_not_hold_up_the_queue(tm: TinyModel) -> None:
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(200, tm.vocab_size, seed=12)
    first = ask(engine, context, [1, 2, 3])
    waiter = ask(engine, context, [4, 5, 6])
    other = engine.add_request(random_prompt(30, tm.vocab_size, seed=13), greedy(4))
    engine.step()
    assert waiter.status == SequenceStatus.WAITING
    assert other.status != SequenceStatus.WAITING, "admitted past the request waiting for a computation"
    run(engine)
    assert (first.stats.context_cache, waiter.stats.context_cache) == ("miss", "hit")
    assert_clean(engine)


def test_aborting_the_computing_request_lets_the_waiters_compute_the_context(tm: TinyModel) -> None:
    """Both waiters waited once: the first admitted computes the context, the other computes it too
    rather than wait again (the cache keeps one copy)."""
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(200, tm.vocab_size, seed=14)
    questions = [random_prompt(10 + i, tm.vocab_size, seed=15 + i) for i in range(2)]
    first = ask(engine, context, [7, 8])
    waiters = [ask(engine, context, q) for q in questions]
    engine.step()
    assert all(w.status == SequenceStatus.WAITING for w in waiters)
    assert engine.abort(first.request_id)
    run(engine)
    assert [w.stats.context_cache for w in waiters] == ["miss", "miss"]
    for w, q in zip(waiters, questions):
        assert w.output_token_ids == fresh_tokens(tm, context, q, COMPACTOR, prefill_chunk=64)
    state = engine.context_cache_state()
    assert (state.device_entries, state.misses) == (1, 3)
    assert_clean(engine)


@pytest.mark.parametrize("phase", ["context", "question", "decode"])
def test_a_failed_step_during_a_cached_request_leaks_nothing(tm: TinyModel, phase: str) -> None:
    """An engine step raises while a request computes its context, while a hit prefills its
    question, or while both decode; every request is then aborted, as the service's engine thread
    does. The pool and the cache are left consistent, and the engine serves the context again."""
    engine = tm.engine(prefill_chunk=64)
    cached = random_prompt(160, tm.vocab_size, seed=16)
    fresh = random_prompt(160, tm.vocab_size, seed=17)
    answer(engine, cached, [1, 2])  # cached now
    hit = ask(engine, cached, random_prompt(70, tm.vocab_size, seed=18))
    miss = ask(engine, fresh, [3, 4, 5])
    target = {"context": miss, "question": hit, "decode": hit}[phase]
    # The failure comes from inside the model's forward, after the step took its pages.
    runner = engine.runner
    prefill, decode = runner.prefill, runner.decode
    armed = False

    def fail_when_armed(*_: Any) -> None:
        if armed:
            raise RuntimeError("injected forward failure")

    def arming_prefill(seq: Sequence, *args: Any) -> Any:
        nonlocal armed
        armed = phase != "decode" and seq is target and seq.num_prefilled > (0 if phase == "context" else 160)
        return prefill(seq, *args)

    def arming_decode(seqs: list[Sequence]) -> Any:
        nonlocal armed
        armed = phase == "decode" and target in seqs and len(target.output_token_ids) >= 3
        return decode(seqs)

    hook = engine.model.model.layers[-1].register_forward_pre_hook(fail_when_armed)
    runner.prefill, runner.decode = arming_prefill, arming_decode  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="injected"):
            run(engine)
    finally:
        hook.remove()
        runner.prefill, runner.decode = prefill, decode  # type: ignore[method-assign]
    for request_id in list(engine.requests):
        engine.abort(request_id)
    assert not engine.has_unfinished()
    assert_clean(engine)
    question = random_prompt(5, tm.vocab_size, seed=19)
    for context in (cached, fresh):
        seq = answer(engine, context, question)
        assert seq.output_token_ids == fresh_tokens(tm, context, question, COMPACTOR, prefill_chunk=64)
    assert_clean(engine)


def entry_pages(tm: TinyModel, context: list[int]) -> int:
    engine = tm.engine()
    seq = answer(engine, context, [1])
    return engine.context_cache.lookup(seq.context_handle).num_pages


def test_lru_by_bytes_spills_to_host_and_restores_the_same_tokens(
    tm: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context_cache, "COPY_BATCH_BYTES", 5 * PAGE_BYTES)  # copies in several batches
    contexts = [random_prompt(96, tm.vocab_size, seed=30 + i) for i in range(3)]
    pages = entry_pages(tm, contexts[0])  # every context here takes as many pages (uniform budget)
    engine = tm.engine(
        context_cache_bytes=int(2.5 * pages) * PAGE_BYTES, context_cache_host_bytes=pages * PAGE_BYTES
    )
    question = random_prompt(6, tm.vocab_size, seed=40)
    want = [fresh_tokens(tm, c, question, COMPACTOR) for c in contexts]
    for c, w in zip(contexts, want):
        assert answer(engine, c, question).output_token_ids == w
    state = engine.context_cache_state()  # the least recently used (the first) went to the host
    assert (state.device_entries, state.host_entries, state.spills) == (2, 1, 1)
    assert state.device_bytes == 2 * pages * PAGE_BYTES and state.host_bytes == pages * PAGE_BYTES
    seq = answer(engine, contexts[0], question)  # restored; the second is now the LRU: spilled, the host full
    assert seq.stats.context_cache == "hit" and seq.output_token_ids == want[0]
    state = engine.context_cache_state()
    assert (state.restores, state.spills, state.evictions, state.host_entries) == (1, 2, 0, 1)
    seq = answer(engine, contexts[2], question)  # the most recent stays on the device
    assert seq.stats.context_cache == "hit" and seq.output_token_ids == want[2]
    seq = answer(engine, contexts[1], question)  # back from the host, spilling the first again ...
    assert seq.stats.context_cache == "hit" and seq.output_token_ids == want[1]
    state = engine.context_cache_state()  # ... which took the host's only slot: nothing dropped yet
    assert (state.restores, state.spills, state.evictions) == (2, 3, 0)
    engine.context_cache.host_budget = 0  # the next spill has nowhere to go: the entry is dropped
    answer(engine, random_prompt(96, tm.vocab_size, seed=50), question)
    state = engine.context_cache_state()
    assert (state.device_entries, state.evictions) == (2, 1)
    assert_clean(engine)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned host memory is there with CUDA")
def test_a_spill_without_host_memory_drops_the_context(tm: TinyModel) -> None:
    """Pinned host memory that cannot be had (here: asked for on a machine without an accelerator)
    costs the spilled context, not the request that needed the room."""
    contexts = [random_prompt(96, tm.vocab_size, seed=55 + i) for i in range(2)]
    pages = entry_pages(tm, contexts[0])
    engine = tm.engine(context_cache_bytes=pages * PAGE_BYTES)
    engine.context_cache._pin_host = True  # noqa: SLF001 - pinned memory fails without CUDA
    question = random_prompt(6, tm.vocab_size, seed=57)
    for context in (*contexts, contexts[0]):
        seq = answer(engine, context, question)
        assert seq.output_token_ids == fresh_tokens(tm, context, question, COMPACTOR)
    state = engine.context_cache_state()
    assert (state.misses, state.spills, state.evictions, state.host_entries) == (3, 0, 2, 0)
    assert_clean(engine)


def test_a_context_larger_than_the_budget_is_served_uncached(tm: TinyModel) -> None:
    context = random_prompt(150, tm.vocab_size, seed=60)
    pages = entry_pages(tm, context)
    engine = tm.engine(context_cache_bytes=(pages - 1) * PAGE_BYTES)
    question = random_prompt(8, tm.vocab_size, seed=61)
    want = fresh_tokens(tm, context, question, COMPACTOR)
    for _ in range(2):
        seq = answer(engine, context, question)
        assert seq.context_handle is None and seq.stats.context_cache == "miss"
        assert seq.output_token_ids == want
    state = engine.context_cache_state()
    assert (state.device_entries, state.misses, state.hits) == (0, 2, 0)
    assert_clean(engine)


def test_a_cache_full_of_contexts_in_use_serves_new_requests_uncached(tm: TinyModel) -> None:
    in_use, other = (random_prompt(150, tm.vocab_size, seed=s) for s in (62, 63))
    pages = entry_pages(tm, in_use)
    engine = tm.engine(context_cache_bytes=pages * PAGE_BYTES)
    held = ask(engine, in_use, [1, 2], hold_kv=True)  # keeps its pages (and its pin) after prefill
    run(engine)
    assert held.status == SequenceStatus.HELD
    question = random_prompt(8, tm.vocab_size, seed=64)
    seq = answer(engine, other, question)
    assert seq.stats.context_cache == "miss" and seq.context_entry is None
    assert seq.output_token_ids == fresh_tokens(tm, other, question, COMPACTOR)
    state = engine.context_cache_state()
    assert (state.device_entries, state.pinned_entries) == (1, 1)
    engine.release(held.request_id)
    assert_clean(engine)
    assert answer(engine, other, question).stats.context_cache == "miss"  # now there is room for it
    assert engine.context_cache.lookup(seq.context_handle) is not None
    assert_clean(engine)


def test_a_restore_beyond_the_budget_lasts_only_while_the_contexts_in_use_do(tm: TinyModel) -> None:
    """A hit on a spilled context is restored even when contexts in use fill the device budget (no
    recompute); when they are no longer used, the budget holds again."""
    first, second = (random_prompt(150, tm.vocab_size, seed=s) for s in (66, 67))
    pages = entry_pages(tm, first)
    engine = tm.engine(
        context_cache_bytes=pages * PAGE_BYTES, context_cache_host_bytes=2 * pages * PAGE_BYTES
    )
    question = random_prompt(8, tm.vocab_size, seed=68)
    answer(engine, first, question)
    held = ask(engine, second, [1, 2], hold_kv=True)  # cached (the first spilled), in use
    run(engine)
    seq = ask(engine, first, question)
    engine.step()  # admitted: restored beside the context in use
    state = engine.context_cache_state()
    assert seq.stats.context_cache == "hit" and state.device_entries == 2
    assert state.device_bytes == 2 * state.device_budget_bytes
    run(engine)  # its request done: back within the budget, the context still in use kept
    assert seq.output_token_ids == fresh_tokens(tm, first, question, COMPACTOR)
    state = engine.context_cache_state()
    assert (state.device_entries, state.host_entries, state.spills) == (1, 1, 2)
    assert engine.context_cache.lookup(held.context_handle).on_device
    engine.release(held.request_id)
    assert_clean(engine)


def test_admission_reserves_only_a_hits_own_pages_and_spills_unused_contexts(tm: TinyModel) -> None:
    context = random_prompt(148, tm.vocab_size, seed=70)
    pages = entry_pages(tm, context)
    engine = tm.engine(kv_cache_bytes=170 * PAGE_BYTES, context_cache_bytes=pages * PAGE_BYTES)
    answer(engine, context, [1] * 8)
    assert engine.pool.num_used == pages
    seq = ask(engine, context, [2] * 8)
    worst = engine.scheduler.worst_case_pages(seq)
    assert worst > engine.pool.num_available, "a miss would not fit beside the cached context"
    engine.step()
    own = engine.scheduler.own_pages(seq)
    assert seq.stats.context_cache == "hit"
    assert seq.kv.reserved + seq.kv.num_pages_held - pages == own  # own pages only: reserved or taken
    run(engine)
    plain = engine.add_request(random_prompt(150, tm.vocab_size, seed=71), greedy(8))
    assert engine.scheduler.worst_case_pages(plain) > engine.pool.num_available
    run(engine)  # admitted after the unused context went to the host tier
    state = engine.context_cache_state()
    assert plain.finish_reason == "length" and (state.spills, state.host_entries) == (1, 1)
    assert answer(engine, context, [3] * 8).stats.context_cache == "hit"  # restored
    assert_clean(engine)


@pytest.mark.parametrize("method", ["snapkv", "kvcompress"])
def test_query_aware_methods_are_refused_for_a_cached_context(tm: TinyModel, method: str) -> None:
    engine = tm.engine()
    context = random_prompt(100, tm.vocab_size, seed=80)
    params = CompressionParams(method=method, retention=0.5)
    with pytest.raises(InvalidArgumentError, match="cannot serve other questions") as e:
        ask(engine, context, [1, 2], params)
    assert e.value.field == "compression.method"
    engine.add_request(context + [1, 2], greedy(2), params, context_len=100)  # not cached: allowed
    off = engine.add_request(context, greedy(2), params, cache_context=True)  # no context: "off", allowed
    run(engine)
    assert off.stats.context_cache == "off" and off.stats.prefill_tokens_computed == 100
    with pytest.raises(InvalidArgumentError) as e:
        ask(engine, context + [1, 2], [], None)
    assert e.value.field == "context"
    assert_clean(engine)


def test_the_offline_api_takes_contexts_and_the_engine_default(tm: TinyModel) -> None:
    """LLM.generate: one context (token ids) for every prompt, then one per prompt (None: no context),
    and EngineConfig.cache_context as the default when a call does not say."""
    from kvferry.engine import LLM

    llm = LLM(str(tm.path), device="cpu", dtype="float32", page_size=PAGE, kv_cache_bytes=4 << 20)
    context = random_prompt(60, tm.vocab_size, seed=95)
    prompts = [random_prompt(5, tm.vocab_size, seed=96), random_prompt(7, tm.vocab_size, seed=97)]
    outs = llm.generate(prompts, greedy(4), COMPACTOR, context=context, cache_context=True)
    assert [o.stats.context_cache for o in outs] == ["miss", "hit"]
    assert outs[0].prompt_token_ids == context + prompts[0]
    outs = llm.generate(prompts, greedy(4), COMPACTOR, context=[context, None], cache_context=True)
    assert [o.stats.context_cache for o in outs] == ["hit", "off"]
    assert outs[1].prompt_token_ids == prompts[1]
    assert llm.generate(prompts[0], greedy(4), COMPACTOR, context=context)[0].stats.context_cache == "off"
    llm.engine.config.cache_context = True
    assert llm.generate(prompts[0], greedy(4), COMPACTOR, context=context)[0].stats.context_cache == "hit"
    assert_clean(llm.engine)


def test_drop_and_export_of_a_cached_context(tm: TinyModel) -> None:
    engine = tm.engine()
    context = random_prompt(100, tm.vocab_size, seed=90)
    handle = answer(engine, context, [1]).context_handle
    cache = engine.context_cache
    layout, page_ids = cache.export(handle)
    entry = cache.lookup(handle)
    assert (
        torch.equal(layout.head_lens, entry.head_lens)
        and layout.num_pages == page_ids.numel() == entry.num_pages
    )
    held = ask(engine, context, [2], hold_kv=True)
    run(engine)
    cache.drop(handle)  # in use: out of the cache at once, its pages go when the request ends
    with pytest.raises(NotFoundError):
        cache.export(handle)
    with pytest.raises(NotFoundError):
        cache.drop(handle)
    assert engine.pool.num_used == held.kv.num_pages_held  # the context's pages and its own
    engine.release(held.request_id)
    assert engine.pool.num_used == engine.pool.num_cached == 0
    assert answer(engine, context, [1]).stats.context_cache == "miss"
    assert_clean(engine)


@pytest.mark.slow
def test_smollm2_chat_and_text_contexts(smollm2: Any) -> None:
    """The default model: a document in the chats' history computed once for two questions (a miss,
    then a hit), and the document as a text `context` beside questions: the hit equals a miss on
    the emptied cache."""
    from pathlib import Path

    from kvferry.engine import SamplingParams

    document = (Path(__file__).parent.parent / "engine" / "data" / "marrowick_canal.txt").read_text()
    sampling = SamplingParams(temperature=0, max_new_tokens=16)
    cache = smollm2.engine.context_cache
    questions = ["Who was the chief engineer of the Marrowick Canal?", "What did the canal carry?"]
    chats = [
        [
            {"role": "system", "content": "Answer the question using the document.\n\n" + document},
            {"role": "user", "content": q},
        ]
        for q in questions
    ]
    outs = smollm2.generate_chat(chats, sampling, COMPACTOR, cache_context=True)
    assert [o.stats.context_cache for o in outs] == ["miss", "hit"]
    assert outs[1].stats.context_tokens > 1500 and outs[1].stats.prefill_tokens_computed < 40
    assert "Brandt" in outs[0].text
    cache.clear()
    both = smollm2.generate(questions, sampling, COMPACTOR, context=document, cache_context=True)
    assert [o.stats.context_cache for o in both] == ["miss", "hit"]
    cache.clear()
    again = smollm2.generate(questions[1], sampling, COMPACTOR, context=document, cache_context=True)[0]
    assert again.stats.context_cache == "miss" and again.token_ids == both[1].token_ids
    cache.clear()
    smollm2.engine.pool.assert_no_leaks()
