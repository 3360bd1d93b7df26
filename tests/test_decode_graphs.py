"""The CUDA-graph decode path's padding and static-buffer logic, run on CPU.

`DecodeGraphRunner(use_graphs=False)` runs, eagerly, the very callable a CUDA graph captures: the
step padded to its bucket size, inputs read from the static buffers, page tables kept between
steps and updated in place. An engine with it attached must produce the same tokens and (up to
float32 rounding of differently shaped matmuls) the same logits as the plain eager engine, while
the batch grows, shrinks, skips the padded path (batches above the largest bucket) and decodes
compressed requests whose heads all have different lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from builders import TinyModel, greedy, make_pool, random_prompt, record_logits

from kvferry.engine import CompressionParams
from kvferry.engine.cuda_graphs import DecodeGraphRunner, graph_buckets
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.layers import paged_attention as ref
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.page_table import SequenceKV, grow_decode_batch
from kvferry.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("single_thread")

BUCKETS = [1, 2, 4]  # with max_num_seqs=6, batches of 5 and 6 fall back to the eager path
COMPRESSED = CompressionParams(method="random", retention=0.5, budget="adaptive", sink=2, recent=4)
# (step at which the request arrives, prompt length, max_new_tokens, compressed)
ARRIVALS = [
    (0, 23, 4, False),  # the first row leaves early: the rows behind it move down
    (0, 41, 30, True),
    (0, 5, 40, False),
    (12, 30, 5, True),  # the batch grows 2 -> 4
    (13, 17, 4, False),
    (24, 9, 6, True),  # 5 (eager), then back to padded steps: rows uploaded again
    (24, 52, 12, False),
    (24, 11, 8, True),
]


def test_graph_buckets() -> None:
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert graph_buckets(1) == [1]
    assert graph_buckets(1000, max_graph_batch=256)[-1] == 256


def test_reference_store_kv_skips_padding_rows() -> None:
    pool = torch.zeros(4, 2, 2, 8)
    pages = torch.tensor([[2, -1], [-1, 0]])
    offsets = torch.tensor([[1, 0], [1, 1]])
    k = torch.randn(2, 2, 8)
    v = torch.randn(2, 2, 8)
    before = pool.clone()
    ref.store_kv(pool, pages, offsets, k, v)
    assert torch.equal(pool[2, 0, 1], k[0, 0]) and torch.equal(pool[0, 1, 1], v[1, 1])
    changed = (pool != before).any(-1)  # [pages, 2, P]
    assert int(changed.sum()) == 4  # two real rows, K and V each: page -1 (the last page) untouched


def _ragged_kvs(pool: KVPool, reserve: list[int]) -> list[SequenceKV]:
    """Sequences whose heads hold different counts (0, page multiples, mid-page), each with a reservation."""
    gen = torch.Generator().manual_seed(7)
    kvs = []
    for extra in reserve:
        kv = SequenceKV(pool, 2, 3, 64)
        lens = torch.randint(0, 13, (2, 3), generator=gen) * torch.randint(1, 4, (2, 3), generator=gen)
        lens[0, 0] = 0
        lens[1, 2] = 8
        kv.reserve(int(kv.pages_per_head(lens).sum()) + extra)
        kv.grow_to(lens)
        kvs.append(kv)
    return kvs


@pytest.mark.parametrize("reserve", [[6, 6, 6, 6], [6, 0, 2, 6]], ids=["reserved", "partly_reserved"])
def test_grow_decode_batch_equals_grow_one_by_one(reserve: list[int]) -> None:
    one_pool, batch_pool = make_pool(500), make_pool(500)
    one, batch = _ragged_kvs(one_pool, reserve), _ragged_kvs(batch_pool, reserve)
    for _ in range(9):  # several steps: heads cross page boundaries at different steps
        lens = torch.stack([kv.head_lens for kv in batch])
        new_pages = grow_decode_batch(batch, lens)
        for i, kv in enumerate(one):
            held = kv.page_table.clone()
            kv.grow(1)
            opened = (kv.page_table != held).any(-1)  # [L, H]
            assert torch.equal(opened, lens[i] % 4 == 0)
            want_new = torch.full_like(lens[i], -1)
            want_new[opened] = kv.page_table.gather(2, (lens[i] // 4)[..., None])[..., 0][opened].long()
            if reserve == [6, 6, 6, 6]:
                assert torch.equal(new_pages[i], want_new)
                assert torch.equal(batch[i].page_table, kv.page_table)
            assert torch.equal((batch[i].page_table >= 0), (kv.page_table >= 0))
            assert (batch[i].reserved, batch[i].num_pages_held) == (kv.reserved, kv.num_pages_held)
            kv.head_lens += 1
            batch[i].head_lens += 1
        assert (batch_pool.num_available, batch_pool.num_reserved) == (
            one_pool.num_available,
            one_pool.num_reserved,
        )
    held = torch.cat([kv.page_table[kv.page_table >= 0] for kv in batch])
    assert held.unique().numel() == held.numel()  # no page handed out twice
    for kv in one + batch:
        kv.free()
    one_pool.assert_no_leaks()
    batch_pool.assert_no_leaks()


def _serve(engine: LLMEngine, tm: TinyModel, check: Callable[[list[Sequence]], None] | None = None):
    """Run ARRIVALS to completion; greedy tokens per request and every logits row, in call order."""
    seqs: list[Sequence] = []
    with record_logits(engine.model) as rows:
        step = 0
        while step < 200 and (engine.has_unfinished() or len(seqs) < len(ARRIVALS)):
            for at, n, new, compressed in ARRIVALS:
                if at == step:
                    prompt = random_prompt(n, tm.vocab_size, seed=n)
                    seqs.append(engine.add_request(prompt, greedy(new), COMPRESSED if compressed else None))
            stepped = engine.step()
            if check is not None and stepped and stepped[0].num_prompt_tokens + 1 < stepped[0].num_tokens:
                check(stepped)
            step += 1
    assert not engine.has_unfinished()
    engine.pool.assert_no_leaks()
    return [s.output_token_ids for s in seqs], [r.clone() for r in rows]


def _attach_padded_runner(engine: LLMEngine) -> DecodeGraphRunner:
    runner = DecodeGraphRunner(
        engine.model,
        engine.pool,
        engine.num_layers,
        engine.num_kv_heads,
        engine.max_model_len,
        BUCKETS,
        use_graphs=False,
    )
    engine.runner.graphs = runner
    return runner


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_padded_static_decode_equals_eager(tiny_model: Callable[[str], TinyModel], kind: str) -> None:
    tm = tiny_model(kind)
    options: dict[str, Any] = dict(page_size=4, prefill_chunk=16, max_num_seqs=6, max_model_len=128)
    eager_tokens, eager_rows = _serve(tm.engine(**options), tm)

    engine = tm.engine(**options)
    assert engine.runner.graphs is None  # never CUDA graphs on CPU
    runner = _attach_padded_runner(engine)
    batch_sizes: list[int] = []

    def tables_match_host(stepped: list[Sequence]) -> None:
        """After a padded step, device rows 0..B-1 hold every page of their sequence's heads."""
        batch_sizes.append(len(stepped))
        if runner.bucket_for(len(stepped)) is None:
            return
        for i, s in enumerate(stepped):
            if s.kv is None or s.is_finished:
                continue  # finished this step: its pages are gone
            kv = s.kv
            held = kv.pages_per_head(kv.head_lens)  # [L, H]
            mask = torch.arange(kv.max_pages)[None, None, :] < held[..., None]
            device_row = runner.buffers.page_tables[i, :, :, : kv.max_pages]
            assert torch.equal(device_row[mask], kv.page_table[mask]), f"row {i} out of date"

    tokens, rows = _serve(engine, tm, tables_match_host)

    assert tokens == eager_tokens
    assert len(rows) == len(eager_rows)
    padded = 0
    for got, want in zip(rows, eager_rows):
        assert got.shape[0] >= want.shape[0] and got.shape[1:] == want.shape[1:]
        padded += got.shape[0] > want.shape[0]
        torch.testing.assert_close(got[: want.shape[0]], want, rtol=1e-4, atol=1e-4)
    assert torch.cat(eager_rows).std() > 0.5, "logits too flat to tell a wrong row apart"
    # The schedule really exercised what it is meant to: padding, eager fallback, growth and
    # shrinkage, rows moved on the device and uploaded again after an eager step.
    assert padded > 0
    assert {5, 6} & set(batch_sizes) and {1, 2, 3, 4} <= set(batch_sizes)
    assert runner.buffers.rows_moved > 0
    assert runner.buffers.rows_uploaded > len(ARRIVALS)


