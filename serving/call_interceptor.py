"""The outer server interceptor: bearer-token check (UNAUTHENTICATED), the caller's request id bound
for the handler's log lines, and per-method call counts by status code and durations.

It wraps the error interceptor, so it sees the final status code of every call.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvferry.serving import request_context
from kvferry.serving.security import TokenAuth


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "kvferry_rpc_requests_total",
            "gRPC calls handled, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "kvferry_rpc_duration_seconds", "gRPC call duration, by method", ["method"], registry=registry
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method=method, code=code).inc()
        self.seconds.labels(method=method).observe(seconds)


def ended_by_deadline(context: grpc.aio.ServicerContext) -> bool:
    """A handler cancelled because the caller's deadline passed, not because the caller cancelled."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics | None = None, auth: TokenAuth | None = None) -> None:
        self.metrics = metrics
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        denial = self.auth.denial(metadata) if self.auth and self.auth.applies(method) else None
        request_id = request_context.from_metadata(metadata)
        short = method.rsplit("/", 1)[-1] if method.startswith("/grpc.") else method.lstrip("/")
        codecs = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        wrap = _Wrap(self.metrics, short, denial, request_id)
        if handler.unary_unary or handler.unary_stream:  # undecodable bytes: INVALID_ARGUMENT, not UNKNOWN
            codecs["request_deserializer"] = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap.single(handler.unary_unary), **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap.single(handler.stream_unary), **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap.stream(handler.unary_stream), **codecs)
        return grpc.stream_stream_rpc_method_handler(wrap.stream(handler.stream_stream), **codecs)


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf DecodeError
            return _Undecodable(e)

    return parse


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({type(request.error).__name__})"
        )


class _Wrap:
    def __init__(self, metrics: RpcMetrics | None, method: str, denial: str | None, request_id: str | None):
        self.metrics = metrics
        self.method = method
        self.denial = denial
        self.request_id = request_id

    def _done(self, code: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(self.method, code, time.perf_counter() - start)

    def single(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, code = time.perf_counter(), "OK"
            request_context.bind(self.request_id)
            try:
                if self.denial is not None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.denial)
                await _refuse_undecodable(request, context)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "DEADLINE_EXCEEDED" if ended_by_deadline(context) else "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                self._done(code, start)

        return call

    def stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write()
            return self.single(behavior)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, code = time.perf_counter(), "OK"
            request_context.bind(self.request_id)
            try:
                if self.denial is not None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.denial)
                await _refuse_undecodable(request, context)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "DEADLINE_EXCEEDED" if ended_by_deadline(context) else "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                self._done(code, start)

        return call
