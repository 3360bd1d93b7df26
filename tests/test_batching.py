"""Continuous batching gives every request the tokens it gets alone; admission by free pages is
first come, first served, and the prompt with the fewest tokens left prefills first (bounded, so
none starves); pages are accounted exactly (pool and per-sequence page tables)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from builders import (
    TinyModel,
    greedy,
    make_pool,
    make_seq_kv,
    random_prompt,
    run_to_completion,
)

from kvferry.engine import LLM, ResourceExhaustedError, SamplingParams
from kvferry.engine.kv_pool import KVPool, page_bytes
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTHS = [1, 3, 9, 17, 30, 41, 64, 100]  # 8 prompts: inside one page, across pages, across chunks


def _prompts(tm: TinyModel) -> list[list[int]]:
    return [random_prompt(n, tm.vocab_size, seed=300 + n) for n in LENGTHS]


def _sampling(mode: str, i: int) -> SamplingParams:
    max_new = 6 + 2 * i  # different lengths: the batch shrinks as requests finish
    if mode == "greedy":
        return greedy(max_new)
    return SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234 + i, max_new_tokens=max_new, ignore_eos=True
    )


def _alone(engine: LLMEngine, prompt: list[int], sp: SamplingParams) -> list[int]:
    (seq,) = run_to_completion(engine, [prompt], [sp])
    return seq.output_token_ids


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_batch_equals_each_request_alone(
    tiny_model: Callable[[str], TinyModel], kind: str, mode: str
) -> None:
    tm = tiny_model(kind)
    engine = tm.engine(page_size=4, prefill_chunk=16)
    prompts = _prompts(tm)
    params = [_sampling(mode, i) for i in range(len(prompts))]
    batched = run_to_completion(engine, prompts, params)
    engine.pool.assert_no_leaks()
    for i, (prompt, seq) in enumerate(zip(prompts, batched)):
        assert seq.finish_reason == "length"
        assert len(seq.output_token_ids) == params[i].max_new_tokens
        alone = _alone(engine, prompt, _sampling(mode, i))
        assert seq.output_token_ids == alone, f"prompt {i} ({LENGTHS[i]} tokens) differs when batched"
    engine.pool.assert_no_leaks()


def test_offline_api_batch_equals_alone(tiny_model: Callable[[str], TinyModel]) -> None:
    """The same through LLM.generate (token-id prompts), outputs returned in prompt order."""
    tm = tiny_model("qwen3")
    llm = LLM(
        str(tm.path), device="cpu", dtype="float32", page_size=16, prefill_chunk=32, kv_cache_bytes=4 << 20
    )
    prompts = _prompts(tm)
    params = [_sampling("seeded", i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.token_ids == llm.generate(prompt, _sampling("seeded", i))[0].token_ids
    llm.engine.pool.assert_no_leaks()


def _pages_for(engine: LLMEngine, prompt_len: int, max_new: int) -> int:
    per_head = -(-(prompt_len + max_new - 1) // engine.pool.page_size)
    return per_head * engine.num_layers * engine.num_kv_heads


def _run_tracking_admissions(engine: LLMEngine, seqs: list[Sequence]) -> tuple[list[int], int]:
    """Step to completion; returns the order requests left the queue and the most running at once."""
    admitted: list[int] = []
    most = 0
    while engine.has_unfinished():
        engine.step()
        for i, s in enumerate(seqs):
            if s.status != SequenceStatus.WAITING and i not in admitted:
                admitted.append(i)
        most = max(most, len(engine.scheduler.running))
        assert engine.pool.num_available >= 0
        assert engine.pool.num_used <= engine.pool.num_pages
    return admitted, most


def test_admission_by_free_pages_fcfs(tiny_model: Callable[[str], TinyModel]) -> None:
    tm = tiny_model("llama")
    probe = tm.engine(page_size=4)
    need = _pages_for(probe, 20, 8)  # 7 pages per head x 2 layers x 2 kv heads = 28
    budget = (2 * need + need // 2) * page_bytes(4, probe.head_dim, torch.float32)
    engine = tm.engine(page_size=4, prefill_chunk=8, kv_cache_bytes=budget)  # room for 2.5 requests
    assert engine.pool.num_pages == 2 * need + need // 2
    prompts = [random_prompt(20, tm.vocab_size, seed=900 + i) for i in range(5)]
    seqs = [engine.add_request(p, greedy(8)) for p in prompts]
    admitted, most = _run_tracking_admissions(engine, seqs)
    assert admitted == [0, 1, 2, 3, 4]  # first come, first served
    assert most == 2  # only two fit at once
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 8 for s in seqs)
    engine.pool.assert_no_leaks()
    roomy = tm.engine(page_size=4, prefill_chunk=8)
    for p, s in zip(prompts, seqs):
        assert s.output_token_ids == _alone(roomy, p, greedy(8))


def test_admission_head_of_line_waits(tiny_model: Callable[[str], TinyModel]) -> None:
    """A small request that would fit does not overtake an earlier large one that does not yet."""
    tm = tiny_model("llama")
    probe = tm.engine(page_size=4)
    small, large = _pages_for(probe, 8, 4), _pages_for(probe, 60, 4)
    pages = large + small  # the large one fits alone, never beside the first request
    engine = tm.engine(page_size=4, kv_cache_bytes=pages * page_bytes(4, probe.head_dim, torch.float32))
    first = engine.add_request(random_prompt(60, tm.vocab_size, 1), greedy(4))
    big = engine.add_request(random_prompt(60, tm.vocab_size, 2), greedy(4))
    late_small = engine.add_request(random_prompt(8, tm.vocab_size, 3), greedy(4))
    admitted, _ = _run_tracking_admissions(engine, [first, big, late_small])
    assert admitted == [0, 1, 2]
    engine.pool.assert_no_leaks()


def _prefill_order(engine: LLMEngine, seqs: list[Sequence]) -> list[int]:
    """Step to completion; returns which request (index into `seqs`) each prefill chunk belonged to."""
    index = {s.request_id: i for i, s in enumerate(seqs)}
    order: list[int] = []
    while engine.has_unfinished():
        prefilled = {s.request_id: s.num_prefilled for s in seqs}
        engine.step()
        order += [index[s.request_id] for s in seqs if s.num_prefilled > prefilled[s.request_id]]
    return order


def test_short_prefill_runs_before_a_long_prompts_remaining_chunks(
    tiny_model: Callable[[str], TinyModel],
) -> None:
    """A one-chunk prompt admitted behind a long one gets its chunk at the next step, not after every
    chunk of the long prompt; its tokens are the ones it gets alone."""
    tm = tiny_model("llama")
    engine = tm.engine(page_size=4, prefill_chunk=8)
    long_prompt, short_prompt = random_prompt(64, tm.vocab_size, 11), random_prompt(5, tm.vocab_size, 12)
    long = engine.add_request(long_prompt, greedy(4))
    engine.step()  # the long prompt's first chunk
    short = engine.add_request(short_prompt, greedy(4))
    assert _prefill_order(engine, [long, short])[:2] == [1, 0]
    engine.pool.assert_no_leaks()
    assert long.output_token_ids == _alone(engine, long_prompt, greedy(4))
    assert short.output_token_ids == _alone(engine, short_prompt, greedy(4))


def test_long_prompt_runs_after_max_prefill_bypass_chunks_of_shorter_ones(
    tiny_model: Callable[[str], TinyModel],
) -> None:
    """Short prompts arriving without end cannot starve a long one: it runs a chunk every
    max_prefill_bypass + 1 steps; 0 is first come, first served."""
    tm = tiny_model("llama")
    for bypass, expected in ((2, [1, 2, 0, 3, 4, 0, 5, 6, 0, 0]), (0, [0] * 4 + [1, 2, 3, 4, 5, 6])):
        engine = tm.engine(page_size=4, prefill_chunk=8)
        engine.scheduler.max_prefill_bypass = bypass
        seqs = [engine.add_request(random_prompt(40, tm.vocab_size, 20), greedy(2))]
        engine.step()
        seqs += [engine.add_request(random_prompt(6, tm.vocab_size, 21 + i), greedy(2)) for i in range(6)]
        assert _prefill_order(engine, seqs)[: len(expected)] == expected
        engine.pool.assert_no_leaks()


def test_interleaved_compressed_prefills_equal_each_alone(tiny_model: Callable[[str], TinyModel]) -> None:
    """Compressed prompts whose chunks interleave (a short one between a long one's chunks) keep the
    tokens and the kept tokens each gets alone: scoring state is per request."""
    tm = tiny_model("llama")
    engine = tm.engine(page_size=4, prefill_chunk=16)
    compression = {"method": "compactor", "retention": 0.5}
    prompts = [random_prompt(n, tm.vocab_size, 40 + n) for n in (90, 30, 20)]
    seqs = [engine.add_request(prompts[0], greedy(5), compression)]
    engine.step()
    seqs += [engine.add_request(p, greedy(5), compression) for p in prompts[1:]]
    order = _prefill_order(engine, seqs)
    assert order[:4] == [2, 2, 1, 1], order  # the 20-token prompt first, then the 30-token one
    engine.pool.assert_no_leaks()
    for prompt, seq in zip(prompts, seqs):
        ref = engine.add_request(prompt, greedy(5), compression)
        while engine.has_unfinished():
            engine.step()
        assert seq.output_token_ids == ref.output_token_ids
        assert seq.stats.kept_tokens_per_layer == ref.stats.kept_tokens_per_layer
    engine.pool.assert_no_leaks()


def test_max_num_seqs_limits_running(tiny_model: Callable[[str], TinyModel]) -> None:
    tm = tiny_model("llama")
    engine = tm.engine(page_size=4, max_num_seqs=3)
    seqs = [engine.add_request(random_prompt(10, tm.vocab_size, i), greedy(5)) for i in range(7)]
    admitted, most = _run_tracking_admissions(engine, seqs)
    assert most == 3 and admitted == list(range(7))
    assert all(len(s.output_token_ids) == 5 for s in seqs)
    engine.pool.assert_no_leaks()


def test_request_that_can_never_fit_is_refused(tiny_model: Callable[[str], TinyModel]) -> None:
    tm = tiny_model("llama")
    probe = tm.engine(page_size=4)
    pages = _pages_for(probe, 40, 8)
    engine = tm.engine(page_size=4, kv_cache_bytes=pages * page_bytes(4, probe.head_dim, torch.float32))
    ok = engine.add_request(random_prompt(40, tm.vocab_size, 1), greedy(8))  # exactly the whole pool
    with pytest.raises(ResourceExhaustedError) as err:
        engine.add_request(random_prompt(45, tm.vocab_size, 2), greedy(8))
    assert err.value.field == "prompt" and "kv_cache_bytes" in str(err.value)
    run_to_completion(engine, [], [])
    assert ok.finish_reason == "length"
    engine.pool.assert_no_leaks()


def test_offline_api_refusal_leaves_nothing_queued(tiny_model: Callable[[str], TinyModel]) -> None:
    """LLM.generate with one impossible request raises and queues none of the batch."""
    tm = tiny_model("llama")
    budget = 64 * page_bytes(4, 16, torch.float32)
    llm = LLM(str(tm.path), device="cpu", dtype="float32", page_size=4, kv_cache_bytes=budget)
    fine, huge = random_prompt(5, tm.vocab_size, 1), random_prompt(200, tm.vocab_size, 2)
    with pytest.raises(ResourceExhaustedError):
        llm.generate([fine, huge], greedy(4))
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_no_leaks()
    (out,) = llm.generate([fine], greedy(4))
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "decoding"])
def test_abort_frees_pages(tiny_model: Callable[[str], TinyModel], when: str) -> None:
    tm = tiny_model("llama")
    probe = tm.engine(page_size=4)
    pages = _pages_for(probe, 30, 10)
    engine = tm.engine(page_size=4, prefill_chunk=8, kv_cache_bytes=pages * page_bytes(4, 16, torch.float32))
    other_prompt = random_prompt(30, tm.vocab_size, 5)
    victim_prompt = random_prompt(30, tm.vocab_size, 6)
    first, second = (other_prompt, victim_prompt) if when == "waiting" else (victim_prompt, other_prompt)
    a = engine.add_request(first, greedy(10), request_id="a")
    b = engine.add_request(second, greedy(10), request_id="b")
    victim, other = (b, a) if when == "waiting" else (a, b)
    target = {"waiting": SequenceStatus.WAITING, "mid_prefill": SequenceStatus.PREFILL}.get(when)
    for _ in range(100):
        engine.step()
        if target is not None and victim.status == target and (when == "waiting" or victim.num_prefilled > 0):
            break
        if when == "decoding" and len(victim.output_token_ids) >= 3:
            break
    assert not victim.is_finished
    assert engine.abort(victim.request_id)
    assert victim.finish_reason == "abort"
    assert victim.kv is None or victim.kv.num_pages_held == 0
    assert engine.pool.num_used == (other.kv.num_pages_held if other.kv is not None else 0)
    assert not engine.abort(victim.request_id)  # already gone
    assert not engine.abort("never-existed")
    run_to_completion(engine, [], [])
    assert other.finish_reason == "length"
    assert other.output_token_ids == _alone(tm.engine(page_size=4), other.prompt_token_ids, greedy(10))
    engine.pool.assert_no_leaks()


@pytest.mark.slow
def test_smollm2_batch_equals_alone(smollm2: LLM) -> None:
    chats = [
        [{"role": "user", "content": "Name three colors."}],
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "Count from one to ten in words, separated by commas."}],
    ]
    sp = SamplingParams(temperature=0.0, max_new_tokens=20)
    batched = smollm2.generate_chat(chats, sp)
    for chat, out in zip(chats, batched):
        assert out.token_ids == smollm2.generate_chat([chat], sp)[0].token_ids
    smollm2.engine.pool.assert_no_leaks()


# ---- KVPool ---------------------------------------------------------------------------------
def test_pool_allocate_free_accounting() -> None:
    pool = make_pool(10)
    a = pool.allocate(3)
    b = pool.allocate(4)
    assert len(set(a) | set(b)) == 7 and all(0 <= p < 10 for p in a + b)
    assert (pool.num_used, pool.num_free, pool.num_available) == (7, 3, 3)
    with pytest.raises(ResourceExhaustedError):
        pool.allocate(4)
    assert pool.num_used == 7  # a refused allocation takes nothing
    pool.free(a)
    assert (pool.num_used, pool.num_free) == (4, 6)
    with pytest.raises(AssertionError, match="4 pages in use"):
        pool.assert_no_leaks()
    pool.free(torch.tensor(b))
    pool.assert_no_leaks()
    assert sorted(pool.allocate(10)) == list(range(10))


def test_pool_reservations() -> None:
    pool = make_pool(10)
    pool.reserve(6)
    assert (pool.num_free, pool.num_available, pool.num_reserved) == (10, 4, 6)
    with pytest.raises(ResourceExhaustedError):
        pool.reserve(5)
    with pytest.raises(ResourceExhaustedError):
        pool.allocate(5)  # unreserved allocations cannot dip into reserved pages
    other = pool.allocate(4)
    mine = pool.allocate(6, reserved=True)
    assert pool.num_reserved == 0 and pool.num_free == 0
    pool.free(mine + other)
    pool.reserve(2)
    with pytest.raises(AssertionError, match="2 reserved"):
        pool.assert_no_leaks()
    pool.unreserve(2)
    pool.assert_no_leaks()


def test_pool_double_free_detected() -> None:
    pool = make_pool(8)
    pages = pool.allocate(3)
    pool.free(pages[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(pages[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([pages[1], pages[1]])
    assert pool.num_used == 2  # a rejected free changes nothing
    pool.free(pages[1:])
    pool.assert_no_leaks()


def test_pool_from_memory_budget() -> None:
    per_page = page_bytes(16, 64, torch.float32)
    assert per_page == 2 * 16 * 64 * 4
    pool = KVPool.from_memory_budget(10 * per_page + per_page - 1, 16, 64, torch.float32, "cpu")
    assert pool.num_pages == 10 and tuple(pool.kv.shape) == (10, 2, 16, 64)
    with pytest.raises(ResourceExhaustedError):
        KVPool.from_memory_budget(per_page - 1, 16, 64, torch.float32, "cpu")


# ---- SequenceKV ---------------------------------------------------------------------------------
def test_sequence_kv_grow_allocates_per_head_pages() -> None:
    pool = make_pool(64, page_size=4)
    kv = make_seq_kv(pool, num_layers=2, num_kv_heads=3, max_tokens=20)
    assert kv.max_pages == 5
    assert kv.pages_needed_to_grow(5) == 2 * 3 * 2
    kv.grow(5)
    assert kv.num_pages_held == 12 and pool.num_used == 12
    assert bool((kv.page_table[:, :, :2] >= 0).all()) and bool((kv.page_table[:, :, 2:] == -1).all())
    held = kv.page_table[kv.page_table >= 0]
    assert len(set(held.tolist())) == 12  # every (layer, head) owns its own pages
    kv.head_lens += 5
    assert kv.pages_needed_to_grow(3) == 0  # 8 tokens still fit in 2 pages
    kv.grow(3)
    assert pool.num_used == 12
    kv.head_lens += 3
    assert kv.pages_needed_to_grow(1) == 6
    kv.free()
    assert kv.num_pages_held == 0 and bool((kv.page_table == -1).all())
    pool.assert_no_leaks()


def test_sequence_kv_grow_fills_each_heads_own_missing_slots_in_travel_order() -> None:
    """A prompt chunk grows every head alike (one slice of the table); after compaction heads differ
    and each gets only the pages it lacks. Either way new pages land in (layer, head, page) order,
    the order the pool hands them out."""
    pool, twin = make_pool(64, page_size=4), make_pool(64, page_size=4)
    kv = make_seq_kv(pool, num_layers=2, num_kv_heads=3, max_tokens=24)
    kv.grow(5)  # every head: 0 -> 2 pages
    assert kv.page_table[:, :, :2].flatten().tolist() == twin.allocate_ids(12).tolist()
    kv.head_lens += 5
    before = kv.page_table.clone()
    lens = torch.tensor([[1, 5, 8], [4, 2, 6]])  # as compaction leaves them: 1, 2, 2 / 1, 1, 2 pages
    table = before.clone()
    table[kv.pages_per_head(lens)[..., None] <= torch.arange(kv.max_pages)] = -1
    kv.set_heads(lens, table)
    kv.grow(4)  # heads need 2, 3, 3 / 2, 2, 3 pages: 1, 1, 1 / 1, 1, 1 new, one per head
    assert bool((kv.page_table[table >= 0] == table[table >= 0]).all())  # kept pages stay put
    want_pages = kv.pages_per_head(lens + 4)
    held = (kv.page_table >= 0).sum(dim=-1)
    assert torch.equal(held, want_pages)
    assert kv.num_pages_held == int(want_pages.sum())
    assert len(set(kv.page_table[kv.page_table >= 0].tolist())) == int(want_pages.sum())
    kv.free()
    pool.assert_no_leaks()


def test_sequence_kv_slots_follow_pages() -> None:
    pool = make_pool(64, page_size=4)
    kv = make_seq_kv(pool, num_layers=1, num_kv_heads=2, max_tokens=16)
    kv.grow(6)
    pages, offsets = kv.slots(layer=0, num_new=6)
    for h in range(2):
        expected_pages = [int(kv.page_table[0, h, t // 4]) for t in range(6)]
        assert pages[h].tolist() == expected_pages
        assert offsets[h].tolist() == [0, 1, 2, 3, 0, 1]
    kv.head_lens += 6
    kv.grow(3)
    pages, offsets = kv.slots(layer=0, num_new=3)
    assert offsets[0].tolist() == [2, 3, 0]
    assert pages[0].tolist() == [int(kv.page_table[0, 0, 1])] * 2 + [int(kv.page_table[0, 0, 2])]
    kv.free()
    pool.assert_no_leaks()


def test_sequence_kv_grow_uses_its_reservation_first() -> None:
    pool = make_pool(20, page_size=4)
    kv = make_seq_kv(pool, num_layers=1, num_kv_heads=2, max_tokens=16)
    kv.reserve(4)
    assert pool.num_available == 16
    kv.grow(8)  # 2 pages x 2 heads, all from the reservation
    assert kv.reserved == 0 and pool.num_reserved == 0 and pool.num_used == 4
    kv.reserve(2)
    kv.free()  # frees pages and gives back the unused reservation
    pool.assert_no_leaks()


def test_sequence_kv_set_heads_frees_dropped_pages() -> None:
    pool = make_pool(32, page_size=4)
    kv = make_seq_kv(pool, num_layers=1, num_kv_heads=2, max_tokens=16)
    kv.grow(12)
    kv.head_lens += 12
    table = kv.page_table.clone()
    table[0, 0, 1:] = -1  # head 0 keeps 3 tokens in its first page; head 1 keeps 5 in two pages
    table[0, 1, 2:] = -1
    kv.set_heads(torch.tensor([[3, 5]]), table)
    assert kv.num_pages_held == 3 and pool.num_used == 3
    assert kv.head_lens.tolist() == [[3, 5]]
    kv.free()
    pool.assert_no_leaks()
