"""KVPool's free-page stack (numpy, vectorised): the same pages in the same order as the list-based
allocator it replaced, double frees and foreign ids refused without changing the pool, and the leak check.
Accounting and reservations are also covered in tests/test_batching.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kvferry.engine.errors import ResourceExhaustedError
from kvferry.engine.kv_pool import KVPool


def make_pool(num_pages: int) -> KVPool:
    return KVPool(num_pages, page_size=4, head_dim=2, dtype=torch.float32, device="cpu")


class ListAllocator:
    """The allocator as it was before the numpy stack (a Python list popped from the end): the oracle."""

    def __init__(self, num_pages: int) -> None:
        self.free_list = list(range(num_pages - 1, -1, -1))

    def allocate(self, n: int) -> list[int]:
        return [self.free_list.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_list.extend(reversed(pages))  # freed pages come back in the order given


@pytest.mark.parametrize("seed", range(5))
def test_same_pages_in_the_same_order_as_the_list_allocator(seed: int) -> None:
    rng = random.Random(seed)
    pool, oracle = make_pool(97), ListAllocator(97)
    held: list[int] = []
    for _ in range(300):
        if held and rng.random() < 0.45:
            rng.shuffle(held)
            k = rng.randint(1, len(held))
            out, held = held[:k], held[k:]
            kind = rng.choice(["list", "tensor64", "tensor32", "numpy"])
            arg = {
                "list": out,
                "tensor64": torch.tensor(out, dtype=torch.int64),
                "tensor32": torch.tensor(out, dtype=torch.int32),
                "numpy": np.array(out),
            }[kind]
            pool.free(arg)
            oracle.free(out)
        else:
            n = rng.randint(0, pool.num_available)
            if rng.random() < 0.5:
                got = pool.allocate(n)
                assert type(got) is list and all(type(p) is int for p in got)
            else:
                ids = pool.allocate_ids(n)
                assert ids.dtype == torch.int64 and ids.shape == (n,)
                got = ids.tolist()
            assert got == oracle.allocate(n)
            held += got
        assert pool.num_free == len(oracle.free_list) and pool.num_used == len(held)
    pool.free(held)
    pool.assert_no_leaks()


def test_fresh_pool_hands_out_one_run_in_order() -> None:
    pool = make_pool(1000)
    assert pool.allocate(5) == [0, 1, 2, 3, 4]
    assert pool.allocate_ids(3).tolist() == [5, 6, 7]
    pool.free([6, 2])
    assert pool.allocate(3) == [6, 2, 8]  # freed pages first, in the order they were freed, then fresh


def test_a_request_freed_and_reallocated_keeps_its_runs() -> None:
    """A sequence frees its pages in allocation order; the next one of the same size gets the same
    ascending runs back (not single pages in reverse), so direct transfers stay a few large copies."""
    from kvferry.kvtransfer.device_util import encode_runs

    pool = make_pool(10000)
    first = pool.allocate_ids(4096)
    pool.free(first)
    again = pool.allocate_ids(4096)
    assert torch.equal(again, first)
    assert len(encode_runs(again)) // 2 == 1


@pytest.mark.parametrize("n", [3, 90])  # a few pages (marks) and most of the pool (one pass over the flags)
def test_double_free_is_refused_and_changes_nothing(n: int) -> None:
    pool = make_pool(100)
    pages = pool.allocate(n)
    for bad in (
        [pages[0], pages[-1], pages[0]],  # twice in one call
        [*pages, pages[1]],
        torch.tensor([pages[-1], pages[-1]]),
    ):
        with pytest.raises(RuntimeError, match="double free"):
            pool.free(bad)
        assert pool.num_used == n and pool.num_free == 100 - n
    pool.free(pages[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(pages[:2])  # one already free
    with pytest.raises(RuntimeError, match="outside the pool"):
        pool.free([pages[1], 100])
    with pytest.raises(RuntimeError, match="outside the pool"):
        pool.free(torch.tensor([-1]))
    assert pool.num_used == n - 1
    pool.free(pages[1:])
    pool.assert_no_leaks()
    assert sorted(pool.allocate(100)) == list(range(100))  # nothing was lost or duplicated


def test_refused_allocations_take_nothing() -> None:
    pool = make_pool(10)
    pool.reserve(4)
    with pytest.raises(ResourceExhaustedError):
        pool.allocate_ids(7)
    assert pool.allocate_ids(4, reserved=True).tolist() == [0, 1, 2, 3]
    assert (pool.num_used, pool.num_reserved, pool.num_available) == (4, 0, 6)
    assert pool.allocate(0) == [] and pool.allocate_ids(0).numel() == 0
    pool.free([])
    pool.free(torch.empty(0, dtype=torch.int64))
    assert pool.num_used == 4


def test_leak_check_sees_corrupt_bookkeeping() -> None:
    pool = make_pool(8)
    pool.free(pool.allocate(8))
    pool.assert_no_leaks()
    pool._is_free[3] = False  # noqa: SLF001 - simulate a bookkeeping bug
    with pytest.raises(AssertionError, match="corrupt"):
        pool.assert_no_leaks()


def test_large_reservation_is_vectorised() -> None:
    """262,144 pages (32K tokens at retention 0.5, Llama-3.1-8B shape): allocate_ids + free well under
    the old 40-80 ms (generous bound for a loaded 2-core CI machine)."""
    import time

    n = 262_144
    pool = KVPool(n + 1000, page_size=16, head_dim=1, dtype=torch.bfloat16, device="cpu")
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ids = pool.allocate_ids(n)
        pool.free(ids)
        best = min(best, time.perf_counter() - t0)
    pool.assert_no_leaks()
    assert best < 0.03, best


def test_a_shared_page_goes_back_with_its_last_holder() -> None:
    """A cached context's page is held by the cache and by each request reading it: `share` adds a
    holder, `free` drops one, and the page returns to the free stack only with the last."""
    pool = make_pool(10)
    pages = pool.allocate(3)
    pool.share(pages[:2])
    pool.share(pages[:1])
    assert pool.holders(pages).tolist() == [3, 2, 1]
    pool.free(pages)  # one holder fewer each: the third page is free again
    assert pool.num_used == 2 and pool.holders(pages).tolist() == [2, 1, 0]
    pool.free(pages[:2])
    pool.free(pages[:1])
    pool.assert_no_leaks()
    assert sorted(pool.allocate(10)) == list(range(10))  # nothing lost or duplicated
    for bad, match in (([pages[0], pages[0]], "twice"), ([11], "outside the pool")):
        with pytest.raises(RuntimeError, match=match):
            pool.share(bad)
    pool.free(pages[:1])
    with pytest.raises(RuntimeError, match="share of a free"):
        pool.share(pages[:1])
    assert pool.num_used == 9


def test_leak_check_tells_cached_pages_from_leaked_ones() -> None:
    """With no request running, the pages the context cache holds are in use and not a leak, as long
    as the cache is their only holder; anything else in use is a leak."""
    pool = make_pool(10)
    pages = pool.allocate(4)
    pool.mark_cached(np.array(pages[:2]), True)
    with pytest.raises(AssertionError, match="2 pages in use beyond the 2"):
        pool.assert_no_leaks()
    pool.free(pages[2:])
    pool.assert_no_leaks()
    pool.share(pages[:1])  # a request still reading a cached page after it ended: a leak
    with pytest.raises(AssertionError, match="second holder"):
        pool.assert_no_leaks()
    pool.free(pages[:1])
    pool.assert_no_leaks()
    with pytest.raises(RuntimeError, match="context cache still holds"):
        pool.free(pages[:1])  # the cache unflags before it lets go
    with pytest.raises(RuntimeError, match="already flagged"):
        pool.mark_cached(np.array(pages[:1]), True)
    pool.mark_cached(np.array(pages[:2]), False)
    pool.free(pages[:2])
    assert pool.num_cached == 0
    pool.assert_no_leaks()
