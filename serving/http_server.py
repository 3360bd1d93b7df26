"""An ASGI app served by uvicorn on the service's own asyncio loop, beside its gRPC server (the
coordinator's OpenAI-compatible front).

The socket is bound before uvicorn starts, so a taken port fails the service's start with the port
named, and port 0 reports the one picked. With the service's TLS settings it serves HTTPS with the
same certificate as its gRPC port, and with `tls_client_ca` requires client certificates. Stopping closes the listener, gives in-flight requests
`grace_seconds`, then cancels what is left (a cancelled stream frees its KV like any cancelled call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service's own SIGTERM/SIGINT handlers stop it (uvicorn's would replace them)


class AsgiServer:
    def __init__(self, app: Any, host: str, port: int, grace_seconds: float, settings: Any = None) -> None:
        """`settings`: the service's ServerSettings, for its TLS files (tls_cert, tls_key, tls_client_ca)."""
        self.app = app
        self.host = host
        self.port = port
        self.grace_seconds = grace_seconds
        self.tls: dict[str, Any] = {}
        if settings is not None and settings.tls_cert:
            self.tls = dict(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
            if settings.tls_client_ca:
                self.tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen and serve; returns the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError as e:
            raise OSError(e.errno, f"HTTP port {self.host}:{self.port}: {e.strerror}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the service's logging, as configured for its gRPC side
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(int(self.grace_seconds), 1),
            **self.tls,
        )
        try:
            config.load()  # reads the TLS files now: a bad path fails the start
        except BaseException:
            sock.close()
            raise
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"http:{self.port}")
        while not self._server.started:  # startup() is a few loop turns: create_server on the bound socket
            if self._task.done():
                self._task.result()  # raises what failed
                raise RuntimeError(f"HTTP server on port {self.port} stopped during start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = self._task = None
