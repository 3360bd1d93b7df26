"""The engine's hooks for cached contexts across the prefill/decode split (issue 21, the services'
part), between two engines in one process on the tiny llama: a prefill engine hands a request off
with its cached context apart (`held_kv_after_context`), a decode engine imports it sharing the
context it holds or receiving the context's pages and caching them at the commit
(`reserve_import(context=...)`), concurrent imports of one context hold its pages once and receive
them once, a PutContext is a context-only request (`add_context`), and greedy tokens equal the
colocated engine's. The services drive these hooks: tests/test_context_services.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from builders import TinyModel, greedy, random_prompt

from kvferry.engine import CompressionParams
from kvferry.engine.kv_handoff import ContextRef
from kvferry.engine.llm_engine import ContextInFlight, LLMEngine
from kvferry.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.usefixtures("single_thread")

PAGE = 4
COMPACTOR = CompressionParams(method="compactor", retention=0.5)


@pytest.fixture
def tm(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


def run(engine: LLMEngine) -> None:
    for _ in range(100_000):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


def prefill_held(engine: LLMEngine, context: list[int], question: list[int], max_new: int) -> Sequence:
    """A prefill node's request: runs to its first token and keeps its pages (hold_kv)."""
    seq = engine.add_request(
        context + question,
        greedy(max_new),
        COMPACTOR,
        hold_kv=True,
        context_len=len(context),
        cache_context=True,
    )
    while seq.status not in (SequenceStatus.HELD, SequenceStatus.FINISHED):
        engine.step()
    assert seq.status == SequenceStatus.HELD
    return seq


def hand_off(
    prefill: LLMEngine, decode: LLMEngine, seq: Sequence, rid: str, wait: bool = False
) -> tuple[Sequence, int]:
    """What the services do, in one process: the decode engine reserves (sharing or receiving the
    context), the pages are copied into its pool at the reserved ids, and it commits. Returns the
    decode sequence and how many pages travelled."""
    layout, own_ids, entry = prefill.held_kv_after_context(seq.request_id)
    assert entry is not None
    ref = ContextRef(entry.handle, entry.num_tokens, entry.head_lens.clone(), PAGE)
    ids = decode.reserve_import(
        seq.prompt_token_ids, seq.output_token_ids[0], seq.sampling, layout, rid, ref, wait
    )
    imported = decode.requests[rid]
    sources = own_ids if imported.stats.context_cache == "hit" else torch.cat([entry.page_ids(), own_ids])
    assert ids.numel() == sources.numel()
    decode.pool.kv[ids] = prefill.pool.kv[sources]
    prefill.unpin_context(entry)
    prefill.release(seq.request_id)
    return decode.commit_import(rid), ids.numel()


