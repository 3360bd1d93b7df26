"""The coordinator's Prometheus metrics: what each finished request cost and how it went. Latency and
token names are vLLM's (time_to_first_token_seconds, ...) with the kvferry_ prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvferry.serving.metrics import LATENCY_BUCKETS, RATIO_BUCKETS, TOKEN_LATENCY_BUCKETS
from kvferry.v1 import coordinator_pb2

# How a Generate call ended: `deadline_exceeded` is its deadline passing, `cancelled` the caller leaving.
OUTCOMES = ("ok", "failed", "cancelled", "deadline_exceeded", "rejected")


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvferry_requests_total",
            "Generate calls (gRPC and HTTP) by outcome: " + ", ".join(OUTCOMES),
            ["outcome"],
            registry=registry,
        )
        self.active = Gauge("kvferry_requests_active", "Generate calls in progress", registry=registry)
        self.ttft = Histogram(
            "kvferry_time_to_first_token_seconds",
            "time to first token, end to end",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "kvferry_time_per_output_token_seconds",
            "mean time per output token after the first, one sample per request",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "kvferry_e2e_request_latency_seconds",
            "Generate call duration, end to end",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retention = Histogram(
            "kvferry_retention_ratio",
            "fraction of the prompt KV kept per request",
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.shipped = Counter(
            "kvferry_kv_bytes_shipped_total", "KV bytes sent prefill -> decode", registry=registry
        )
        self.full = Counter(
            "kvferry_kv_bytes_uncompressed_total",
            "KV bytes the same prompts take uncompressed",
            registry=registry,
        )
        self.transfer = Histogram(
            "kvferry_kv_transfer_seconds",
            "ReserveKV to commit, per request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvferry_prompt_tokens_total", "prompt tokens of finished requests", registry=registry
        )
        self.generation_tokens = Counter(
            "kvferry_generation_tokens_total", "tokens streamed to clients", registry=registry
        )
        self.retries = Counter(
            "kvferry_decode_retries_total",
            "requests continued on another decode node after theirs failed",
            registry=registry,
        )
        self.context = Counter(
            "kvferry_context_requests_total",
            "finished requests on a cached context, by node and what it found: hit (cached there) or miss "
            "(prefill: computed it; decode: received its pages)",
            ["node", "cache"],
            registry=registry,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(outcome=outcome)
        for node in ("prefill", "decode"):
            for cache in ("hit", "miss"):
                self.context.labels(node=node, cache=cache)

    def ended(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def finished(self, stats: coordinator_pb2.GenerateStats, output_tokens: int) -> None:
        p = stats.prefill
        self.ended("ok")
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
        self.generation_tokens.inc(output_tokens)
        for node, cache in (("prefill", p.context_cache), ("decode", stats.decode.context_cache)):
            if cache in ("hit", "miss"):
                self.context.labels(node=node, cache=cache).inc()
