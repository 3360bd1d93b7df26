"""Prometheus metrics through prometheus_client: one CollectorRegistry per service (the in-process test
cluster runs three services in one process, so nothing goes to the library's global registry), the
bucket sets the services share, and the metrics port served by prometheus_client's own HTTP server.

Names are documented in docs/reliability.md. Where vLLM has a metric for the same thing, kvferry uses
vLLM's name with the `kvferry_` prefix instead of `vllm:` (kvferry_time_to_first_token_seconds,
kvferry_num_requests_running, ...), so a vLLM dashboard ports by changing the prefix. Gauges that mirror
state owned elsewhere (pool pages, queue depth, GPU memory) are read at scrape time by collectors.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def new_registry() -> CollectorRegistry:
    """A service's own registry (never prometheus_client's process-wide REGISTRY)."""
    # No `_created` series: they would double every counter and histogram, and nothing reads them.
    disable_created_metrics()
    return CollectorRegistry(auto_describe=True)  # auto_describe: a duplicate name fails at registration


class MetricsEndpoint:
    """`registry` served on `host:port` by prometheus_client's HTTP server (its own daemon thread);
    port 0 picks a free one. Binding fails at start() when the port is taken."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
