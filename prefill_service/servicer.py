"""PrefillService RPCs: thin wrappers over the pipeline."""

from __future__ import annotations

import grpc

from prefill_service.pipeline import PrefillPipeline
from protos.kvferry.v1 import prefill_pb2, prefill_pb2_grpc
from serving.convert import model_info, pool_info


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
