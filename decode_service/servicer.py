"""DecodeService RPCs: thin wrappers over DecodeEngine and its KVReceiver."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvferry.decode_service.decode_engine import DecodeEngine
from kvferry.kvtransfer.device_util import encode_runs
from kvferry.kvtransfer.errors import ReservationNotFoundError
from kvferry.kvtransfer.manifest import check_transfer_size
from kvferry.kvtransfer.selection import DIRECT_WRITE
from kvferry.kvtransfer.transport import EarlyFinal
from kvferry.serving import request_context
from kvferry.serving.convert import FINISH_REASONS, context_cache_info, drop_context, model_info, pool_info
from kvferry.serving.metrics import LATENCY_BUCKETS, new_registry
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)


class DecodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "kvferry_kv_bytes_received_total", "KV bytes committed into the pool", registry=registry
        )
        self.output_tokens = Counter(
            "kvferry_decode_output_tokens_total", "tokens of finished Decode streams", registry=registry
        )
        self.decode = Histogram(
            "kvferry_decode_seconds", "commit to last token, per request", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.transfers = Counter(
            "kvferry_kv_transfers_received_total", "KV transfers committed, by transport", ["transport"],
            registry=registry,
        )  # fmt: skip
        self.commit = Histogram(
            "kvferry_kv_commit_seconds", "CommitKV: nccl receive, checksum and commit", ["transport"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, decode: DecodeEngine, metrics: CollectorRegistry | None = None) -> None:
        self.decode = decode
        self.receiver = decode.receiver
        self.metrics = DecodeMetrics(metrics or new_registry())

    def _bind(self, reservation_id: str) -> None:
        """Log lines of a call about a reservation carry its request's id."""
        with contextlib.suppress(ReservationNotFoundError):
            request_context.bind(self.receiver.records.get(reservation_id).request_id)

    async def ReserveKV(
        self, request: decode_pb2.ReserveKVRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveKVResponse:
        request_context.bind(request.request_id)
        started = time.perf_counter()
        engine = self.decode.ready_engine()
        assert self.decode.spec is not None
        # An oversized transfer is refused before the manifest is even parsed into a layout.
        check_transfer_size(
            request.manifest, self.decode.spec, engine.pool.num_pages, self.decode.settings.max_transfer_bytes,
            request.context.num_pages if request.HasField("context") else 0,
        )  # fmt: skip
        r = await self.receiver.reserve(request)
        reply = decode_pb2.ReserveKVResponse(
            reservation_id=r.id,
            lease_seconds=r.lease_seconds,
            num_pages=r.page_ids.numel(),
            reserved_pages=r.reserved_pages,
            max_chunk_bytes=self.decode.settings.max_chunk_bytes,
            page_runs=encode_runs(r.page_ids) if r.transport in DIRECT_WRITE else [],
            node_id=self.decode.direct.node_id,
            context_cached=r.context_cache == "hit",
        )
        log.info(
            "ReserveKV answered in %.1f ms (%d page runs)", 1e3 * (time.perf_counter() - started),
            len(reply.page_runs) // 2,
        )  # fmt: skip
        return reply

    async def PushKV(
        self, request_iterator: AsyncIterator[decode_pb2.PushKVRequest], context: grpc.aio.ServicerContext
    ) -> decode_pb2.PushKVResponse:
        reply = await self.receiver.receive(self._bound(request_iterator))
        self.metrics.received.inc(reply.bytes_received)
        self.metrics.transfers.labels(transport="grpc").inc()
        return reply

    async def CommitKV(
        self, request: decode_pb2.CommitKVRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.CommitKVResponse:
        self._bind(request.reservation_id)
        transport = self.receiver.records.get(request.reservation_id).transport
        checksum = request.checksum if request.HasField("checksum") else None
        final = EarlyFinal(request.manifest, request.first_token_id) if request.HasField("manifest") else None
        reply = await self.receiver.commit_direct(request.reservation_id, checksum, final)
        self.metrics.received.inc(reply.bytes_received)
        self.metrics.transfers.labels(transport=transport).inc()
        self.metrics.commit.labels(transport=transport).observe(reply.transfer_seconds)
        return reply

    async def ExportKV(
        self, request: decode_pb2.ExportKVRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ExportKVResponse:
        self.decode.ready_engine()
        return self.decode.direct.export()

    async def OpenNccl(
        self, request: decode_pb2.OpenNcclRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.OpenNcclResponse:
        self.decode.ready_engine()
        return await self.decode.direct.open_nccl(request)

    async def _bound(
        self, chunks: AsyncIterator[decode_pb2.PushKVRequest]
    ) -> AsyncIterator[decode_pb2.PushKVRequest]:
        first = True
        async for chunk in chunks:
            if first:
                self._bind(chunk.reservation_id)
                first = False
            yield chunk

    async def Decode(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        self._bind(request.reservation_id)
        async for event, reservation in self.decode.decode(request.reservation_id):
            response = decode_pb2.DecodeResponse(token_ids=event.token_ids, text=event.text)
            if event.finish_reason is not None:
                response.finish_reason = FINISH_REASONS[event.finish_reason]
                stats = response.stats
                stats.context_cache = reservation.context_cache
                stats.kv_bytes_received = reservation.received
                stats.kv_pages = reservation.page_ids.numel()
                if reservation.committed_at is not None:
                    stats.transfer_seconds = reservation.committed_at - reservation.created
                if event.output is not None:
                    stats.output_tokens = len(event.output.token_ids)
                    stats.decode_seconds = event.output.stats.decode_seconds
                    self.metrics.output_tokens.inc(stats.output_tokens)
                    self.metrics.decode.observe(stats.decode_seconds)
            yield response

    async def Abort(
        self, request: decode_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.AbortResponse:
        self._bind(request.reservation_id)
        return decode_pb2.AbortResponse(found=self.receiver.abort(request.reservation_id))

    async def Info(
        self, request: decode_pb2.DecodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.DecodeInfoResponse:
        engine = self.decode.ready_engine()
        return decode_pb2.DecodeInfoResponse(
            model=model_info(engine),
            pool=pool_info(engine.pool),
            running=engine.scheduler.running_count(),
            reservations=len(self.receiver.records),
            lease_seconds=self.decode.settings.lease_seconds,
            context_cache=context_cache_info(engine.context_cache_state()),
        )

    async def DropContext(
        self, request: common_pb2.DropContextRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.DropContextResponse:
        self.decode.ready_engine()
        return common_pb2.DropContextResponse(
            found=await self.decode.worker.call(drop_context(request.handle))
        )
