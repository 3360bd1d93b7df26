"""PrefillService RPCs: thin wrappers over the pipeline."""

from __future__ import annotations

import grpc

from kvferry.prefill_service.pipeline import PrefillPipeline
from kvferry.serving.convert import model_info, pool_info
from kvferry.v1 import prefill_pb2, prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, pipeline: PrefillPipeline) -> None:
        self.pipeline = pipeline

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        return await self.pipeline.run(request, context.time_remaining())

    async def Info(
        self, request: prefill_pb2.PrefillInfoRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillInfoResponse:
        engine = self.pipeline.engine.ready_engine()
        return prefill_pb2.PrefillInfoResponse(
            model=model_info(engine), pool=pool_info(engine.pool), queue_depth=self.pipeline.in_flight
        )
