"""The one server interceptor: typed errors raised by servicers become gRPC status codes.

Every class of kvferry's one error hierarchy (kvferry.engine.errors) maps to its status code there
(InvalidArgumentError -> INVALID_ARGUMENT, ResourceExhaustedError -> RESOURCE_EXHAUSTED, ...); a status
received from a downstream service is passed on unchanged; anything else is INTERNAL, with its traceback logged. The offending field, when
known, also travels as trailing metadata `kvferry-field`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvferry.engine.errors import status_code_name

log = logging.getLogger(__name__)
FIELD_METADATA_KEY = "kvferry-field"
RETRYABLE_METADATA_KEY = "kvferry-retryable"  # RESOURCE_EXHAUSTED: "false" when it can never succeed


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and details a servicer error becomes (INTERNAL when it is not a typed error)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    name = status_code_name(error)
    if name is not None:
        return grpc.StatusCode[name], str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    code, details = status_of(error)
    if code == grpc.StatusCode.INTERNAL and not isinstance(error, grpc.aio.AioRpcError):
        log.error("%s failed", method, exc_info=error)
    else:
        log.info("%s -> %s: %s", method, code.name, details)
    metadata = []
    field = field_of(error)
    if field:
        metadata.append((FIELD_METADATA_KEY, str(field)))
    retryable = retryable_of(error)
    if retryable is not None:
        metadata.append((RETRYABLE_METADATA_KEY, "true" if retryable else "false"))
    if metadata:
        context.set_trailing_metadata(tuple(metadata))
    await context.abort(code, details)


def _metadata(error: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, value in error.trailing_metadata() or ():
        if k == key:
            return str(value)
    return None


def field_of(error: Exception) -> str | None:
    """The offending field: a typed error's own, or the one a downstream service named."""
    if isinstance(error, grpc.aio.AioRpcError):
        return _metadata(error, FIELD_METADATA_KEY)
    return getattr(error, "field", None)


def retryable_of(error: Exception) -> bool | None:
    if isinstance(error, grpc.aio.AioRpcError):
        value = _metadata(error, RETRYABLE_METADATA_KEY)
        return None if value is None else value == "true"
    value = getattr(error, "retryable", None)
    return value if isinstance(value, bool) else None


def is_retryable(error: grpc.aio.AioRpcError) -> bool:
    """RESOURCE_EXHAUSTED that may succeed later (pages will be freed), as the server marked it."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retryable_of(error) is not False


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        codecs = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_single(handler.unary_unary, method), **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_single(handler.stream_unary, method), **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method), **codecs)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream, method), **codecs)


def _wrap_single(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, method)

    return call


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write()
        return _wrap_single(behavior, method)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, method)

    return call
