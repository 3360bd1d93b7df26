"""Wires a coordinator together: node pool, servicer, gRPC host, and the OpenAI-compatible HTTP front
on `http_port`."""

from __future__ import annotations

import logging

from kvferry.coordinator.context_routes import ContextRoutes, RoutePreference
from kvferry.coordinator.nodes import NodePool
from kvferry.coordinator.servicer import CoordinatorServicer
from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.serving.server import ServiceHost, configure_logging
from kvferry.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


def build(settings: CoordinatorSettings) -> ServiceHost:
    """The service, not started yet (`await host.start()` / `await host.stop()`, or `host.run()`)."""
    host = ServiceHost(settings, [SERVICE_NAME])
    preference = RoutePreference(settings.context_prefill_slack, settings.context_decode_share)
    nodes = NodePool(
        settings.prefill_addresses, settings.decode_addresses, settings.info_timeout_seconds, host.channels,
        preference,
    )  # fmt: skip
    policy = settings.compression_policy()
    log.info("compression policy: %s", policy.describe())
    servicer = CoordinatorServicer(
        nodes, host.metrics, settings.max_active_requests, settings.decode_retries, policy,
        ContextRoutes(settings.context_routes),
    )  # fmt: skip
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, host.server)
    if settings.http_port is not None:
        from kvferry.coordinator.openai_api import build_app  # FastAPI loads only when the front is on
        from kvferry.serving.http_server import AsgiServer

        app = build_app(servicer, host.metrics, host.auth, settings.served_model_name, lambda: host.serving)
        host.http = AsgiServer(app, settings.host, settings.http_port, settings.grace_seconds, settings)
    host.on_stop = nodes.close
    host.component = servicer
    return host


async def serve(settings: CoordinatorSettings) -> int:
    configure_logging(settings.log_level)
    return await build(settings).run()
