"""Python's garbage collector in a service process: what it costs, and keeping the start-up heap out of it.

A full (generation 2) collection walks every tracked object: after a model and its tokenizer are
loaded that is millions of objects, and the pause stalls the engine thread and the event loop alike
(an unexplained 49 ms ReserveKV on the H100 is the kind of stall this rules in or out). After warm-up
the service freezes what start-up built (`gc.freeze()`, as vLLM does), so later collections walk only
what serving allocates; every pause is a histogram sample, and long ones are logged.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)
LONG_PAUSE_SECONDS = 0.02
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class GcPauses:
    """Times every collection of this process into `kvferry_gc_pause_seconds{generation}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pauses = Histogram(
            "kvferry_gc_pause_seconds",
            "Python garbage-collection pauses of this process",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )
        self._started: float | None = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        generation = str(info.get("generation", "?"))
        self.pauses.labels(generation=generation).observe(seconds)
        if seconds > LONG_PAUSE_SECONDS:
            log.info(
                "garbage collection (generation %s) paused the process %.1f ms (%d objects collected)",
                generation, 1e3 * seconds, info.get("collected", 0),
            )  # fmt: skip


def freeze_start_up_heap() -> int:
    """Collect once, then move every surviving object out of future collections; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
