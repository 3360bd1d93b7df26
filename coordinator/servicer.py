"""CoordinatorService RPCs: thin wrappers over generation.generate, with counters. `serve` is the one
counted path of a Generate call, for the gRPC methods and the OpenAI-compatible HTTP front alike.
PutContext goes to one prefill node (where the same context went before, else the least loaded) and
DropContext to every node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from kvferry.coordinator.context_routes import HANDLE_PREFIX, ContextRoutes, put_key
from kvferry.coordinator.generation import generate
from kvferry.coordinator.metrics import CoordinatorMetrics
from kvferry.coordinator.nodes import NodePool
from kvferry.coordinator.stats import CoordinatorStats
from kvferry.engine.errors import NotFoundError, ResourceExhaustedError
from kvferry.serving import request_context
from kvferry.serving.compression_policy import CompressionPolicy
from kvferry.serving.deadline import Deadline
from kvferry.serving.metrics import new_registry
from kvferry.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        nodes: NodePool,
        metrics: CollectorRegistry | None = None,
        max_active_requests: int = 0,
        decode_retries: int = 0,
        policy: CompressionPolicy | None = None,
        routes: ContextRoutes | None = None,
    ) -> None:
        self.nodes = nodes
        self.policy = policy or CompressionPolicy()
        self.routes = routes or ContextRoutes()
        self.stats = CoordinatorStats()
        self.metrics = CoordinatorMetrics(metrics or new_registry())
        self.max_active_requests = max_active_requests
        self.decode_retries = decode_retries

    async def Generate(
        self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        async for response in self.serve(request, context.time_remaining()):
            yield response

    async def GenerateUnary(
        self, request: coordinator_pb2.GenerateUnaryRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.GenerateUnaryResponse:
        reply = coordinator_pb2.GenerateUnaryResponse()
        async for part in self.serve(request, context.time_remaining()):
            reply.text += part.text
            reply.token_ids.extend(part.token_ids)
            if part.HasField("stats"):
                reply.finish_reason = part.finish_reason
                reply.stats.CopyFrom(part.stats)
        return reply

    async def Info(
        self, request: coordinator_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.InfoResponse:
        return await self.nodes.describe()

    async def Stats(
        self, request: coordinator_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.StatsResponse:
        return self.stats.to_proto()

    async def PutContext(
        self, request: common_pb2.PutContextRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.PutContextResponse:
        request_context.bind(request.request_id)
        self.policy.apply(request)  # a put without compression settings gets the operator's
        key = put_key(request)
        route = self.routes.get(key)
        node = await self.nodes.pick_prefill(route.prefill if route else None)
        reply: common_pb2.PutContextResponse = await node.stub.PutContext(
            request, timeout=context.time_remaining(), metadata=request_context.metadata(request.request_id)
        )
        reply.prefill_node = node.address
        decode = route.decode if route and route.prefill == node.address else None
        self.routes.record(key, node.address, decode)
        self.routes.record(HANDLE_PREFIX + reply.handle, node.address, decode)
        return reply

    async def DropContext(
        self, request: common_pb2.DropContextRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.DropContextResponse:
        """Drop the context on every node; NOT_FOUND when none knew it."""
        found = await self.nodes.drop_context(request, context.time_remaining())
        self.routes.forget(HANDLE_PREFIX + request.handle)
        if not found:
            raise NotFoundError(
                f"handle: no node knows context {request.handle!r} (never put or cached, or dropped)",
                field="handle",
            )
        return common_pb2.DropContextResponse(found=True)

    async def serve(
        self, request: Any, timeout: float | None
    ) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        """One Generate call (a GenerateRequest or GenerateUnaryRequest), admitted and counted; `timeout`
        is what is left of the caller's deadline (None: none)."""
        stats, metrics = self.stats, self.metrics
        if self.max_active_requests and stats.requests_active >= self.max_active_requests:
            metrics.ended("rejected")
            raise ResourceExhaustedError(
                f"the coordinator is serving {stats.requests_active} requests, its max_active_requests; "
                "retry later"
            )
        deadline = Deadline(timeout)
        self.policy.apply(request)  # the operator's compression for a request that asks for none
        stats.requests_total += 1
        stats.requests_active += 1
        metrics.active.inc()
        output_tokens = 0
        try:
            async for part in generate(
                self.nodes, request, timeout, self.decode_retries, metrics.retries.inc, self.routes
            ):
                output_tokens += len(part.token_ids)
                if part.HasField("stats"):
                    stats.finished(part.stats, output_tokens)
                    metrics.finished(part.stats, output_tokens)
                yield part
        except (asyncio.CancelledError, GeneratorExit):
            stats.requests_cancelled += 1
            metrics.ended("deadline_exceeded" if deadline.passed() else "cancelled")
            raise
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                stats.requests_cancelled += 1
                deadline_passed = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED or deadline.passed()
                metrics.ended("deadline_exceeded" if deadline_passed else "cancelled")
            else:
                stats.requests_failed += 1
                metrics.ended("failed")
            raise
        except Exception:
            stats.requests_failed += 1
            metrics.ended("failed")
            raise
        finally:
            stats.requests_active -= 1
            metrics.active.dec()
