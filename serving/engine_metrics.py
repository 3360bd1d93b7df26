"""Gauges of an engine service: KV pool pages and the scheduler's queues, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvferry.serving.metrics import Registry


def register_engine_metrics(registry: Registry, engine: Callable[[], Any]) -> None:
    """`engine()` returns the LLMEngine once loaded (None before). Reads are plain integers, taken off
    the engine thread without locking: a scrape can be one step stale, never wrong for long."""
    pages = registry.gauge(
        "kvferry_kv_pages",
        "KV pool pages by state: total, free, used (holding KV), reserved (free but promised), "
        "available (free and not promised)",
        ["state"],
    )
    page_bytes = registry.gauge("kvferry_kv_page_bytes", "bytes of one KV page (K and V)")
    queue = registry.gauge("kvferry_engine_sequences", "engine sequences by scheduler state", ["state"])

    def collect() -> None:
        e = engine()
        if e is None:
            return
        pool = e.pool
        free, reserved = pool.num_free, pool.num_reserved
        pages.set(pool.num_pages, state="total")
        pages.set(free, state="free")
        pages.set(pool.num_pages - free, state="used")
        pages.set(reserved, state="reserved")
        pages.set(max(free - reserved, 0), state="available")
        page_bytes.set(pool.bytes_per_page)
        queue.set(len(e.scheduler.waiting), state="waiting")
        queue.set(len(e.scheduler.running), state="running")

    registry.add_collector(collect)
