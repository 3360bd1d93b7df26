"""The paged KV pool: one tensor of pages, exact free-page accounting, reservations, a leak check.

A page holds `page_size` consecutive cached tokens of ONE (sequence, layer, kv-head); K and V of
those tokens live in the same page: pool.kv is [num_pages, 2, page_size, head_dim].
"""

from __future__ import annotations

import torch

from engine.errors import ResourceExhaustedError


def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * page_size * head_dim * torch.empty((), dtype=dtype).element_size()


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
        # Pages are handed out from the end of the list; a stack keeps recently freed pages warm.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = torch.ones(num_pages, dtype=torch.bool)
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
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_available(self) -> int:
        """Pages neither in use nor promised to a reservation."""
        return len(self._free) - self.num_reserved

    def reserve(self, n: int) -> None:
        """Promise `n` pages to a caller that will allocate them later (admission control)."""
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
        self.num_reserved += n

    def unreserve(self, n: int) -> None:
        assert 0 <= n <= self.num_reserved, (n, self.num_reserved)
        self.num_reserved -= n

    def allocate(self, n: int, reserved: bool = False) -> list[int]:
        """Take `n` pages; with `reserved=True` they come out of an earlier reserve()."""
        if reserved:
            self.unreserve(n)
        elif n > self.num_available:
            raise ResourceExhaustedError(f"need {n} KV pages but only {self.num_available} are available")
        if n == 0:
            return []
        pages = self._free[-n:]  # the same pages, in the same order, as n pops from the end
        del self._free[-n:]
        pages.reverse()
        self._is_free[torch.tensor(pages, dtype=torch.long)] = False
        return pages

    def free(self, pages: list[int] | torch.Tensor) -> None:
        if isinstance(pages, torch.Tensor):
            pages = pages.tolist()
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.long)
        if bool(self._is_free[idx].any()) or len(set(pages)) != len(pages):
            raise RuntimeError("double free of a KV page")
        self._is_free[idx] = True
        self._free.extend(pages)

    def assert_no_leaks(self) -> None:
        used = self.num_used
        if used or self.num_reserved:
            raise AssertionError(f"KV pool leak: {used} pages in use, {self.num_reserved} reserved")