def test_padding_rows_change_nothing(tiny_model: Callable[[str], TinyModel]) -> None:
    """One real row in a bucket of 4 whose other rows hold stale tables: the pool changes only in
    the real row's new slots, and its logits equal the same step run eagerly."""
    tm = tiny_model("llama")
    engine = tm.engine(page_size=4, max_num_seqs=4, max_model_len=64)
    runner = _attach_padded_runner(engine)
    runner.buckets = [4]
    runner.buffers.page_tables.random_(0, engine.pool.num_pages)  # stale rows point at real pages
    seq = engine.add_request(random_prompt(13, tm.vocab_size, seed=1), greedy(3))
    engine.step()  # prefill + first token
    assert seq.kv is not None
    seq.kv.grow(1)
    before = engine.pool.kv.clone()
    with torch.inference_mode():
        logits = runner.run([seq])
    changed = (engine.pool.kv != before).any(-1).any(1)  # [pages, P]
    lens = seq.kv.head_lens - 1  # the step appended one token to each head
    slots = seq.kv.page_table.gather(2, (lens // 4)[..., None])[..., 0]  # [L, H]
    expect = torch.zeros_like(changed)
    expect[slots.long().flatten(), (lens % 4).flatten()] = True
    assert torch.equal(changed, expect)

    eager = tm.engine(page_size=4, max_num_seqs=4, max_model_len=64)
    twin = eager.add_request(random_prompt(13, tm.vocab_size, seed=1), greedy(3))
    eager.step()
    want = eager.runner.decode([twin])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
