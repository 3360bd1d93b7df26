"""Continuous batching: admit waiting requests by free pages (first come, first served), then run
prefill chunks of admitted requests, otherwise one decode step over every running request.

Admission reserves every page a request can ever need (prompt plus all its output), so a running
request never runs out of pages and nothing is preempted. Compression shrinks the reservation as
soon as the prompt is compressed, which is what lets more compressed requests in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
        self, pool: KVPool, num_layers: int, num_kv_heads: int, max_num_seqs: int, prefill_chunk: int
    ):
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def worst_case_pages(self, seq: Sequence) -> int:
        per_head = -(-seq.cache_tokens_needed() // self.pool.page_size)
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
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = self.worst_case_pages(seq)
            if need > self.pool.num_available:
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            seq.kv = SequenceKV(self.pool, self.num_layers, self.num_kv_heads, seq.cache_tokens_needed() + 1)
            seq.kv.reserve(need)
            seq.status = SequenceStatus.PREFILL
            self.running.append(seq)

    def schedule(self) -> PrefillStep | DecodeStep | None:
        self._admit()
        for seq in self.running:
            if seq.status == SequenceStatus.PREFILL:
                remaining = seq.num_prompt_tokens - seq.num_prefilled
                return PrefillStep(seq, min(self.prefill_chunk, remaining))
        decoding = [s for s in self.running if s.status == SequenceStatus.DECODE][: self.max_num_seqs]
        return DecodeStep(decoding) if decoding else None

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
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def running_count(self) -> int:
        return len(self.running)
