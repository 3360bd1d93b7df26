"""Counters the coordinator keeps since it started (the Stats RPC)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvferry.v1 import coordinator_pb2


@dataclass
class CoordinatorStats:
    started: float = field(default_factory=time.monotonic)
    requests_total: int = 0
    requests_active: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens_total: int = 0
    output_tokens_total: int = 0
    kv_bytes_shipped_total: int = 0
    kv_bytes_full_total: int = 0
    ttft_seconds_sum: float = 0.0
    context_hits_total: int = 0
    context_misses_total: int = 0
    decode_context_hits_total: int = 0
    decode_context_misses_total: int = 0

    def finished(self, stats: coordinator_pb2.GenerateStats, output_tokens: int) -> None:
        self.context_hits_total += stats.prefill.context_cache == "hit"
        self.context_misses_total += stats.prefill.context_cache == "miss"
        self.decode_context_hits_total += stats.decode.context_cache == "hit"
        self.decode_context_misses_total += stats.decode.context_cache == "miss"
        self.prompt_tokens_total += stats.prefill.prompt_tokens
        self.output_tokens_total += output_tokens
        self.kv_bytes_shipped_total += stats.prefill.kv_bytes_shipped
        self.kv_bytes_full_total += stats.prefill.kv_bytes_full
        self.ttft_seconds_sum += stats.ttft_seconds

    def to_proto(self) -> coordinator_pb2.StatsResponse:
        return coordinator_pb2.StatsResponse(
            requests_total=self.requests_total,
            requests_active=self.requests_active,
            requests_failed=self.requests_failed,
            requests_cancelled=self.requests_cancelled,
            prompt_tokens_total=self.prompt_tokens_total,
            output_tokens_total=self.output_tokens_total,
            kv_bytes_shipped_total=self.kv_bytes_shipped_total,
            kv_bytes_full_total=self.kv_bytes_full_total,
            ttft_seconds_sum=self.ttft_seconds_sum,
            uptime_seconds=time.monotonic() - self.started,
            context_hits_total=self.context_hits_total,
            context_misses_total=self.context_misses_total,
            decode_context_hits_total=self.decode_context_hits_total,
            decode_context_misses_total=self.decode_context_misses_total,
        )
