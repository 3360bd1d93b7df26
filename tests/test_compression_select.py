"""Budget policies, protection and select-and-pack on a real pool: what is kept, where it lands,
and that every dropped page goes back to the pool (span_chunk=0 where a test checks the budget on raw scores)."""

from __future__ import annotations

import math

import pytest
import torch

from kvferry.engine import CompressionParams
from kvferry.engine.compression.budget import keep_mask, uniform_share
from kvferry.engine.compression.protection import protected_mask
from kvferry.engine.compression.select import (
    compact_in_place,
    compress_kv,
    mask_to_indices,
    pack_kept,
    select_tokens,
)
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.layers.paged_attention import gather_heads
from kvferry.engine.page_table import SequenceKV

L, H, N, P, D = 3, 4, 203, 8, 4


def random_scores(seed: int) -> torch.Tensor:
    return torch.randn(L, H, N, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget", ["uniform", "adaptive", "global"])
@pytest.mark.parametrize("retention", [0.05, 0.3, 0.9])
def test_protected_tokens_are_always_kept(budget: str, retention: float) -> None:
    params = CompressionParams(
        retention=retention, budget=budget, sink=3, recent=7, protected_spans=[(50, 61), (190, 400)]
    )
    protected = protected_mask(N, params.sink, params.recent, params.protected_spans)
    assert int(protected.sum()) == 3 + 11 + (N - 190)
    scores = random_scores(0)
    scores[..., protected] = -1e9  # the worst scores must not matter
    mask = keep_mask(scores, protected, params)
    assert bool(mask[..., protected].all())


def test_uniform_keeps_each_heads_top_share() -> None:
    params = CompressionParams(retention=0.3, budget="uniform", sink=2, recent=3, span_chunk=0)
    scores = random_scores(1)
    kept, lens = select_tokens(scores, params)
    share = uniform_share(N, 0.3)
    assert share == round(0.3 * N)
    assert bool((lens == share).all())
    protected = protected_mask(N, 2, 3, [])
    for layer in range(L):
        for head in range(H):
            s = scores[layer, head].masked_fill(protected, float("inf"))
            want = torch.topk(s, share).indices.sort().values
            assert kept[layer, head].tolist() == want.tolist()


def test_protection_beyond_the_budget_is_kept_and_reported() -> None:
    params = CompressionParams(retention=0.05, sink=4, recent=40)
    _, lens = select_tokens(random_scores(2), params)
    assert bool((lens == 44).all())  # more than round(0.05 * 203) = 10: real counts, not nominal


def test_adaptive_respects_the_floor_and_the_layer_total() -> None:
    params = CompressionParams(
        retention=0.25, budget="adaptive", head_floor=0.2, sink=1, recent=2, span_chunk=0
    )
    share = uniform_share(N, 0.25)
    floor = math.ceil(0.2 * share)
    scores = random_scores(3)
    scores[:, 1] -= 100.0  # head 1 loses every contest: it must still keep its floor
    scores[:, 2] += 100.0  # head 2 wins them all
    mask = keep_mask(scores, protected_mask(N, 1, 2, []), params)
    lens = mask.sum(dim=-1)  # [L, H]
    assert bool((lens.sum(dim=1) == H * share).all())
    assert bool((lens >= floor).all())
    assert bool((lens[:, 1] == floor).all())
    assert bool((lens[:, 2] > share).all())


def test_adaptive_spends_the_rest_on_the_best_tokens_of_the_layer() -> None:
    params = CompressionParams(
        retention=0.3, budget="adaptive", head_floor=0.0, sink=0, recent=0, span_chunk=0
    )
    scores = random_scores(4)
    mask = keep_mask(scores, protected_mask(N, 0, 0, []), params)
    for layer in range(L):
        kept, dropped = scores[layer][mask[layer]], scores[layer][~mask[layer]]
        floor_tokens = H  # head_floor 0 still keeps one token per head
        assert float(dropped.max()) <= float(kept.sort().values[floor_tokens])


def test_global_budget_ranks_across_layers() -> None:
    params = CompressionParams(retention=0.2, budget="global", head_floor=0.2, sink=0, recent=0, span_chunk=0)
    scores = random_scores(5)
    scores[0] += 50.0  # layer 0 is "more important" on this common scale
    mask = keep_mask(scores, protected_mask(N, 0, 0, []), params)
    lens = mask.sum(dim=-1)
    share = uniform_share(N, 0.2)
    assert int(lens.sum()) == L * H * share
    assert bool((lens >= math.ceil(0.2 * share)).all())
    assert int(lens[0].sum()) > H * share > int(lens[1].sum())


def filled_sequence(pool: KVPool, n: int, seed: int) -> tuple[SequenceKV, torch.Tensor]:
    """A sequence whose every head holds n random tokens; returns it and its K/V [L, H, n, 2, D]."""
    kv = SequenceKV(pool, L, H, n + 20)
    kv.grow(n)
    values = torch.randn(L, H, n, 2, D, generator=torch.Generator().manual_seed(seed))
    for layer in range(L):
        pages, offsets = kv.slots(layer, n)
        pool.kv[pages, :, offsets] = values[layer]
    kv.head_lens += n
    return kv, values


def head_contents(kv: SequenceKV) -> list[list[torch.Tensor]]:
    """What each head holds, in order: [L][H] -> [len, 2, D]."""
    width = int(kv.pages_per_head(kv.head_lens).max())
    k, v = gather_heads(kv.pool.kv, kv.page_table, width)  # [L, H, width*P, D]
    both = torch.stack([k, v], dim=3)
    return [[both[i, j, : int(kv.head_lens[i, j])] for j in range(H)] for i in range(L)]


@pytest.mark.parametrize("budget", ["uniform", "adaptive"])
def test_compaction_moves_kept_tokens_and_frees_exactly_the_dropped_pages(budget: str) -> None:
    pool = KVPool(1000, P, D, torch.float32, "cpu")
    other, _ = filled_sequence(pool, 57, seed=9)  # a neighbour whose pages must stay untouched
    other_before = [t.clone() for row in head_contents(other) for t in row]
    kv, values = filled_sequence(pool, N, seed=6)
    pages_before, free_before = kv.num_pages_held, pool.num_free
    assert pages_before == L * H * math.ceil(N / P)

    params = CompressionParams(retention=0.3, budget=budget, sink=2, recent=5)
    kept, lens = select_tokens(random_scores(7), params)
    compact_in_place(kv, kept, lens)

    assert torch.equal(kv.head_lens, lens)
    pages_after = int(sum(math.ceil(int(x) / P) for x in lens.flatten()))
    assert kv.num_pages_held == pages_after
    assert pool.num_free - free_before == pages_before - pages_after
    for layer, row in enumerate(head_contents(kv)):
        for head, got in enumerate(row):
            positions = kept[layer, head, : int(lens[layer, head])]
            assert torch.equal(got, values[layer, head, positions])
    # The head's chain is dense: pages in use first, -1 after.
    used = kv.page_table >= 0
    assert torch.equal(used.sum(dim=-1), kv.pages_per_head(lens).to(torch.int64))
    other_after = [t for row in head_contents(other) for t in row]
    assert all(torch.equal(a, b) for a, b in zip(other_after, other_before))
    kv.free()
    other.free()
    pool.assert_no_leaks()


def test_keeping_everything_changes_nothing() -> None:
    pool = KVPool(1000, P, D, torch.float32, "cpu")
    kv, _ = filled_sequence(pool, N, seed=8)
    table, snapshot = kv.page_table.clone(), pool.kv.clone()
    compress_kv(kv, random_scores(8), CompressionParams(retention=1.0))
    assert torch.equal(kv.page_table, table) and torch.equal(pool.kv, snapshot)
    kv.free()
    pool.assert_no_leaks()


def test_pack_into_other_pages_copies_without_touching_the_source() -> None:
    pool = KVPool(1000, P, D, torch.float32, "cpu")
    src, values = filled_sequence(pool, N, seed=10)
    mask = torch.rand(L, H, N, generator=torch.Generator().manual_seed(11)) < 0.4
    kept, lens = mask_to_indices(mask)
    dst = SequenceKV(pool, L, H, N)
    dst.grow_to(lens)
    snapshot = [t.clone() for row in head_contents(src) for t in row]
    pack_kept(pool.kv, src.page_table, kept, lens, dst.page_table)
    for layer, row in enumerate(head_contents(dst)):
        for head, got in enumerate(row):
            assert torch.equal(got, values[layer, head][mask[layer, head]])
    assert all(torch.equal(a, b) for a, b in zip([t for row in head_contents(src) for t in row], snapshot))
    src.free()
    dst.free()
    pool.assert_no_leaks()
