"""The cache of compressed contexts: compress a long context once, answer many questions over it.

A request's context (everything before its last user turn, or an explicit `context` beside its prompt)
is prefilled and compressed on its own by a query-agnostic method (its scores do not depend on the
question); each head's kept tokens fill whole pages (select_tokens' `round_to`), the rest of the
prompt is prefilled over them. Those pages are then shared read-only by every later request with the
same context: it starts its prefill after the context and appends its own pages behind the shared
ones (a hit copies nothing). The scheduler reserves only a hit's own pages (scheduler.py).

Keys. An entry's `handle` is the sha256 of (model fingerprint, dtype, page size, the context's
compression settings, the context's token ids): requests with equal handles would compute
bit-identical pages, so a hit produces exactly the tokens a miss does. Contexts are cut to whole
pages (the few tokens past the last page boundary belong to the rest of the prompt), so a kept head
never ends in a partly filled page that a sequence could write into.

Tiers. The device tier holds entries in pool pages, LRU by bytes within `device_budget` bytes; an
entry pushed out (by a newer one, or by admission short of pages: `reclaim`) is spilled to the host
tier (pinned memory on CUDA, plain memory on a CPU engine; LRU within `host_budget`) and restored
into fresh pages on its next hit; one pushed out of the host tier is dropped. An entry some request
uses (`pins` > 0) is never spilled or dropped. A context whose compressed pages could exceed the
device budget is never cached (computed privately, served as usual). A restored entry may push the
device tier over its budget while the contexts in use fill it; the budget holds again once they
are unpinned.

Who holds a shared page (engine/kv_pool.py counts holders): the request that computed the context
allocated it; `publish` adds the cache as a holder (and flags the page as cached); every request on
a hit adds itself (`SequenceKV.attach_shared`); each request drops its hold when it ends (finish,
abort, release after a handoff); the cache drops its own when the entry is spilled, dropped or
evicted. The page returns to the free list when its last holder lets go. With no request running,
every page in use is a cached page with the cache as its only holder: `KVPool.assert_no_leaks`.

Concurrent first requests. The first request to be admitted with a context computes it (`computing`);
a later request with the same context waits in the queue, without holding pages and without blocking
the requests behind it, until that computation ends: then it hits the new entry, or (the computation
was aborted, or found no room in the cache) computes the context itself. A request waits for one
computation at most, so a context that cannot be cached is never computed one request at a time.

Runs on the engine thread only, like the pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.errors import NotFoundError
from kvferry.engine.kv_handoff import KVLayout
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.page_table import SequenceKV

log = logging.getLogger(__name__)

DEFAULT_DEVICE_SHARE = 0.25  # of the KV pool's bytes, when EngineConfig.context_cache_bytes is None
COPY_BATCH_BYTES = 64 << 20  # pages copied between the tiers at once
# The chat flags only turn into protected_spans (which the key includes): they are left out of it.
_NOT_IN_KEY = ("protect_system_prompt", "protect_last_user_turn")


def context_handle(
    fingerprint: str, dtype: str, page_size: int, token_ids: list[int], params: CompressionParams | None
) -> str:
    """The cache key of a context: hex sha256 over everything that decides its compressed pages.
    Nodes serving the same model with the same settings compute the same handle."""
    settings = {"model": fingerprint, "dtype": dtype, "page_size": page_size, "compression": "keep-all"}
    if params is not None and params.active:
        fields = dataclasses.asdict(params)
        settings["compression"] = {k: v for k, v in fields.items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


@dataclass
class ContextCacheState:
    """What the cache holds and what it did (for the services' Info and metrics)."""

    device_entries: int
    host_entries: int
    device_bytes: int
    host_bytes: int
    device_budget_bytes: int
    host_budget_bytes: int
    pinned_entries: int  # entries requests are using now
    computing: int  # contexts being computed by a request (others wait for them)
    hits: int  # requests admitted on a cached context (either tier)
    misses: int  # requests that computed their context (cached afterwards or not)
    spills: int  # entries moved from the device tier to the host tier
    restores: int  # entries moved back from the host tier on a hit
    evictions: int  # entries dropped from the cache for room


class CachedContext:
    """One compressed context: its kept head lengths and where its pages are (pool pages on the
    device tier, one host tensor on the host tier)."""

    def __init__(self, handle: str, num_tokens: int, head_lens: torch.Tensor, page_size: int) -> None:
        self.handle = handle
        self.num_tokens = num_tokens  # context tokens covered (a multiple of the page size)
        self.head_lens = head_lens  # [L, H] int64 kept tokens per head, whole pages
        self.page_size = page_size
        self.pages_per_head = head_lens // page_size  # [L, H]
        self.num_pages = int(self.pages_per_head.sum())
        self.page_table: torch.Tensor | None = None  # [L, H, W] int32 pool pages, -1 past each head
        self._ids: torch.Tensor | None = None  # page_table's pages in travel order, once asked for
        self.host_kv: torch.Tensor | None = None  # [num_pages, 2, P, D] in (layer, head, page) order
        self.pins = 0  # requests using it now
        self.dropped = False  # dropped while pinned: its pages go when the last pin does
        # the retention its compression chose and, for retention="auto", the NLL it chose from: the
        # stats of every request that hits it
        self.chosen_retention = 1.0
        self.context_nll: float | None = None

    @property
    def on_device(self) -> bool:
        return self.page_table is not None

    def page_ids(self) -> torch.Tensor:
        """Its pool pages in (layer, head, page) order, the order pages travel in a handoff; computed
        once per stay on the device (every hit reads them), so callers must not modify it. [N] int64"""
        assert self.page_table is not None, "the entry is on the host tier"
        if self._ids is None:
            width = self.page_table.shape[-1]
            mask = torch.arange(width)[None, None, :] < self.pages_per_head[..., None]
            self._ids = self.page_table[mask].to(torch.int64)
        return self._ids

    def set_pages(self, ids: torch.Tensor) -> None:
        """Lay out pool pages ids [N] ((layer, head, page) order) as this entry's page table."""
        width = int(self.pages_per_head.max()) if self.num_pages else 0
        mask = torch.arange(width)[None, None, :] < self.pages_per_head[..., None]
        table = torch.full((*self.head_lens.shape, width), -1, dtype=torch.int32)
        table[mask] = ids.to(torch.int32)
        self.page_table = table
        self._ids = None

    def clear_pages(self) -> None:
        """Its pages left the pool (spilled to the host tier, or dropped)."""
        self.page_table = None
        self._ids = None

    def layout(self) -> KVLayout:
        return KVLayout(self.head_lens.clone(), self.page_size)


class ContextCache:
    def __init__(self, pool: KVPool, device_budget: int, host_budget: int) -> None:
        self.pool = pool
        self.device_budget = max(device_budget, 0)
        self.host_budget = max(host_budget, 0)
        self._device: OrderedDict[str, CachedContext] = OrderedDict()  # least recently used first
        self._host: OrderedDict[str, CachedContext] = OrderedDict()
        self._computing: dict[str, str] = {}  # handle -> id of the request computing it
        self.device_bytes = 0
        self.host_bytes = 0
        self.hits = self.misses = self.spills = self.restores = self.evictions = 0
        self._pin_host = pool.kv.is_cuda  # pinned host memory for the GPU's copies

    def bytes_of(self, num_pages: int) -> int:
        return num_pages * self.pool.bytes_per_page

    def can_hold(self, num_pages: int) -> bool:
        """Whether an entry of `num_pages` pages can ever be cached (fits the device budget)."""
        return 0 < self.bytes_of(num_pages) <= self.device_budget

    # ---- lookup and pins ----------------------------------------------------------------------
    def lookup(self, handle: str) -> CachedContext | None:
        """The entry of `handle` on either tier (now the most recently used), or None."""
        for tier in (self._device, self._host):
            entry = tier.get(handle)
            if entry is not None:
                tier.move_to_end(handle)
                return entry
        return None

    def pin(self, entry: CachedContext) -> None:
        """A request uses the entry's pages: it is not spilled or dropped until unpinned."""
        assert entry.on_device and not entry.dropped
        entry.pins += 1

    def unpin(self, entry: CachedContext) -> None:
        assert entry.pins > 0
        entry.pins -= 1
        if entry.pins:
            return
        if entry.dropped:
            self._let_go(entry)
        else:  # a restore may have overshot the budget while entries were in use
            while self.device_bytes > self.device_budget and (victim := self._unpinned_lru(None)):
                self._spill(victim)

    # ---- the first request computes, the others wait ------------------------------------------
    def computing(self, handle: str) -> str | None:
        """The id of the request computing this context now, or None."""
        return self._computing.get(handle)

    def begin_computing(self, handle: str, request_id: str) -> None:
        assert handle not in self._computing
        self._computing[handle] = request_id

    def end_computing(self, handle: str, request_id: str) -> None:
        """The computation ended (cached or not, finished or aborted): the waiters may go."""
        if self._computing.get(handle) == request_id:
            del self._computing[handle]

    # ---- entries in and out -------------------------------------------------------------------
    def publish(
        self, handle: str, num_tokens: int, kv: SequenceKV, head_lens: torch.Tensor | None = None
    ) -> CachedContext | None:
        """Cache the compressed context a request just computed (or a decode node just received): the
        first `num_tokens` tokens of `kv`, whose heads start with `head_lens` [L, H] kept tokens in
        whole pages (None: all that `kv` holds). The cache becomes one more holder of those pages (no
        copy). Returns the entry, or None when the device budget cannot take it now (too large, or
        full of contexts in use): the request then keeps its pages alone."""
        page_size = self.pool.page_size
        lens = (kv.head_lens if head_lens is None else head_lens).to(torch.int64).clone()
        assert bool((lens % page_size == 0).all()), "a cached head must end on a page boundary"
        if handle in self._device or handle in self._host:  # computed twice (the waiter rule allows it)
            return None
        entry = CachedContext(handle, num_tokens, lens, page_size)
        if entry.num_pages == 0 or not self._make_room(self.bytes_of(entry.num_pages)):
            return None
        entry.set_pages(kv.ordered_page_ids(end=entry.pages_per_head))
        ids = entry.page_ids()
        self.pool.share(ids)
        self.pool.mark_cached(ids, True)
        self._device[handle] = entry
        self.device_bytes += self.bytes_of(entry.num_pages)
        return entry

    def restore(self, entry: CachedContext) -> None:
        """Bring a host-tier entry back into fresh pool pages (the caller made sure the pool has room).
        If that fails, the entry is dropped and the error raised."""
        assert not entry.on_device and entry.host_kv is not None
        nbytes = self.bytes_of(entry.num_pages)
        del self._host[entry.handle]  # first: making room below may spill others into the host tier
        self.host_bytes -= nbytes
        try:
            self._make_room(nbytes)  # best effort: see the module doc on overshooting
            ids = self.pool.allocate_ids(entry.num_pages)
            pool_kv = self.pool.kv
            try:
                # Queued on the engine's stream without waiting (pinned host memory): the steps that
                # read the pages come after the copy on that stream, so the engine thread goes on
                # (a restore that waited held decoding up for a few hundred ms on an H100).
                device_ids = ids.to(pool_kv.device)
                for lo, hi in self._page_batches(ids.numel()):
                    pool_kv[device_ids[lo:hi]] = entry.host_kv[lo:hi].to(pool_kv.device, non_blocking=True)
                self.pool.mark_cached(ids, True)
            except BaseException:
                self.pool.free(ids)
                raise
        except BaseException:
            self.evictions += 1
            raise
        entry.set_pages(ids)
        entry.host_kv = None
        self._device[entry.handle] = entry
        self.device_bytes += nbytes
        self.restores += 1

    def reclaim(self, num_pages: int, keep: CachedContext | None = None) -> None:
        """Spill entries no request uses (least recently used first, never `keep`) until the pool
        has `num_pages` available, or none is left to spill (admission short of pages)."""
        while self.pool.num_available < num_pages:
            victim = self._unpinned_lru(keep)
            if victim is None:
                return
            self._spill(victim)

    def drop(self, handle: str) -> None:
        """Remove a context from the cache (NotFoundError if it is not there); pages requests still
        use go when the last of them ends."""
        entry = self._device.get(handle)
        if entry is not None:
            if entry.pins:  # out of the index now; the last unpin lets its pages go
                del self._device[handle]
                self.device_bytes -= self.bytes_of(entry.num_pages)
                entry.dropped = True
            else:
                self._let_go(entry)
            return
        entry = self._host.pop(handle, None)
        if entry is None:
            raise NotFoundError(f"context {handle!r} is not cached (never put, dropped or evicted)", "handle")
        self.host_bytes -= self.bytes_of(entry.num_pages)

    def clear(self) -> None:
        """Drop every entry no request uses."""
        for handle in [h for h, e in self._device.items() if not e.pins]:
            self.drop(handle)
        for handle in list(self._host):
            self.drop(handle)

    def export(self, handle: str) -> tuple[KVLayout, torch.Tensor]:
        """Layout and pool pages [N] ((layer, head, page) order) of a device-tier entry, to ship it
        (the services' handoff); the caller pins it while the pages travel."""
        entry = self._device.get(handle)
        if entry is None:
            raise NotFoundError(f"context {handle!r} is not in this node's device cache", "handle")
        return entry.layout(), entry.page_ids()

    # ---- room -----------------------------------------------------------------------------------
    def _unpinned_lru(self, keep: CachedContext | None) -> CachedContext | None:
        return next((e for e in self._device.values() if not e.pins and e is not keep), None)

    def _make_room(self, nbytes: int) -> bool:
        """Spill unused device entries, LRU first, until `nbytes` more fit the device budget; False,
        spilling nothing, when even spilling all of them would not make the room."""
        pinned = sum(self.bytes_of(e.num_pages) for e in self._device.values() if e.pins)
        if pinned + nbytes > self.device_budget:
            return False
        while self.device_bytes + nbytes > self.device_budget:
            victim = self._unpinned_lru(None)
            if victim is None:
                return False
            self._spill(victim)
        return True

    def _spill(self, entry: CachedContext) -> None:
        """Move an unused device entry to the host tier (dropping host entries for room, LRU first),
        or drop it when it is larger than the host budget or host memory runs out; its pool pages go
        back either way."""
        assert not entry.pins
        nbytes = self.bytes_of(entry.num_pages)
        host = None
        if nbytes <= self.host_budget:
            while self.host_bytes + nbytes > self.host_budget:
                _, old = self._host.popitem(last=False)
                self.host_bytes -= self.bytes_of(old.num_pages)
                self.evictions += 1
            host = self._copy_to_host(entry)
        self._let_go(entry)
        if host is None:
            self.evictions += 1
            return
        entry.host_kv = host
        self._host[entry.handle] = entry
        self.host_bytes += nbytes
        self.spills += 1

    def _copy_to_host(self, entry: CachedContext) -> torch.Tensor | None:
        """The entry's pages in host memory [N, 2, P, D], or None when it cannot be had (a failed
        pinned allocation costs the entry, not the step that needed the room)."""
        ids = entry.page_ids()
        pool_kv = self.pool.kv
        try:
            host = torch.empty(
                (ids.numel(), *pool_kv.shape[1:]), dtype=pool_kv.dtype, pin_memory=self._pin_host
            )
        except RuntimeError as e:
            log.warning("context cache: no host memory for a %d-page context (%s); dropped", ids.numel(), e)
            return None
        # Queued without waiting, as in restore: the pages freed after it are written only by later
        # work on the same stream, and the host copy is read only by a restore, after it on that
        # stream (the caching host allocator keeps a freed pinned block until its copies are done).
        device_ids = ids.to(pool_kv.device)
        for lo, hi in self._page_batches(ids.numel()):
            host[lo:hi].copy_(pool_kv[device_ids[lo:hi]], non_blocking=self._pin_host)
        return host

    def _page_batches(self, n: int) -> list[tuple[int, int]]:
        """[lo, hi) runs of n pages of at most COPY_BATCH_BYTES: a copy between the tiers gathers
        its pages through scratch on the device that must stay small (the pool fills the GPU)."""
        step = max(1, COPY_BATCH_BYTES // self.pool.bytes_per_page)
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def _let_go(self, entry: CachedContext) -> None:
        """The cache's hold on a device entry's pages ends (they are freed unless a request holds them)."""
        ids = entry.page_ids()
        if self._device.pop(entry.handle, None) is not None:
            self.device_bytes -= self.bytes_of(entry.num_pages)
        self.pool.mark_cached(ids, False)
        self.pool.free(ids)
        entry.clear_pages()

    # ---- visibility -------------------------------------------------------------------------------
    def state(self) -> ContextCacheState:
        """A snapshot; safe to take off the engine thread (a scrape): tuple() of a dict's values runs
        without a thread switch, and the rest are plain integers (a step stale at most)."""
        device = tuple(self._device.values())
        return ContextCacheState(
            device_entries=len(device),
            host_entries=len(self._host),
            device_bytes=self.device_bytes,
            host_bytes=self.host_bytes,
            device_budget_bytes=self.device_budget,
            host_budget_bytes=self.host_budget,
            pinned_entries=sum(1 for e in device if e.pins),
            computing=len(self._computing),
            hits=self.hits,
            misses=self.misses,
            spills=self.spills,
            restores=self.restores,
            evictions=self.evictions,
        )

    def assert_idle(self) -> None:
        """With no request in the engine: no pin, no computation, and the pool's cached pages are
        exactly the device entries' pages (the pool's own leak check covers the rest)."""
        pinned = [e.handle[:12] for e in self._device.values() if e.pins]
        assert not pinned, f"context cache: entries still pinned: {pinned}"
        assert not self._computing, f"context cache: computations never ended: {list(self._computing)}"
        pages = sum(e.num_pages for e in self._device.values())
        assert pages == self.pool.num_cached, (
            f"context cache holds {pages} pages, the pool flags {self.pool.num_cached}"
        )
        assert self.device_bytes == self.bytes_of(pages)
        assert self.host_bytes == sum(self.bytes_of(e.num_pages) for e in self._host.values())
