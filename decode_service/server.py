"""Wires a decode service together: engine, servicer, gRPC host."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvferry.decode_service.decode_engine import DecodeEngine
from kvferry.decode_service.servicer import DecodeServicer
from kvferry.decode_service.settings import DecodeSettings
from kvferry.serving.engine_metrics import register_engine_metrics
from kvferry.serving.server import ServiceHost, configure_logging
from kvferry.v1 import decode_pb2, decode_pb2_grpc

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name


class ReservationCollector(Collector):
    """The reservation table's size and lease expiries, read at scrape time."""

    def __init__(self, decode: DecodeEngine) -> None:
        self.decode = decode

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily("kvferry_decode_reservations", "reservations held (any state)")
        held.add_metric([], len(self.decode.reservations))
        expired = CounterMetricFamily(
            "kvferry_decode_leases_expired", "reservations freed because their lease ran out"
        )
        expired.add_metric([], self.decode.reservations.expired_total)
        yield from (held, expired)


def build(settings: DecodeSettings) -> ServiceHost:
    """The service, not started yet (`await host.start()` / `await host.stop()`, or `host.run()`)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    decode = DecodeEngine(settings)
    host = ServiceHost(settings, [SERVICE_NAME])
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(DecodeServicer(decode, host.metrics), host.server)
    register_engine_metrics(host.metrics, lambda: decode.worker.engine)
    host.metrics.register(ReservationCollector(decode))
    host.warm_up, host.on_stop = decode.start, decode.stop
    host.component = decode
    return host


async def serve(settings: DecodeSettings) -> int:
    configure_logging(settings.log_level)
    return await build(settings).run()
