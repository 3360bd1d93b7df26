"""Early reservations: the decode node sets pages aside while the prefill still runs, for the most
pages the compression budget can keep, and lays them out when the commit says what they hold.

Covered here without services: the budget's page bound is never below what selection really keeps
(every budget, protection beyond the budget, ragged heads), and is exact for a uniform budget; the
engine's early import stages that many pages, lays the first ones out in travel order, frees the rest
and shrinks the growth reservation to what the layout needs, so nothing leaks whether the request
decodes, is aborted before its commit, or its layout does not fit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from builders import TinyModel, greedy

from kvferry.engine import CompressionParams
from kvferry.engine.compression.budget import max_kept_pages
from kvferry.engine.compression.select import select_tokens
from kvferry.engine.config import EngineConfig
from kvferry.engine.errors import InvalidArgumentError, ResourceExhaustedError
from kvferry.engine.kv_handoff import KVLayout
from kvferry.engine.llm_engine import LLMEngine


def _pages_kept(scores: torch.Tensor, params: CompressionParams, page_size: int) -> int:
    _, lens = select_tokens(scores, params)
    return int(((lens + page_size - 1) // page_size).sum())


@pytest.mark.parametrize("budget", ["uniform", "adaptive", "global"])
@pytest.mark.parametrize("retention", [0.02, 0.25, 0.5, 0.93])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_the_page_bound_covers_what_selection_keeps(budget: str, retention: float, page_size: int) -> None:
    for seed, (n, spans) in enumerate([(37, []), (203, [(50, 61)]), (1000, [(10, 900)]), (5, [])]):
        scores = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
        params = CompressionParams(
            retention=retention, budget=budget, sink=3, recent=7, protected_spans=spans
        )
        bound = max_kept_pages(params, n, 3, 4, page_size)
        kept = _pages_kept(scores, params, page_size)
        assert kept <= bound <= 3 * 4 * -(-n // page_size), (n, kept, bound)
        if budget == "uniform":
            assert kept == bound  # every head keeps the same count: the bound is exact


def test_the_bound_without_compression_is_the_whole_prompt() -> None:
    assert max_kept_pages(None, 100, 2, 3, 16) == 2 * 3 * 7
    assert max_kept_pages(CompressionParams(retention=1.0), 100, 2, 3, 16) == 2 * 3 * 7
    assert max_kept_pages(CompressionParams(method="none", retention=0.1), 100, 2, 3, 16) == 2 * 3 * 7


def _tiny_engine(tiny_model: Callable[[str], TinyModel]) -> LLMEngine:
    config = dict(device="cpu", dtype="float32", page_size=4, max_model_len=256, kv_cache_bytes=1 << 20)
    return LLMEngine(EngineConfig(model=str(tiny_model("llama").path), prefill_chunk=64, **config))


@pytest.fixture(scope="module")
def engine(tiny_model: Callable[[str], TinyModel]) -> LLMEngine:
    return _tiny_engine(tiny_model)


def _ragged_layout(engine: LLMEngine, prompt_len: int, seed: int) -> KVLayout:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, prompt_len + 1, (engine.num_layers, engine.num_kv_heads), generator=g)
    return KVLayout(lens, engine.pool.page_size)


def test_early_import_lays_pages_out_in_travel_order_and_frees_the_rest(engine: LLMEngine) -> None:
    prompt = list(range(1, 41))
    layout = _ragged_layout(engine, len(prompt), seed=1)
    bound = layout.num_pages + 9
    ids = engine.reserve_import_early(prompt, greedy(6), bound, "early")
    assert ids.numel() == bound
    free_before = engine.pool.num_free
    freed = engine.place_import("early", 7, layout)
    assert freed == 9 and engine.pool.num_free == free_before + 9
    seq = engine.requests["early"]
    assert torch.equal(seq.kv.ordered_page_ids(), ids[: layout.num_pages])  # first pages, travel order
    assert torch.equal(seq.kv.head_lens, layout.head_lens)
    assert seq.kv.reserved == seq.kv.pages_needed_to_grow(5)  # growth shrunk to this layout's need
    engine.commit_import("early")
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids[0] == 7 and len(seq.output_token_ids) == 6
    engine.pool.assert_no_leaks()
    assert engine.pool.num_used == 0 and engine.pool.num_reserved == 0


def test_an_early_import_decodes_like_a_regular_one(engine: LLMEngine) -> None:
    prompt = list(range(3, 60))
    layout = _ragged_layout(engine, len(prompt), seed=2)
    outputs = []
    for early in (False, True):
        if early:
            ids = engine.reserve_import_early(prompt, greedy(8), layout.num_pages + 5, "r")
            ids = ids[: layout.num_pages]
        else:
            ids = engine.reserve_import(prompt, 11, greedy(8), layout, "r")
        pages = torch.randn(
            layout.num_pages, *engine.pool.kv.shape[1:], generator=torch.Generator().manual_seed(0)
        )
        engine.pool.kv[ids] = pages
        if early:
            engine.place_import("r", 11, layout)
        seq = engine.commit_import("r")
        while engine.has_unfinished():
            engine.step()
        outputs.append(seq.output_token_ids)
    assert outputs[0] == outputs[1]
    engine.pool.assert_no_leaks()


def test_aborting_an_early_import_before_its_layout_frees_everything(engine: LLMEngine) -> None:
    prompt = list(range(1, 30))
    whole = engine.num_layers * engine.num_kv_heads * -(-len(prompt) // engine.pool.page_size)
    engine.reserve_import_early(prompt, greedy(4), whole, "gone")
    assert engine.pool.num_used == whole
    engine.abort("gone")
    assert engine.pool.num_used == 0 and engine.pool.num_reserved == 0
    engine.pool.assert_no_leaks()


def test_a_layout_larger_than_the_early_reservation_is_refused(engine: LLMEngine) -> None:
    prompt = list(range(1, 30))
    layout = _ragged_layout(engine, len(prompt), seed=3)
    engine.reserve_import_early(prompt, greedy(4), layout.num_pages - 1, "small")
    with pytest.raises(InvalidArgumentError) as e:
        engine.place_import("small", 5, layout)
    assert e.value.field == "manifest.num_pages"
    engine.abort("small")
    engine.pool.assert_no_leaks()
    assert engine.pool.num_used == 0 and engine.pool.num_reserved == 0


def test_an_early_reservation_beyond_the_prompt_or_a_full_pool_is_refused(engine: LLMEngine) -> None:
    prompt = list(range(1, 9))
    whole = engine.num_layers * engine.num_kv_heads * -(-len(prompt) // engine.pool.page_size)
    with pytest.raises(InvalidArgumentError) as e:
        engine.reserve_import_early(prompt, greedy(4), whole + 1, "big")
    assert e.value.field == "manifest.num_pages"
    taken = engine.pool.num_available - whole  # room for the pages, not for their growth
    engine.pool.reserve(taken)
    try:
        with pytest.raises(ResourceExhaustedError) as full:
            engine.reserve_import_early(prompt, greedy(40), whole, "big")
        assert full.value.retryable
    finally:
        engine.pool.unreserve(taken)
    assert "big" not in engine.requests
    assert engine.pool.num_used == 0 and engine.pool.num_reserved == 0


def test_imports_into_a_reused_pool_get_few_page_runs(tiny_model: Callable[[str], TinyModel]) -> None:
    """Decode growth takes one page per head between a request's kept pages; once freed, a later import
    must still get its pages as a few long runs (cuda_ipc writes one memcpy per run, a scatter past 64).
    In free order they came as up to 19 runs here."""
    from kvferry.kvtransfer.device_util import encode_runs

    engine = _tiny_engine(tiny_model)  # its own pool: the runs depend on what was freed before
    prompt = list(range(1, 33))  # 6 kept pages per head: the first decode token opens a new page
    layout = KVLayout(torch.full((engine.num_layers, engine.num_kv_heads), 24), engine.pool.page_size)
    runs = []
    for i in range(3):
        for early in (True, False):
            rid = f"r{i}{early}"
            if early:
                ids = engine.reserve_import_early(prompt, greedy(6), layout.num_pages + 3, rid)
                engine.place_import(rid, 5, layout)
            else:
                ids = engine.reserve_import(prompt, 5, greedy(6), layout, rid)
            runs.append(len(encode_runs(ids)) // 2)
            engine.commit_import(rid)
            while engine.has_unfinished():
                engine.step()
    assert max(runs) <= 4, runs  # in free order: up to one run per (layer, head)
    engine.pool.assert_no_leaks()
