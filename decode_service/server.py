"""Wires a decode service together: engine, servicer, gRPC host."""

from __future__ import annotations

import torch

from kvferry.decode_service.decode_engine import DecodeEngine
from kvferry.decode_service.servicer import DecodeServicer
from kvferry.decode_service.settings import DecodeSettings
from kvferry.serving.engine_metrics import register_engine_metrics
from kvferry.serving.server import ServiceHost, configure_logging
from kvferry.v1 import decode_pb2, decode_pb2_grpc

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name


def build(settings: DecodeSettings) -> ServiceHost:
    """The service, not started yet (`await host.start()` / `await host.stop()`, or `host.run()`)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    decode = DecodeEngine(settings)
    host = ServiceHost(settings, [SERVICE_NAME])
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(decode, host.metrics), host.server)
    register_engine_metrics(host.metrics, lambda: decode.worker.engine)
    held = host.metrics.gauge("kvferry_decode_reservations", "reservations held (any state)")
    expired = host.metrics.counter(
        "kvferry_decode_leases_expired_total", "reservations freed because their lease ran out"
    )

    def collect() -> None:
        held.set(len(decode.reservations))
        expired.inc(decode.reservations.expired_total - expired.value())

    host.metrics.add_collector(collect)
    host.warm_up, host.on_stop = decode.start, decode.stop
    host.component = decode
    return host


async def serve(settings: DecodeSettings) -> int:
    configure_logging(settings.log_level)
    return await build(settings).run()
