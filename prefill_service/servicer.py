"""PrefillService RPCs: thin wrappers over the pipeline."""

from __future__ import annotations

import grpc

from kvferry.prefill_service.pipeline import PrefillPipeline
from kvferry.serving.convert import context_cache_info, model_info, pool_info
from kvferry.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc


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
        cache = context_cache_info(
            engine.context_cache_state(),
            put_contexts=len(self.pipeline.puts),
            cache_context_default=self.pipeline.cache_context,
        )
        return prefill_pb2.PrefillInfoResponse(
            model=model_info(engine), pool=pool_info(engine.pool), queue_depth=self.pipeline.in_flight,
            context_cache=cache,
        )  # fmt: skip

    async def PutContext(
        self, request: common_pb2.PutContextRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.PutContextResponse:
        return await self.pipeline.put_context(request)

    async def DropContext(
        self, request: common_pb2.DropContextRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.DropContextResponse:
        return await self.pipeline.drop_context(request)
