"""Wires a prefill service together: engine, KV handoff, servicer, gRPC host."""

from __future__ import annotations

import logging

import torch
from prometheus_client import Gauge

from kvferry.decode_service.client import DecodeClient
from kvferry.kvtransfer.selection import parse_transports
from kvferry.prefill_service.handoff import KVHandoff
from kvferry.prefill_service.links import DecodeLinks, LinkOptions
from kvferry.prefill_service.pipeline import PrefillPipeline
from kvferry.prefill_service.prefill_engine import PrefillEngine
from kvferry.prefill_service.servicer import PrefillServicer
from kvferry.prefill_service.settings import PrefillSettings
from kvferry.serving.engine_metrics import register_engine_metrics
from kvferry.serving.server import ServiceHost, configure_logging
from kvferry.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


def build(settings: PrefillSettings) -> ServiceHost:
    """The service, not started yet (`await host.start()` / `await host.stop()`, or `host.run()`)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    engine = PrefillEngine(settings.engine_config())
    host = ServiceHost(settings, [SERVICE_NAME])
    options = LinkOptions(
        device=str(settings.engine_config().torch_device()),
        transports=parse_transports(settings.transports),
        default=settings.transport,
        grpc_chunk_bytes=settings.chunk_bytes,
        reserve_wait_seconds=settings.reserve_wait_seconds,
    )
    handoff = KVHandoff(DecodeLinks(options, lambda address: DecodeClient.connect(address, host.channels)))
    policy = settings.compression_policy()
    log.info("compression policy: %s", policy.describe())
    pipeline = PrefillPipeline(
        engine, handoff, settings.max_pending_requests, host.metrics, early_reserve=settings.early_reserve,
        cache_context=settings.cache_context, max_put_context_tokens=settings.max_put_context_tokens,
        policy=policy,
    )  # fmt: skip
    depth = Gauge(
        "kvferry_prefill_queue_depth", "Prefill calls accepted and not answered", registry=host.metrics
    )
    depth.set_function(lambda: pipeline.in_flight)
    register_engine_metrics(host.metrics, lambda: engine.worker.engine)
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(PrefillServicer(pipeline), host.server)

    async def stop() -> None:
        await handoff.close()
        await engine.stop()

    host.warm_up, host.on_stop = engine.start, stop
    host.component = pipeline
    return host


async def serve(settings: PrefillSettings) -> int:
    configure_logging(settings.log_level)
    return await build(settings).run()