def test_a_handoff_ships_the_context_once_and_then_only_the_question(tm: TinyModel) -> None:
    prefill, decode, colocated = tm.engine(prefill_chunk=64), tm.engine(), tm.engine(prefill_chunk=64)
    context = random_prompt(150, tm.vocab_size, seed=1)  # 148 tokens cached
    questions = [random_prompt(n, tm.vocab_size, seed=n) for n in (7, 30, 12)]
    shipped, outputs = [], []
    for i, q in enumerate(questions):
        seq = prefill_held(prefill, context, q, max_new=10)
        imported, pages = hand_off(prefill, decode, seq, f"d{i}")
        assert imported.stats.context_cache == ("miss" if i == 0 else "hit")
        shipped.append(pages)
        run(decode)
        outputs.append(imported.output_token_ids)
    entry = decode.context_cache.lookup(imported.context_handle)  # type: ignore[arg-type]
    assert entry is not None and entry.num_tokens == 148
    own = [-(-(150 - 148 + len(q)) // PAGE) * 4 for q in questions]  # 2 layers x 2 heads
    assert shipped == [entry.num_pages + own[0], own[1], own[2]]
    for q, out in zip(questions, outputs):
        want = colocated.add_request(
            context + q, greedy(10), COMPACTOR, context_len=len(context), cache_context=True
        )
        run(colocated)
        assert out == want.output_token_ids
    for engine in (prefill, decode, colocated):
        engine.pool.assert_no_leaks()
        engine.context_cache.assert_idle()


def test_concurrent_imports_hold_the_context_once_and_receive_it_once(tm: TinyModel) -> None:
    prefill, decode = tm.engine(prefill_chunk=64), tm.engine()
    context = random_prompt(120, tm.vocab_size, seed=3)
    seqs = [prefill_held(prefill, context, random_prompt(9, tm.vocab_size, seed=40 + i), 6) for i in range(3)]
    held = [prefill.held_kv_after_context(s.request_id) for s in seqs]
    refs = [ContextRef(e.handle, e.num_tokens, e.head_lens.clone(), PAGE) for _, _, e in held]  # type: ignore[union-attr]
    first = decode.reserve_import(seqs[0].prompt_token_ids, seqs[0].output_token_ids[0], seqs[0].sampling,
                                  held[0][0], "d0", refs[0], True)  # fmt: skip
    assert decode.requests["d0"].stats.context_cache == "miss"
    with pytest.raises(ContextInFlight) as arriving:  # the second waits for the first's commit
        decode.reserve_import(seqs[1].prompt_token_ids, seqs[1].output_token_ids[0], seqs[1].sampling,
                              held[1][0], "d1", refs[1], True)  # fmt: skip
    assert arriving.value.request_id == "d0" and "d1" not in decode.requests
    entry = held[0][2]
    assert entry is not None
    decode.pool.kv[first] = prefill.pool.kv[torch.cat([entry.page_ids(), held[0][1]])]
    decode.commit_import("d0")
    for i in (1, 2):  # after the commit: hits, their own pages only
        ids = decode.reserve_import(seqs[i].prompt_token_ids, seqs[i].output_token_ids[0], seqs[i].sampling,
                                    held[i][0], f"d{i}", refs[i], True)  # fmt: skip
        assert decode.requests[f"d{i}"].stats.context_cache == "hit"
        decode.pool.kv[ids] = prefill.pool.kv[held[i][1]]
        decode.commit_import(f"d{i}")
    cached = decode.context_cache.lookup(refs[0].handle)
    assert cached is not None and cached.pins == 3
    own = sum(decode.requests[f"d{i}"].kv.num_pages_held - cached.num_pages for i in range(3))  # type: ignore[union-attr]
    assert decode.pool.num_used == cached.num_pages + own  # the context's pages counted once
    assert decode.pool.holders(cached.page_ids()).tolist() == [4] * cached.num_pages  # the cache + 3
    run(decode)
    for s, (_, _, e) in zip(seqs, held):
        prefill.unpin_context(e)  # type: ignore[arg-type]
        prefill.release(s.request_id)
    for engine in (prefill, decode):
        engine.pool.assert_no_leaks()
        engine.context_cache.assert_idle()


def test_an_aborted_import_lets_the_waiters_receive_the_context(tm: TinyModel) -> None:
    prefill, decode = tm.engine(prefill_chunk=64), tm.engine()
    context = random_prompt(100, tm.vocab_size, seed=5)
    seq = prefill_held(prefill, context, random_prompt(5, tm.vocab_size, seed=6), 4)
    layout, own_ids, entry = prefill.held_kv_after_context(seq.request_id)
    assert entry is not None
    ref = ContextRef(entry.handle, entry.num_tokens, entry.head_lens.clone(), PAGE)
    args = (seq.prompt_token_ids, seq.output_token_ids[0], seq.sampling, layout)
    decode.reserve_import(*args, "d0", ref, True)
    used = decode.pool.num_used
    assert used == entry.num_pages + own_ids.numel()
    decode.abort("d0")  # the receiving import fails: its pages and its claim go
    assert decode.pool.num_used == 0 and decode.context_cache.computing(ref.handle) is None
    decode.reserve_import(*args, "d1", ref, True)  # the next one receives the context itself
    assert decode.requests["d1"].stats.context_cache == "miss"
    decode.abort("d1")
    prefill.unpin_context(entry)
    prefill.release(seq.request_id)
    for engine in (prefill, decode):
        engine.pool.assert_no_leaks()
        engine.context_cache.assert_idle()


def test_a_mismatched_context_is_refused_naming_the_field(tm: TinyModel) -> None:
    decode = tm.engine()
    prompt = random_prompt(40, tm.vocab_size, seed=8)
    layout_lens = torch.full((2, 2), 8)
    from kvferry.engine.errors import InvalidArgumentError
    from kvferry.engine.kv_handoff import KVLayout

    cases = {
        "context.num_tokens": ContextRef("h", 30, torch.full((2, 2), 8), PAGE),  # not whole pages
        "context.head_lens": ContextRef("h", 32, torch.full((2, 2), 6), PAGE),  # not whole pages
    }
    for field, ref in cases.items():
        with pytest.raises(InvalidArgumentError) as err:
            decode.reserve_import(prompt, 1, greedy(4), KVLayout(layout_lens, PAGE), "x", ref)
        assert err.value.field == field
    decode.pool.assert_no_leaks()


def test_a_put_caches_the_context_once(tm: TinyModel) -> None:
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(130, tm.vocab_size, seed=9)  # 128 tokens cached
    whole = engine.add_context(random_prompt(64, tm.vocab_size, seed=19), COMPACTOR)  # whole pages, one chunk
    put = engine.add_context(context, COMPACTOR, request_id="put")
    assert put.status == SequenceStatus.PREFILL or put.status == SequenceStatus.WAITING
    run(engine)
    assert put.finish_reason == "context" and put.stats.context_cache == "miss" and not put.output_token_ids
    assert whole.finish_reason == "context" and not whole.output_token_ids
    assert engine.context_cache.lookup(whole.context_handle).num_tokens == 64  # type: ignore[union-attr]
    assert put.context_key == put.context_handle
    entry = engine.context_cache.lookup(put.context_handle)  # type: ignore[arg-type]
    assert entry is not None and entry.num_tokens == 128 and entry.pins == 0
    again = engine.add_context(context, COMPACTOR)  # cached already: ends at once
    assert again.is_finished and again.stats.context_cache == "hit" and not engine.has_unfinished()
    question = random_prompt(6, tm.vocab_size, seed=10)
    seq = engine.add_request(
        context + question, greedy(5), COMPACTOR, context_len=len(context), cache_context=True
    )
    run(engine)
    assert seq.stats.context_cache == "hit"
    fresh = tm.engine(prefill_chunk=64)
    want = fresh.add_request(
        context + question, greedy(5), COMPACTOR, context_len=len(context), cache_context=True
    )
    run(fresh)
    assert seq.output_token_ids == want.output_token_ids
    engine.pool.assert_no_leaks()
    engine.context_cache.assert_idle()


def test_a_put_waiting_for_a_computation_ends_as_a_hit(tm: TinyModel) -> None:
    engine = tm.engine(prefill_chunk=64)
    context = random_prompt(200, tm.vocab_size, seed=12)
    question = random_prompt(5, tm.vocab_size, seed=13)
    seq = engine.add_request(
        context + question, greedy(3), COMPACTOR, context_len=len(context), cache_context=True
    )
    engine.step()  # the request computes the context; the put waits for it
    put = engine.add_context(context, COMPACTOR)
    finished: list[Sequence] = []
    while engine.has_unfinished():
        finished += [s for s in engine.step() if s.is_finished]
    assert put in finished and put.stats.context_cache == "hit" and put.request_id not in engine.requests
    assert seq.stats.context_cache == "miss"
    engine.pool.assert_no_leaks()
    engine.context_cache.assert_idle()


def test_a_put_too_large_for_the_budget_is_not_cached(tm: TinyModel) -> None:
    engine = tm.engine(context_cache_bytes=10 * 2 * PAGE * 16 * 4)  # 10 pages
    put = engine.add_context(random_prompt(100, tm.vocab_size, seed=14), COMPACTOR)
    assert put.is_finished and put.context_handle is None and put.context_key is not None
    assert not engine.has_unfinished()
    engine.pool.assert_no_leaks()
