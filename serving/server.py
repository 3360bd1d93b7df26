"""Running one gRPC service: a grpc.aio server with the call interceptor (bearer token, request id,
call metrics) around the error interceptor, grpc.health.v1 (NOT_SERVING until warm-up ends), server
reflection of its own services only, TLS/mTLS and the bearer token from the settings, an optional
Prometheus endpoint, an optional HTTP server beside it (`http`: the coordinator's OpenAI-compatible
front), and a graceful stop on SIGTERM or SIGINT. One process per port: the port is bound without
SO_REUSEPORT, so a second service on a taken port fails to start instead of sharing it."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvferry.serving.call_interceptor import CallInterceptor, RpcMetrics
from kvferry.serving.error_interceptor import ErrorInterceptor
from kvferry.serving.gc_pauses import GcPauses, freeze_start_up_heap
from kvferry.serving.gpu_metrics import register_gpu_metrics
from kvferry.serving.memory_trim import MemoryTrimmer
from kvferry.serving.metrics import MetricsEndpoint, new_registry
from kvferry.serving.reflection import served_pool
from kvferry.serving.request_context import LOG_FORMAT, RequestIdFilter
from kvferry.serving.security import ChannelFactory, TokenAuth, read_token, server_credentials
from kvferry.serving.settings import ServerSettings

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 << 20  # PushKV chunks are a few MiB; this leaves room for long prompts too
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# gRPC binds with SO_REUSEPORT by default: a second process on the same port would start, report
# SERVING and take half the calls (a reservation made on one decode process, its Decode call on the other).
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]


class ListenError(RuntimeError):
    """The service cannot listen on its address (the port is taken, or the address is not this host's)."""


def _why_not_bindable(host: str, port: int) -> str:
    """The reason a bind to host:port fails, asked of the OS (gRPC's own error does not say)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot resolve {host!r}: {e}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} is in use by another process (another kvferry service?); stop it or pick another --port"
            return f"{e.strerror or e} (is {host} an address of this host?)"
    return "gRPC could not bind it"


def configure_logging(level: str) -> None:
    """Log lines carry the request id they belong to (`[-]` outside a request)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class ServiceHost:
    """Owns the server; `service_names` are the full names (kvferry.v1.X) registered on it. With a
    bearer token in the settings (`auth`), every call to them and to reflection needs it (health never
    does). `channels` opens this service's channels to other services with its TLS settings and token."""

    def __init__(self, settings: ServerSettings, service_names: list[str]) -> None:
        self.settings = settings
        self.service_names = service_names
        self.credentials = server_credentials(settings)  # reads the PEM files now: a bad path fails here
        token = read_token(settings.auth_token, settings.auth_token_file)
        self.auth = TokenAuth(token, [*service_names, reflection.SERVICE_NAME]) if token else None
        self.channels = ChannelFactory.from_settings(settings, CHANNEL_OPTIONS, token)
        self.metrics = new_registry()  # this service's prometheus_client CollectorRegistry
        self.gpu_metrics = register_gpu_metrics(self.metrics)
        self.trimmer = MemoryTrimmer()
        interceptors = [
            CallInterceptor(RpcMetrics(self.metrics), self.auth, self.trimmer),
            ErrorInterceptor(),
        ]
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.metrics_server: MetricsEndpoint | None = None
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflected = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(reflected, self.server, pool=served_pool(reflected))
        self.port = 0
        self.serving = False  # what grpc.health.v1 reports for the whole server
        self.http: Any = None  # serving.http_server.AsgiServer beside the gRPC port (the coordinator's)
        # Set by the service that builds this host: load/warm the engine; release it after the server stops.
        self.warm_up: Callable[[], Awaitable[None]] | None = None
        self.on_stop: Callable[[], Awaitable[None]] | None = None
        self.warmed: asyncio.Future[None] | None = None
        self.component: Any = None  # the service's own state (engine, pipeline...), for tests and tools
        self.owns_process = False  # run() (a service process): GC tuned for it after warm-up

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.serving = serving
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen now (NOT_SERVING), warm up in the background, then report SERVING.

        `self.warmed` resolves when warm-up ends (with its exception if it failed)."""
        await self.set_serving(False)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if self.credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self.credentials)
        except RuntimeError:
            why = _why_not_bindable(self.settings.host, self.settings.port)
            raise ListenError(f"cannot listen on {address}: {why}") from None
        await self.server.start()
        log.info(
            "listening on %s:%d (%s; %s)",
            self.settings.host, self.port, ", ".join(self.service_names), self.security_summary(),
        )  # fmt: skip
        if self.http is not None:
            try:
                http_port = await self.http.start()
            except BaseException:
                await self.server.stop(None)  # one port taken: the service does not half start
                raise
            scheme = "https" if self.http.tls else "http"
            log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, self.settings.host, http_port)
        if self.settings.metrics_port is not None:
            self.metrics_server = MetricsEndpoint(
                self.metrics, self.settings.host, self.settings.metrics_port
            )
            port = self.metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", self.settings.host, port)

        async def warm() -> None:
            if self.warm_up is not None:
                await self.warm_up()
            if self.owns_process:
                frozen = freeze_start_up_heap()
                log.info("start-up heap frozen out of garbage collection: %d objects", frozen)
            await self.set_serving(True)
            log.info("SERVING")

        self.warmed = asyncio.ensure_future(warm())

    def security_summary(self) -> str:
        if self.credentials is None:
            serving = "plaintext"
        else:
            serving = "mTLS" if self.settings.tls_client_ca else "TLS"
        return f"{serving}; outgoing {'TLS' if self.channels.secure else 'plaintext'}"

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    async def stop(self) -> None:
        """Stop taking calls, give in-flight ones `grace_seconds`, then run the service's own cleanup."""
        log.info("stopping (grace %.1f s)", self.settings.grace_seconds)
        if self.warmed is not None and not self.warmed.done():
            self.warmed.cancel()
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self.http is not None:  # its requests run through this server's servicer: stop it first
            await self.http.stop()
        await self.server.stop(self.settings.grace_seconds)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)  # waits out its serving thread's poll
        if self.on_stop is not None:
            await self.on_stop()
        log.info("stopped")

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code (1 when warm-up failed)."""
        self.owns_process = True  # before start(): its warm-up freezes the heap for this process
        try:
            await self.start()
        except (ListenError, OSError) as e:  # its port, the HTTP port or the metrics port is taken
            log.error("%s", e)
            if self.http is not None:
                await self.http.stop()
            await self.server.stop(None)
            return 1
        gc_pauses = GcPauses(self.metrics)
        gc_pauses.install()  # the process's own GC: in-process (test) hosts leave it alone
        assert self.warmed is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        exit_code = 0

        def warm_done(task: asyncio.Future[None]) -> None:
            nonlocal exit_code
            if not task.cancelled() and task.exception() is not None:
                log.error("warm-up failed; stopping", exc_info=task.exception())
                exit_code = 1
                stop.set()

        self.warmed.add_done_callback(warm_done)
        await stop.wait()
        await self.stop()
        gc_pauses.uninstall()
        return exit_code
