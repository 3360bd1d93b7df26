"""The coordinator's OpenAI-compatible HTTP front (FastAPI): /v1/chat/completions and /v1/completions
(whole or streamed as server-sent events), /v1/models, /health and /metrics.

It runs inside the coordinator process, on the loop of its gRPC server, and calls the same counted
path as the gRPC `Generate` (CoordinatorServicer.serve): one admission limit, one set of metrics, and
for a greedy request the same tokens as the gRPC API. Errors are OpenAI error objects, with the HTTP
status of the gRPC code they stand for (400, 401, 404, 429, 503, 504, ...). The bearer token is the
gRPC API's; /health and /metrics need none, as gRPC health and the metrics port need none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from kvferry.coordinator.openai_protocol import (
    FINISH_REASONS,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    kvferry_stats,
)
from kvferry.coordinator.servicer import CoordinatorServicer
from kvferry.engine.errors import (
    KvferryError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
    status_code_name,
)
from kvferry.serving.error_interceptor import field_of, retryable_of
from kvferry.serving.request_context import REQUEST_ID_METADATA_KEY, check_request_id
from kvferry.serving.security import TokenAuth
from kvferry.v1 import coordinator_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (what gRPC calls CANCELLED)
MAX_BODY_BYTES = 64 << 20  # the gRPC API's message cap (serving.server.MAX_MESSAGE_BYTES)
# The gRPC status each failure carries -> the HTTP status an OpenAI client expects (Google's mapping).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
ERROR_TYPES.update({413: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error"})


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: Any = None
) -> JSONResponse:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(error: Exception) -> JSONResponse:
    """A typed kvferry error or a downstream service's status as an OpenAI error response."""
    if isinstance(error, grpc.aio.AioRpcError):
        code, message = error.code().name, error.details() or error.code().name
    else:
        code, message = status_code_name(error) or "INTERNAL", str(error)
    status = HTTP_STATUS.get(code, 500)
    retryable = retryable_of(error)
    headers = None
    if code == "RESOURCE_EXHAUSTED" and retryable is False:
        status = 400  # can never fit, whatever finishes first: the request must change
    elif status in (429, 503):
        headers = {"Retry-After": "1"}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if status == 500:
        log.error("HTTP request failed", exc_info=error)
        message = f"internal error: {type(error).__name__}: {message}"
    return error_response(
        status, message, field_of(error), getattr(error, "openai_code", code.lower()), headers
    )


class ModelNotFoundError(NotFoundError):
    openai_code = "model_not_found"


class ApiKeyError(UnauthenticatedError):
    openai_code = "invalid_api_key"


