"""Gauges of an engine service: KV pool pages, the scheduler's queues and the cache of compressed
contexts (bytes and entries per tier, hits, misses, spills, restores, evictions), read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class EngineCollector(Collector):
    """`engine()` returns the LLMEngine once loaded (None before: the families come without samples).
    Reads are plain integers, taken off the engine thread without locking: a scrape can be one step
    stale, never wrong for long."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        pages = GaugeMetricFamily(
            "kvferry_kv_pages",
            "KV pool pages by state: total, free, used (holding KV), reserved (free but promised), "
            "available (free and not promised)",
            labels=["state"],
        )
        page_bytes = GaugeMetricFamily("kvferry_kv_page_bytes", "bytes of one KV page (K and V)")
        usage = GaugeMetricFamily(
            "kvferry_kv_cache_usage_perc",
            "fraction of the KV pool held or promised (used + reserved pages over all pages; 1 = full)",
        )
        running = GaugeMetricFamily("kvferry_num_requests_running", "sequences in the engine's running batch")
        waiting = GaugeMetricFamily("kvferry_num_requests_waiting", "sequences queued for admission")
        e = self.engine()
        if e is not None:
            pool = e.pool
            free, reserved, total = pool.num_free, pool.num_reserved, pool.num_pages
            available = max(free - reserved, 0)
            for state, value in (
                ("total", total),
                ("free", free),
                ("used", total - free),
                ("reserved", reserved),
                ("available", available),
            ):
                pages.add_metric([state], value)
            page_bytes.add_metric([], pool.bytes_per_page)
            usage.add_metric([], 1.0 - available / total if total else 0.0)
            running.add_metric([], len(e.scheduler.running))
            waiting.add_metric([], len(e.scheduler.waiting))
        yield from (pages, page_bytes, usage, running, waiting)
        yield from _context_cache_families(e)


_CACHE_COUNTERS = {
    "hits": "requests that found their context cached (prefill: not computed again; decode: not shipped again)",
    "misses": "requests that computed (prefill) or received (decode) their context",
    "spills": "cached contexts moved from the KV pool to host memory",
    "restores": "cached contexts moved back from host memory into the KV pool on a hit",
    "evictions": "cached contexts dropped for room",
}


def _context_cache_families(engine: Any) -> Iterator[Metric]:
    tiered = {
        "bytes": GaugeMetricFamily(
            "kvferry_context_cache_bytes",
            "bytes of cached compressed contexts by tier (device: KV pool pages, host: host memory)",
            labels=["tier"],
        ),
        "budget_bytes": GaugeMetricFamily(
            "kvferry_context_cache_budget_bytes", "the context cache's budget by tier", labels=["tier"]
        ),
        "entries": GaugeMetricFamily(
            "kvferry_context_cache_entries", "cached contexts by tier", labels=["tier"]
        ),
    }
    counters = {
        name: CounterMetricFamily(f"kvferry_context_cache_{name}", help_text)
        for name, help_text in _CACHE_COUNTERS.items()
    }
    if engine is not None:
        state = engine.context_cache_state()
        for tier in ("device", "host"):
            tiered["bytes"].add_metric([tier], getattr(state, f"{tier}_bytes"))
            tiered["budget_bytes"].add_metric([tier], getattr(state, f"{tier}_budget_bytes"))
            tiered["entries"].add_metric([tier], getattr(state, f"{tier}_entries"))
        for name, family in counters.items():
            family.add_metric([], getattr(state, name))
    yield from tiered.values()
    yield from counters.values()


def register_engine_metrics(registry: CollectorRegistry, engine: Callable[[], Any]) -> None:
    registry.register(EngineCollector(engine))
