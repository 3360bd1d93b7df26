"""The coordinator's Prometheus metrics: what each finished request cost and how it went."""

from __future__ import annotations

from kvferry.serving.metrics import RATIO_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry
from kvferry.v1 import coordinator_pb2


class CoordinatorMetrics:
    def __init__(self, registry: Registry) -> None:
        self.requests = registry.counter(
            "kvferry_requests_total",
            "Generate calls by outcome (ok, failed, cancelled, rejected)",
            ["outcome"],
        )
        self.active = registry.gauge("kvferry_requests_active", "Generate calls in progress")
        self.ttft = registry.histogram("kvferry_ttft_seconds", "time to first token, end to end")
        self.tpot = registry.histogram(
            "kvferry_tpot_seconds",
            "mean time per output token after the first",
            buckets=TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = registry.histogram("kvferry_request_seconds", "Generate call duration, end to end")
        self.retention = registry.histogram(
            "kvferry_retention_ratio", "fraction of the prompt KV kept per request", buckets=RATIO_BUCKETS
        )
        self.shipped = registry.counter("kvferry_kv_bytes_shipped_total", "KV bytes sent prefill -> decode")
        self.full = registry.counter(
            "kvferry_kv_bytes_uncompressed_total", "KV bytes the same prompts take uncompressed"
        )
        self.transfer = registry.histogram("kvferry_kv_transfer_seconds", "ReserveKV to commit, per request")
        self.prompt_tokens = registry.counter(
            "kvferry_prompt_tokens_total", "prompt tokens of finished requests"
        )
        self.output_tokens = registry.counter("kvferry_output_tokens_total", "tokens streamed to clients")
        self.retries = registry.counter(
            "kvferry_decode_retries_total", "requests continued on another decode node after theirs failed"
        )
        for outcome in ("ok", "failed", "cancelled", "rejected"):
            self.requests.inc(0, outcome=outcome)

    def finished(self, stats: coordinator_pb2.GenerateStats, output_tokens: int) -> None:
        p = stats.prefill
        self.requests.inc(outcome="ok")
        self.ttft.observe(stats.ttft_seconds)
        self.e2e.observe(stats.total_seconds)
        if output_tokens > 1:
            self.tpot.observe(max(stats.total_seconds - stats.ttft_seconds, 0.0) / (output_tokens - 1))
        if p.full_tokens:
            self.retention.observe(p.retention)
        self.shipped.inc(p.kv_bytes_shipped)
        self.full.inc(p.kv_bytes_full)
        if p.kv_bytes_shipped:
            self.transfer.observe(p.transfer_seconds)
        self.prompt_tokens.inc(p.prompt_tokens)
        self.output_tokens.inc(output_tokens)
