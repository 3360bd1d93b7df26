"""Prometheus metrics without a dependency: counters, gauges and histograms, the text exposition format
(version 0.0.4), and a tiny asyncio HTTP server answering `GET /metrics` on the service's own loop.

Names are documented in docs/reliability.md. Gauges that mirror state owned elsewhere (pool pages,
queue depth, GPU memory) are filled by collectors run just before each scrape.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()  # engine threads may update metrics too

    def _key(self, labels: dict[str, object]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels must be {self.labelnames}, got {tuple(labels)}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = list(self._values.items())
        return [f"{self.name}{_format_labels(k)} {_format_value(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = list(self._values.items())
        return [f"{self.name}{_format_labels(k)} {_format_value(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket, [sum, count]

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            total[0] += value
            total[1] += 1

    def count(self, **labels: object) -> int:
        series = self._series.get(self._key(labels))
        return 0 if series is None else int(series[1][1])

    def samples(self) -> list[str]:
        lines = []
        with self._lock:
            items = [(k, (list(c), list(t))) for k, (c, t) in self._series.items()]
        for key, (counts, (total, n)) in items:
            for bound, c in zip(self.buckets, counts):
                lines.append(f"{self.name}_bucket{_format_labels(key, (('le', _format_value(bound)),))} {c}")
            lines.append(f"{self.name}_bucket{_format_labels(key, (('le', '+Inf'),))} {int(n)}")
            lines.append(f"{self.name}_sum{_format_labels(key)} {_format_value(total)}")
            lines.append(f"{self.name}_count{_format_labels(key)} {int(n)}")
        return lines


class Registry:
    """The metrics of one process; `render()` is the body of a scrape."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.labelnames != metric.labelnames:
                raise ValueError(f"metric {metric.name} is already registered differently")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def add_collector(self, collect: Callable[[], None]) -> None:
        """`collect()` runs before every scrape (it sets gauges from state owned elsewhere)."""
        self._collectors.append(collect)

    def render(self) -> str:
        for collect in self._collectors:
            try:
                collect()
            except Exception:  # a scrape must never fail because one source is not ready
                log.debug("metrics collector failed", exc_info=True)
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.header()
            lines += metric.samples()
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{labels}': value} (for tests and tools)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class MetricsServer:
    """`GET /metrics` over plain HTTP/1.1 on the running asyncio loop (anything else: 404)."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass  # headers: not needed
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1].split("?")[0] == "/metrics":
                body = self.registry.render().encode()
                status, content_type = "200 OK", CONTENT_TYPE
                if parts[0] == "HEAD":
                    body = b""
            else:
                body, status, content_type = b"not found; try /metrics\n", "404 Not Found", "text/plain"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