class ModelName:
    """The one model id this front serves: `served_model_name`, or the prefill nodes' model file or
    folder name (a .gguf's stem), learnt from the first node that answers Info."""

    def __init__(self, servicer: CoordinatorServicer, configured: str | None) -> None:
        self.servicer = servicer
        self.name = configured
        self.max_model_len = 0

    async def get(self) -> str:
        if self.name is None:
            info = await self.servicer.nodes.describe()
            node = next((n for n in info.prefill_nodes if n.reachable), None)
            if node is None:
                raise UnavailableError("no prefill service answers: the model is not known yet")
            source = Path(node.model.source)
            self.name = source.stem if source.suffix == ".gguf" else source.name
            self.max_model_len = node.model.max_model_len
        return self.name

    async def check(self, requested: str) -> str:
        name = await self.get()
        if requested != name:
            raise ModelNotFoundError(
                f"model {requested!r} does not exist; this server serves {name!r}", "model"
            )
        return name


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client hangs up first: then `work` is cancelled (its KV is freed
    as for any cancelled call)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def build_app(
    servicer: CoordinatorServicer,
    registry: CollectorRegistry,
    auth: TokenAuth | None,
    served_model_name: str | None,
    is_serving: Callable[[], bool],
) -> FastAPI:
    app = FastAPI(title="kvferry", docs_url=None, redoc_url=None, max_body_size=MAX_BODY_BYTES)
    model = ModelName(servicer, served_model_name)
    started = int(time.time())

    @app.exception_handler(KvferryError)
    async def typed_error(request: Request, error: KvferryError) -> JSONResponse:
        return response_for(error)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def downstream_error(request: Request, error: grpc.aio.AioRpcError) -> JSONResponse:
        return response_for(error)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        if first.get("type") == "extra_forbidden":
            message = f"{param}: unrecognized request argument"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(400, message, param, "invalid_argument")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), None, None, error.headers)

    def authorize(request: Request) -> None:
        if auth is not None:
            denial = auth.denial([("authorization", request.headers.get("authorization"))])
            if denial is not None:
                raise ApiKeyError(denial)

    def request_id_of(request: Request, body: Any) -> str:
        given = (
            body.request_id
            or request.headers.get(REQUEST_ID_METADATA_KEY)
            or request.headers.get("x-request-id")
        )
        return check_request_id(given) if given else uuid.uuid4().hex

    async def answer(request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        authorize(request)
        name = await model.check(body.model)
        request_id = request_id_of(request, body)
        generate = body.to_generate(request_id)
        shape = ResponseShape(
            "chat" if isinstance(body, ChatCompletionRequest) else "completion", request_id, name
        )
        parts = servicer.serve(generate, body.timeout)
        if body.stream:
            return await stream(request, body, shape, parts, request_id)
        try:
            whole = await unless_disconnected(request, _collect(parts))
        finally:
            await parts.aclose()
        if whole is None:
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        text, finish, stats, tokens = whole
        return JSONResponse(shape.whole(text, finish, stats, tokens), headers={"x-request-id": request_id})

    async def stream(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        shape: ResponseShape,
        parts: AsyncIterator[coordinator_pb2.GenerateResponse],
        request_id: str,
    ) -> Response:
        try:  # the first token (the whole prefill) before the response starts: a failure keeps its status
            first = await unless_disconnected(request, anext(parts))
        except BaseException:
            await parts.aclose()
            raise
        if first is None:
            await parts.aclose()
            return Response(status_code=CLIENT_CLOSED)
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def rest() -> AsyncIterator[coordinator_pb2.GenerateResponse]:
            yield first
            async for part in parts:  # to the end: the counted call ends as finished, not closed early
                yield part

        async def events() -> AsyncIterator[bytes]:
            tokens, first_chunk = 0, True
            try:
                async for part in rest():
                    tokens += len(part.token_ids)
                    extra: dict[str, Any] = {"usage": None} if include_usage else {}
                    if part.HasField("stats"):
                        extra["kvferry"] = kvferry_stats(part.stats)
                    finish = FINISH_REASONS[part.finish_reason]
                    yield _sse(shape.chunk(part.text, finish, first=first_chunk, **extra))
                    first_chunk = False
                    if part.HasField("stats") and include_usage:
                        yield _sse(shape.usage_chunk(part.stats, tokens))
                yield format_sse_event(data_str="[DONE]")
            except Exception as e:  # mid-stream: the status is sent already, so an error event
                yield _sse({"error": _error_body(e)})
                yield format_sse_event(data_str="[DONE]")
            finally:
                await parts.aclose()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "x-request-id": request_id},
            background=BackgroundTask(parts.aclose),  # the stream never started (client gone at once)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await answer(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await answer(request, body)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        name = await model.get()
        card = {"id": name, "object": "model", "created": started, "owned_by": "kvferry", "root": name}
        if model.max_model_len:
            card["max_model_len"] = model.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not is_serving():
            return error_response(503, "not serving (starting or stopping)", code="unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _collect(
    parts: AsyncIterator[coordinator_pb2.GenerateResponse],
) -> tuple[str, str | None, coordinator_pb2.GenerateStats, int]:
    text, tokens, last = [], 0, None
    async for part in parts:  # to the end: the counted call ends as finished, not closed early
        text.append(part.text)
        tokens += len(part.token_ids)
        if part.HasField("stats"):
            last = part
    if last is not None:
        return "".join(text), FINISH_REASONS[last.finish_reason], last.stats, tokens
    raise RuntimeError("the request ended without its final message")  # never: generate ends with stats


def _sse(body: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(body, separators=(",", ":")))


def _error_body(error: Exception) -> dict[str, Any]:
    return json.loads(bytes(response_for(error).body))["error"]
