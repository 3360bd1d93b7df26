"""The outer server interceptor: bearer-token check (UNAUTHENTICATED), the caller's request id bound
for the handler's log lines, undecodable request messages refused with INVALID_ARGUMENT (gRPC itself
says UNKNOWN for a unary request and INTERNAL inside a request stream), per-method call counts by
status code and durations, and heap memory given back after a call with a large request
(serving/memory_trim.py).

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

from kvferry.engine.errors import InvalidArgumentError
from kvferry.serving import request_context
from kvferry.serving.memory_trim import LARGE_REQUEST_BYTES, MemoryTrimmer
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
    def __init__(
        self,
        metrics: RpcMetrics | None = None,
        auth: TokenAuth | None = None,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.metrics = metrics
        self.auth = auth
        self.trimmer = trimmer

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
        # undecodable bytes: INVALID_ARGUMENT naming the request, not UNKNOWN / INTERNAL
        codecs = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        streamed = handler.stream_unary is not None or handler.stream_stream is not None
        wrap = _Wrap(self.metrics, short, denial, request_id, streamed, self.trimmer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap.single(handler.unary_unary), **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap.single(handler.stream_unary), **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap.stream(handler.unary_stream), **codecs)
        return grpc.stream_stream_rpc_method_handler(wrap.stream(handler.stream_stream), **codecs)


def _size(request: Any) -> int:
    return request.ByteSize() if hasattr(request, "ByteSize") else 0


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


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose undecodable message raises InvalidArgumentError inside the servicer, which
    frees what the call holds (a PushKV reservation) and answers INVALID_ARGUMENT."""
    index = 0
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgumentError(
                f"request: message {index} of the stream is not a valid message "
                f"({type(request.error).__name__})",
                field="request",
            )
        index += 1
        yield request


class _Wrap:
    def __init__(
        self,
        metrics: RpcMetrics | None,
        method: str,
        denial: str | None,
        request_id: str | None,
        streamed_requests: bool,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.metrics = metrics
        self.method = method
        self.denial = denial
        self.request_id = request_id
        self.streamed_requests = streamed_requests
        self.trimmer = trimmer

    async def _checked(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The request to hand the servicer: a unary one checked now, a stream message by message."""
        if self.streamed_requests:
            return _decoded(request)
        await _refuse_undecodable(request, context)
        return request

    def _done(self, code: str, start: float, request: Any) -> None:
        if self.metrics is not None:
            self.metrics.observe(self.method, code, time.perf_counter() - start)
        if self.trimmer is not None and not self.streamed_requests and _size(request) >= LARGE_REQUEST_BYTES:
            self.trimmer.after_large_request()

    def single(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, code = time.perf_counter(), "OK"
            request_context.bind(self.request_id)
            try:
                if self.denial is not None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.denial)
                request = await self._checked(request, context)
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
                self._done(code, start, request)

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
                request = await self._checked(request, context)
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
                self._done(code, start, request)

        return call
