"""The paged KV pool: one tensor of pages, exact free-page accounting, reservations, a leak check.

A page holds `page_size` consecutive cached tokens of ONE (sequence, layer, kv-head); K and V of
those tokens live in the same page: pool.kv is [num_pages, 2, page_size, head_dim].

A page may have several holders: a cached context's pages (engine/context_cache.py) are held by the
cache and read by every sequence that uses the context. `allocate` gives a page its first holder,
`share` adds one, `free` drops one; the page returns to the free stack when its last holder lets go.
Pages the context cache holds are flagged (`mark_cached`), so the leak check can tell a cached page
from a leaked one exactly: when no request runs, every page in use is a cached page with one holder.

The free pages are a stack in a numpy array (top at the end) with a per-page "is free" flag, so
allocating or freeing n pages is a handful of vectorised O(n) operations: reserving a 32K-token
request at retention 0.5 on the Llama-3.1-8B shape takes 262,144 pages at once.
"""

from __future__ import annotations

import numpy as np
import torch

from kvferry.engine.errors import ResourceExhaustedError


def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * page_size * head_dim * torch.empty((), dtype=dtype).element_size()


def _as_page_array(pages: list[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Page ids as a flat int64 numpy array (no copy for a CPU int64 tensor or array)."""
    if isinstance(pages, torch.Tensor):
        return pages.detach().to("cpu", torch.int64).reshape(-1).numpy()
    if isinstance(pages, np.ndarray):
        return pages.astype(np.int64, copy=False).reshape(-1)
    return np.fromiter(pages, dtype=np.int64, count=len(pages))


class KVPool:
    def __init__(
        self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        if num_pages < 1:
            raise ResourceExhaustedError("the KV cache memory budget holds no page; raise kv_cache_bytes")
        self.page_size = page_size
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.kv = torch.zeros(num_pages, 2, page_size, head_dim, dtype=dtype, device=device)
        # Free pages, handed out from the top (the end of _stack[:_top]); a stack keeps recently freed
        # pages warm. A fresh pool hands out 0, 1, 2, ... in order.
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int64)
        self._top = num_pages
        self._is_free = np.ones(num_pages, dtype=np.bool_)
        self._mark = np.zeros(num_pages, dtype=np.int64)  # scratch for the duplicate checks
        # Holders beyond the first of each page in use (a shared context page: the cache plus each
        # sequence reading it), and the pages the context cache holds.
        self._extra_holders = np.zeros(num_pages, dtype=np.int32)
        self._cached = np.zeros(num_pages, dtype=np.bool_)
        self.num_cached = 0
        self.num_reserved = 0

    @classmethod
    def from_memory_budget(
        cls, budget_bytes: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVPool:
        return cls(budget_bytes // page_bytes(page_size, head_dim, dtype), page_size, head_dim, dtype, device)

    @property
    def bytes_per_page(self) -> int:
        return page_bytes(self.page_size, self.head_dim, self.kv.dtype)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_pages - self._top

    @property
    def num_available(self) -> int:
        """Pages neither in use nor promised to a reservation."""
        return self._top - self.num_reserved

    def reserve(self, n: int) -> None:
        """Promise `n` pages to a caller that will allocate them later (admission control)."""
        self.check_room(n)
        self.num_reserved += n

    def check_room(self, n: int) -> None:
        """Raise what `reserve(n)` would raise now, reserving nothing: ResourceExhaustedError, retryable
        unless the whole pool is too small."""
        if n > self.num_pages:
            raise ResourceExhaustedError(
                f"need {n} KV pages but the whole pool has {self.num_pages}: the request can never fit; "
                "shorten it or raise kv_cache_bytes",
                retryable=False,
            )
        if n > self.num_available:
            raise ResourceExhaustedError(
                f"need {n} KV pages but only {self.num_available} of {self.num_pages} are available now"
            )

    def unreserve(self, n: int) -> None:
        assert 0 <= n <= self.num_reserved, (n, self.num_reserved)
        self.num_reserved -= n

    def allocate(self, n: int, reserved: bool = False) -> list[int]:
        """Take `n` pages; with `reserved=True` they come out of an earlier reserve()."""
        return self._take(n, reserved).tolist()

    def allocate_ids(self, n: int, reserved: bool = False) -> torch.Tensor:
        """allocate() as an int64 CPU tensor: the same pages, without building a Python list (a
        262,144-page list costs milliseconds to build and more to turn back into a tensor)."""
        return torch.from_numpy(self._take(n, reserved))

    def _take(self, n: int, reserved: bool) -> np.ndarray:
        if reserved:
            self.unreserve(n)
        elif n > self.num_available:
            raise ResourceExhaustedError(f"need {n} KV pages but only {self.num_available} are available")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        top = self._top
        pages = self._stack[top - n : top][::-1].copy()  # the same pages, in the same order, as n pops
        self._top = top - n
        self._is_free[pages] = False
        return pages

    def free(self, pages: list[int] | torch.Tensor | np.ndarray) -> None:
        """Drop one holder of each page (any order, each at most once per call); a page whose last
        holder let go goes back to the free stack. A page that is already free, given twice, or outside
        the pool raises RuntimeError and leaves the pool unchanged."""
        idx = _as_page_array(pages)
        n = idx.size
        if n == 0:
            return
        self._check_ids(idx)
        if self._is_free[idx].any():
            raise RuntimeError("double free of a KV page")
        shared = self._extra_holders[idx] > 0
        last = idx if not shared.any() else idx[~shared]  # pages whose last holder lets go
        if self._cached[last].any():
            raise RuntimeError("free of a KV page the context cache still holds (unflag it first)")
        if shared.any():  # pages others still hold: one holder fewer, the page stays in use
            self._check_distinct(idx, "double free of a KV page")
            self._extra_holders[idx[shared]] -= 1
            idx = last
            n = idx.size
            if n == 0:
                return
        if n * 16 < self.num_pages:
            # Duplicates inside `pages`: write each position into its page's mark; a page given twice
            # keeps only its last position, so an earlier position does not read back its own index.
            self._check_distinct(idx, "double free of a KV page")
            self._is_free[idx] = True
        else:  # many pages: one pass over the flags is cheaper than the marks
            self._is_free[idx] = True
            if int(np.count_nonzero(self._is_free)) != self._top + n:  # a duplicate flipped no flag
                self._is_free[idx] = False  # all of them were in use a moment ago: undo
                raise RuntimeError("double free of a KV page")
        # Pushed in reverse, so the next allocation of these pages hands them out in the order given:
        # a request's pages, freed in the order they were allocated (ascending runs on a fresh pool),
        # come back as the same runs, and a direct transfer into them stays a few large copies.
        self._stack[self._top : self._top + n] = idx[::-1]
        self._top += n

    def share(self, pages: list[int] | torch.Tensor | np.ndarray) -> None:
        """Add a holder to each page in use (each at most once per call): a sequence reading a cached
        context's pages, or the cache taking the pages a sequence just computed. Nothing is copied."""
        idx = self._pages_in_use(pages, "share")
        if idx.size == 0:
            return
        self._check_distinct(idx, "share of a KV page twice in one call")
        self._extra_holders[idx] += 1

    def holders(self, pages: list[int] | torch.Tensor | np.ndarray) -> np.ndarray:
        """How many holders each page has (0: free). [n] int64"""
        idx = _as_page_array(pages)
        return np.where(self._is_free[idx], 0, self._extra_holders[idx].astype(np.int64) + 1)

    def mark_cached(self, pages: torch.Tensor | np.ndarray, cached: bool) -> None:
        """Flag (or unflag) pages in use as held by the context cache; the cache flags the pages it
        takes a hold on and unflags them just before it lets go (free)."""
        idx = self._pages_in_use(pages, "context cache hold")
        if idx.size == 0:
            return
        if bool((self._cached[idx] == cached).any()):
            raise RuntimeError(f"KV page already {'flagged' if cached else 'not flagged'} as cached")
        self._cached[idx] = cached
        self.num_cached += idx.size if cached else -idx.size

    def _pages_in_use(self, pages: list[int] | torch.Tensor | np.ndarray, what: str) -> np.ndarray:
        """Page ids, checked to lie in the pool and to be in use (else RuntimeError naming `what`)."""
        idx = _as_page_array(pages)
        if idx.size:
            self._check_ids(idx)
            if self._is_free[idx].any():
                raise RuntimeError(f"{what} of a free KV page")
        return idx

    def _check_ids(self, idx: np.ndarray) -> None:
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_pages:
            raise RuntimeError(f"KV page id outside the pool of {self.num_pages} pages")

    def _check_distinct(self, idx: np.ndarray, message: str) -> None:
        """Raise RuntimeError(message) if a page appears twice in idx."""
        order = np.arange(idx.size, dtype=np.int64)
        self._mark[idx] = order  # a page given twice keeps only its last position
        if not np.array_equal(self._mark[idx], order):
            raise RuntimeError(message)

    def assert_no_leaks(self) -> None:
        """With no request in the engine: nothing reserved, and every page in use is held by the
        context cache alone (a cached context no sequence reads any more)."""
        used = self.num_used - self.num_cached
        if used or self.num_reserved:
            raise AssertionError(
                f"KV pool leak: {used} pages in use beyond the {self.num_cached} the context cache holds, "
                f"{self.num_reserved} reserved"
            )
        if bool((self._cached & self._is_free).any()):
            raise AssertionError("KV pool corrupt: a free page is flagged as held by the context cache")
        still_shared = int(np.count_nonzero(self._extra_holders))
        if still_shared:
            raise AssertionError(f"KV pool leak: {still_shared} cached pages still have a second holder")
        flagged = int(np.count_nonzero(self._is_free))
        if flagged != self._top:  # the stack and the flags disagree: a bookkeeping bug, not a leak
            raise AssertionError(
                f"KV pool corrupt: {self._top} pages on the free stack, {flagged} flagged free"
            )
