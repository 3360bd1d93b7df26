"""Per-sequence KV placement: a page table [layers, kv_heads, max_pages] and per-head lengths.

Every (layer, kv-head) of a sequence owns its own chain of pages, so after compression each head
can keep a different number of tokens. Token order inside a head does not matter for attention
(keys are cached after RoPE), so compaction may reorder freely.
"""

from __future__ import annotations

import numpy as np
import torch

from kvferry.engine.kv_pool import KVPool


class SequenceKV:
    def __init__(self, pool: KVPool, num_layers: int, num_kv_heads: int, max_tokens: int) -> None:
        self.pool = pool
        self.max_pages = -(-max_tokens // pool.page_size)
        self.page_table = torch.full((num_layers, num_kv_heads, self.max_pages), -1, dtype=torch.int32)
        self.head_lens = torch.zeros(num_layers, num_kv_heads, dtype=torch.int64)
        self.num_pages_held = 0
        self.reserved = 0  # pages promised to this sequence by pool.reserve() and not yet allocated
        # Pages allocated for an early KV import (written before their layout is known), in the order
        # they will be laid out; counted in num_pages_held.
        self.staged = torch.empty(0, dtype=torch.int64)

    @property
    def num_layers(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.page_table.shape[1]

    def pages_per_head(self, lens: torch.Tensor) -> torch.Tensor:
        return (lens + self.pool.page_size - 1) // self.pool.page_size

    def pages_needed_to_grow(self, num_new: int) -> int:
        held = self.pages_per_head(self.head_lens)
        return int((self.pages_per_head(self.head_lens + num_new) - held).sum())

    def reserve(self, n: int) -> None:
        self.pool.reserve(n)
        self.reserved += n

    def release_reservation(self) -> None:
        self.pool.unreserve(self.reserved)
        self.reserved = 0

    def grow(self, num_new: int) -> None:
        """Make room for `num_new` more tokens in every head (does not change head_lens)."""
        self._allocate_up_to(self.pages_per_head(self.head_lens + num_new))

    def grow_to(self, head_lens: torch.Tensor) -> torch.Tensor:
        """Allocate pages for `head_lens` [L, H] tokens per head and adopt those lengths (KV import).
        Returns the new page ids [N] in (layer, head, page) order: all of them for a fresh sequence,
        ascending (the fewest runs for a direct transfer to write)."""
        new_pages = self._allocate_up_to(self.pages_per_head(head_lens), ascending=True)
        self.head_lens = head_lens.to(torch.int64).clone()
        return new_pages

    def attach_shared(self, table: torch.Tensor, head_lens: torch.Tensor, pages: torch.Tensor) -> None:
        """Start a fresh sequence on a cached context's pages: table [L, H, W] (-1 past each head's
        pages), head_lens [L, H], whole pages, and the table's pages [N] (the entry keeps them). This
        sequence becomes one more holder of those pages (nothing is copied); its own tokens go into
        pages after them, so it never writes into one."""
        assert self.num_pages_held == 0, "a cached context goes in front of a fresh sequence"
        assert bool((head_lens % self.pool.page_size == 0).all()), "a shared head ends on a page boundary"
        self.pool.share(pages)
        self.page_table[:, :, : table.shape[-1]] = table
        self.head_lens = head_lens.to(torch.int64).clone()
        self.num_pages_held = int(pages.numel())

    def stage(self, n: int) -> torch.Tensor:
        """Allocate `n` pages (from this sequence's reservation first) before the layout they will
        hold is known: an early KV import writes them, `adopt_staged` lays them out. Returns their ids [n]."""
        assert self.num_pages_held == 0, "staging is for a fresh sequence"
        self.staged = _ascending(self._take(n))
        self.num_pages_held = n
        return self.staged

    def adopt_staged(self, head_lens: torch.Tensor) -> int:
        """Lay the staged pages out for `head_lens` [L, H]: the first ones go to the heads in
        (layer, head, page) order (travel order), the rest are freed. Returns how many were freed."""
        want = self.pages_per_head(head_lens.to(torch.int64))
        need = int(want.sum())
        if need > self.staged.numel():
            raise ValueError(f"the layout needs {need} pages but {self.staged.numel()} were staged")
        mask = torch.arange(self.max_pages)[None, None, :] < want[..., None]
        self.page_table[mask] = self.staged[:need].to(torch.int32)
        self.head_lens = head_lens.to(torch.int64).clone()
        unused = self.staged[need:]
        self.pool.free(unused)
        self.staged = torch.empty(0, dtype=torch.int64)
        self.num_pages_held = need
        return int(unused.numel())

    def _allocate_up_to(self, want: torch.Tensor, ascending: bool = False) -> torch.Tensor:
        held = self.pages_per_head(self.head_lens)
        need = int((want - held).sum())
        if need == 0:
            return torch.empty(0, dtype=torch.int64)
        pages = self._take(need)
        if ascending:
            pages = _ascending(pages)
        new_pages = pages.to(torch.int32)
        # Fill the new slots head by head: (layer, head, page index) for every missing page.
        lo, hi = int(held.min()), int(want.max())
        if lo == int(held.max()) and hi == int(want.min()):  # every head from and to as many pages
            self.page_table[:, :, lo:hi] = new_pages.view(*held.shape, hi - lo)  # a prompt chunk: a slice
        else:
            slot_mask = torch.arange(self.max_pages)[None, None, :]
            missing = (slot_mask >= held[..., None]) & (slot_mask < want[..., None])
            self.page_table[missing] = new_pages
        self.num_pages_held += need
        return pages

    def _take(self, n: int) -> torch.Tensor:
        """`n` pages from the pool, out of this sequence's reservation first. [n] int64"""
        from_reservation = min(n, self.reserved)
        pages = self.pool.allocate_ids(from_reservation, reserved=True)
        if n > from_reservation:
            pages = torch.cat([pages, self.pool.allocate_ids(n - from_reservation)])
        self.reserved -= from_reservation
        return pages

    def slots(self, layer: int, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ids and in-page offsets for the next `num_new` tokens of every head: ([H, T], [H, T])."""
        pos = self.head_lens[layer][:, None] + torch.arange(num_new)[None, :]
        page_idx = pos // self.pool.page_size
        pages = torch.gather(self.page_table[layer], 1, page_idx.to(torch.int64))
        return pages.to(torch.int64), pos % self.pool.page_size

    def set_heads(
        self, kept_lens: torch.Tensor, page_table: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> None:
        """Install a compacted layout (after compression) and free pages no longer referenced.

        `dropped`: those pages, when the caller knows them (compaction: each head's pages past its
        kept ones), which spares finding them among all held pages."""
        if dropped is None:
            old = self.page_table[self.page_table >= 0]
            keep = torch.zeros(self.pool.num_pages, dtype=torch.bool)
            keep[page_table[page_table >= 0].long()] = True
            dropped = old[~keep[old.long()]]
        self.page_table = page_table.to(torch.int32)
        self.head_lens = kept_lens.to(torch.int64)
        self.pool.free(dropped)
        self.num_pages_held -= int(dropped.numel())

    def free(self) -> None:
        """Let go of every page (a shared context page stays with its other holders) and the reservation."""
        held = self.page_table[self.page_table >= 0]
        self.pool.free(held)
        self.pool.free(self.staged)
        self.staged = torch.empty(0, dtype=torch.int64)
        self.page_table.fill_(-1)
        self.head_lens.zero_()
        self.num_pages_held = 0
        self.release_reservation()

    def ordered_page_ids(
        self, start: torch.Tensor | None = None, end: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Held page ids in (layer, head, page) order: the order pages travel in a handoff. With
        `start` / `end` [L, H] (page indices), each head's pages in [start, end) only: a cached
        context's pages (end = its pages per head), or a request's own pages behind it (start). [N]"""
        held = self.pages_per_head(self.head_lens) if end is None else end
        slot = torch.arange(self.max_pages)[None, None, :]
        mask = slot < held[..., None]
        if start is not None:
            mask &= slot >= start[..., None]
        return self.page_table[mask].to(torch.int64)

    def kv_bytes(self) -> int:
        return self.num_pages_held * self.pool.bytes_per_page


def _ascending(pages: torch.Tensor) -> torch.Tensor:
    """Page ids sorted: an import's pages as few runs as the free pages allow. Decode growth frees one
    page per head between a request's kept pages, so a reused pool hands a large allocation out as
    hundreds of short runs in free order, and the sorted set as a few long ones (one memcpy each for
    cuda_ipc instead of a scatter). [N] int64 -> [N] int64."""
    return torch.from_numpy(np.sort(pages.numpy()))


def grow_decode_batch(kvs: list[SequenceKV], lens: torch.Tensor) -> torch.Tensor:
    """`kv.grow(1)` for every sequence of a decode step at once: a few tensor operations for the
    batch instead of a dozen per sequence (where reservations cover the growth, as admission makes
    sure, the same pages land in the same slots as sequence by sequence).

    lens [B, L, H] are the stacked head lengths. A head whose length is a multiple of the page size
    opens a page for its next token. Returns new_pages [B, L, H]: the page each head's new token
    opens, -1 where the token goes into the head's current last page.
    """
    pool = kvs[0].pool
    page_size = pool.page_size
    new_pages = torch.full_like(lens, -1)
    opening = lens % page_size == 0  # [B, L, H]
    b, layer, head = opening.nonzero(as_tuple=True)  # (b, layer, head) order: each sequence's own order
    n = b.numel()
    if n == 0:
        return new_pages
    counts = torch.bincount(b, minlength=len(kvs)).tolist()
    from_reservation = [min(c, kv.reserved) for c, kv in zip(counts, kvs)]
    pages = pool.allocate_ids(sum(from_reservation), reserved=True)
    if n > pages.numel():
        pages = torch.cat([pages, pool.allocate_ids(n - pages.numel())])
    new_pages[b, layer, head] = pages
    index = lens[b, layer, head] // page_size
    parts = zip(kvs, counts, from_reservation, *(t.split(counts) for t in (layer, head, index, pages)))
    for kv, count, reserved, part_layer, part_head, part_index, part_pages in parts:
        if count:
            kv.page_table[part_layer, part_head, part_index] = part_pages.to(torch.int32)
            kv.reserved -= reserved
            kv.num_pages_held += count
    return new_pages
