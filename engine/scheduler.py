"""Continuous batching: admit waiting requests by free pages (first come, first served), then run
prefill chunks of admitted requests, otherwise one decode step over every running request.

Among admitted prompts the one with the fewest tokens left to prefill runs its next chunk first: a
question on a cached context (one short chunk) does not wait behind every remaining chunk of a long
document admitted before it. So that a long prompt is never starved, the oldest one runs once it has
been passed over `max_prefill_bypass` times in a row.

Admission reserves every page a request can ever need (prompt plus all its output), so a running
request never runs out of pages and nothing is preempted. Compression shrinks the reservation as
soon as the prompt is compressed, which is what lets more compressed requests in.

A request on a cached context (engine/context_cache.py) that finds it cached reserves only its own
pages: the tokens after the context, which start on fresh pages of each head behind the shared ones.
One whose context another request is computing waits for that without holding up the queue; one
that computes its context reserves as any request does. Admission short of pages first spills
cached contexts no request uses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvferry.engine.context_cache import CachedContext, ContextCache
from kvferry.engine.errors import ResourceExhaustedError
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.page_table import SequenceKV
from kvferry.engine.sequence import Sequence, SequenceStatus


@dataclass
class PrefillStep:
    seq: Sequence
    num_tokens: int


@dataclass
class DecodeStep:
    seqs: list[Sequence]


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        num_layers: int,
        num_kv_heads: int,
        max_num_seqs: int,
        prefill_chunk: int,
        context_cache: ContextCache | None,
        max_prefill_bypass: int,
    ):
        self.pool = pool
        self.context_cache = context_cache
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.max_prefill_bypass = max_prefill_bypass  # 0: first come, first served
        # chunks of other prompts run in a row while the oldest prompt (its seq_id) waited
        self._bypassed = (-1, 0)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ended: list[Sequence] = []  # finished at admission (a put whose context got cached meanwhile)

    def worst_case_pages(self, seq: Sequence) -> int:
        per_head = -(-seq.cache_tokens_needed() // self.pool.page_size)
        return per_head * self.num_layers * self.num_kv_heads

    def own_pages(self, seq: Sequence) -> int:
        """The worst case of a request on a cached context it found cached: its own tokens only."""
        per_head = -(-(seq.cache_tokens_needed() - seq.context_len) // self.pool.page_size)
        return per_head * self.num_layers * self.num_kv_heads

    def add(self, seq: Sequence) -> None:
        need = self.worst_case_pages(seq)
        if need > self.pool.num_pages:
            raise ResourceExhaustedError(
                f"request needs {need} KV pages for {seq.num_prompt_tokens} prompt + {seq.max_new_tokens} new tokens "
                f"but the whole pool has {self.pool.num_pages}; shorten the prompt, lower max_new_tokens "
                "or raise kv_cache_bytes",
                field="prompt",
            )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            entry = None
            if seq.context_handle is not None:
                assert self.context_cache is not None
                entry = self.context_cache.lookup(seq.context_handle)
                if entry is None and self._waits_for_context(seq):
                    i += 1  # not for pages: the requests behind it may go first
                    continue
            if entry is not None and seq.context_only:  # a put: nothing left to compute
                del self.waiting[i]
                self.end_put(seq, entry)
                self.ended.append(seq)
                continue
            need = self.worst_case_pages(seq)
            if entry is not None:  # a hit: its own pages, and the entry's if it must come back from the host
                need = self.own_pages(seq) + (0 if entry.on_device else entry.num_pages)
            if need > self.pool.num_available and self.context_cache is not None:
                self.context_cache.reclaim(need, keep=entry)
            if need > self.pool.num_available:
                break  # first come, first served: later requests wait behind this one
            self._start(seq, entry)
            del self.waiting[i]

    def _waits_for_context(self, seq: Sequence) -> bool:
        """Whether `seq` waits for another request computing its context (once at most: see
        engine/context_cache.py)."""
        assert self.context_cache is not None and seq.context_handle is not None
        computer = self.context_cache.computing(seq.context_handle)
        if computer is None or seq.context_waited_on not in (None, computer):
            return False
        seq.context_waited_on = computer
        return True

    def end_put(self, seq: Sequence, entry: CachedContext) -> None:
        """A context-only request (PutContext) whose context is cached: it ends without running."""
        assert self.context_cache is not None
        self.context_cache.hits += 1
        seq.stats.context_cache = "hit"
        seq.stats.context_kept_tokens = int(entry.head_lens.sum())
        seq.stats.prefill_tokens_computed = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "context"

    def take_ended(self) -> list[Sequence]:
        """The requests that ended at admission since the last call."""
        ended, self.ended = self.ended, []
        return ended

    def _start(self, seq: Sequence, entry: CachedContext | None) -> None:
        """Admit `seq`: its pages, its reservation, and its context's pages on a hit. Whatever it takes
        is in `seq` before the next step can fail, so finish() gives it back."""
        kv = seq.kv = SequenceKV(self.pool, self.num_layers, self.num_kv_heads, seq.cache_tokens_needed() + 1)
        cache = self.context_cache
        if entry is not None:
            assert cache is not None
            if not entry.on_device:
                cache.restore(entry)
            kv.reserve(self.own_pages(seq))
            cache.pin(entry)
            seq.context_entry = entry
            kv.attach_shared(entry.page_table, entry.head_lens, entry.page_ids())  # type: ignore[arg-type]
            seq.num_prefilled = seq.context_len
            seq.stats.context_cache = "hit"
            seq.stats.context_kept_tokens = int(entry.head_lens.sum())
            seq.stats.chosen_retention, seq.stats.context_nll = entry.chosen_retention, entry.context_nll
            cache.hits += 1
        else:
            kv.reserve(self.worst_case_pages(seq))
            if seq.context_len:
                seq.context_pending = True
                seq.stats.context_cache = "miss"
                if cache is not None:
                    cache.misses += 1
                    handle = seq.context_handle
                    if handle is not None and cache.computing(handle) is None:  # else: computed twice
                        cache.begin_computing(handle, seq.request_id)
        seq.stats.prefill_tokens_computed = seq.num_prompt_tokens - seq.num_prefilled
        seq.status = SequenceStatus.PREFILL
        self.running.append(seq)

    def schedule(self) -> PrefillStep | DecodeStep | None:
        self._admit()
        prefilling = [s for s in self.running if s.status == SequenceStatus.PREFILL]
        if prefilling:
            seq = self._next_prefill(prefilling)
            return PrefillStep(seq, min(self.prefill_chunk, seq.prefill_end - seq.num_prefilled))
        decoding = [s for s in self.running if s.status == SequenceStatus.DECODE][: self.max_num_seqs]
        return DecodeStep(decoding) if decoding else None

    def _next_prefill(self, prefilling: list[Sequence]) -> Sequence:
        """The prompt whose chunk runs next: the fewest tokens left (the oldest among equals), or the
        oldest once it has been passed over max_prefill_bypass times in a row. `prefilling` is in
        admission order."""
        oldest = prefilling[0]
        shortest = min(prefilling, key=lambda s: s.prefill_end - s.num_prefilled)
        waited_for, count = self._bypassed
        count = count if waited_for == oldest.seq_id else 0
        if shortest is oldest or count >= self.max_prefill_bypass:
            self._bypassed = (oldest.seq_id, 0)
            return oldest
        self._bypassed = (oldest.seq_id, count + 1)
        return shortest

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling `seq` but keep its pages (held for a handoff)."""
        self.running.remove(seq)

    def attach(self, seq: Sequence) -> None:
        """Schedule an imported sequence whose pages are already filled (status DECODE)."""
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give back every page and reservation it holds."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.kv is not None:
            seq.kv.free()
        self._release_context(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _release_context(self, seq: Sequence) -> None:
        """A finished request's hold on its cached context (pages went with kv.free), and its claim to
        be computing the context, if it still had one (aborted before the context was done)."""
        cache = self.context_cache
        if cache is None:
            return
        if seq.context_entry is not None:
            cache.unpin(seq.context_entry)
            seq.context_entry = None
        if seq.context_pending and seq.context_handle is not None:
            cache.end_computing(seq.context_handle, seq.request_id)
        seq.context_pending = False

    def running_count(self) -> int:
        return len(self.running)
