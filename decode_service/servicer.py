"""DecodeService RPCs: thin wrappers over DecodeEngine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_service.decode_engine import DecodeEngine
from protos.kvferry.v1 import decode_pb2, decode_pb2_grpc
from serving.convert import FINISH_REASONS, model_info, pool_info


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, decode: DecodeEngine) -> None:
        self.decode = decode

    async def ReserveKV(
        self, request: decode_pb2.ReserveKVRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveKVResponse:
        r = await self.decode.reserve(request)
        return decode_pb2.ReserveKVResponse(
            reservation_id=r.id,
            lease_seconds=r.lease_seconds,
            num_pages=r.page_ids.numel(),
            reserved_pages=r.reserved_pages,
            max_chunk_bytes=self.decode.settings.max_chunk_bytes,
        )

    async def PushKV(
        self, request_iterator: AsyncIterator[decode_pb2.PushKVRequest], context: grpc.aio.ServicerContext
    ) -> decode_pb2.PushKVResponse:
        return await self.decode.receive(request_iterator)

    async def Decode(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        async for event, reservation in self.decode.decode(request.reservation_id):
            response = decode_pb2.DecodeResponse(token_ids=event.token_ids, text=event.text)
            if event.finish_reason is not None:
                response.finish_reason = FINISH_REASONS[event.finish_reason]
                stats = response.stats
                stats.kv_bytes_received = reservation.received
                stats.kv_pages = reservation.page_ids.numel()
                if reservation.committed_at is not None:
                    stats.transfer_seconds = reservation.committed_at - reservation.created
                if event.output is not None:
                    stats.output_tokens = len(event.output.token_ids)
                    stats.decode_seconds = event.output.stats.decode_seconds
            yield response

    async def Abort(
        self, request: decode_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.AbortResponse:
        return decode_pb2.AbortResponse(found=self.decode.abort(request.reservation_id))

    async def Info(
        self, request: decode_pb2.DecodeInfoRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.DecodeInfoResponse:
        engine = self.decode.ready_engine()
        return decode_pb2.DecodeInfoResponse(
            model=model_info(engine),
            pool=pool_info(engine.pool),
            running=engine.scheduler.running_count(),
            reservations=len(self.decode.reservations),
            lease_seconds=self.decode.settings.lease_seconds,
        )
