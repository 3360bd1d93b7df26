"""One Generate call: prefill on one node (which ships the KV to the chosen decode node), then relay
the decode node's token stream. Cancellation and the deadline travel to both nodes; a stream that
ends early aborts the decode reservation so its pages are freed at once. A request on a cached
context goes to the nodes that served its context last (coordinator/context_routes.py); one naming a
PutContext handle that its prefill node does not know tries the other prefill nodes before NOT_FOUND."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvferry.coordinator.context_routes import ContextRoutes, request_key
from kvferry.coordinator.nodes import Node, NodePool
from kvferry.engine.sampling_params import DEFAULT_MAX_NEW_TOKENS
from kvferry.serving import request_context
from kvferry.serving.deadline import Deadline
from kvferry.serving.error_interceptor import FIELD_METADATA_KEY
from kvferry.v1 import common_pb2, coordinator_pb2, prefill_pb2

log = logging.getLogger(__name__)


async def generate(
    nodes: NodePool,
    request: Any,
    timeout: float | None,
    decode_retries: int = 0,
    on_retry: Callable[[], None] | None = None,
    routes: ContextRoutes | None = None,
) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
    """`request` is a GenerateRequest or GenerateUnaryRequest; the last response carries the stats.

    When the decode node fails mid-stream (UNAVAILABLE) and `decode_retries` allow, the request runs
    again with the prompt plus every token already streamed, on another decode node, for the tokens
    still due: the client sees one uninterrupted answer. Only token-id prompts can be continued (the
    coordinator has no tokenizer)."""
    start = time.perf_counter()
    deadline = Deadline(timeout)
    request_id = request_context.check_request_id(request.request_id) or uuid.uuid4().hex
    request_context.bind(request_id)  # every log line of this call, here and downstream, names it
    metadata = request_context.metadata(request_id)
    streamed: list[int] = []  # tokens already sent to the client
    failed: set[str] = set()  # decode nodes that broke during this request
    stats: coordinator_pb2.GenerateStats | None = None
    routes = routes if routes is not None else ContextRoutes()
    max_model_len = 0  # the failed decode node's, for a continuation
    while True:
        current = request if not streamed else _continuation(request, streamed, max_model_len)
        prefill_ranked, decode_ranked = await asyncio.gather(
            nodes.prefill_by_load(), nodes.decode_by_load(failed)
        )
        caching = any(info.context_cache.cache_context_default for _, info in prefill_ranked)
        key = request_key(current, caching)
        route = routes.get(key)
        prefill_node = nodes.preferred_prefill(prefill_ranked, route.prefill if route else None)
        decode_node = nodes.preferred_decode(decode_ranked, route.decode if route else None)
        log.debug("prefill on %s, decode on %s", prefill_node.address, decode_node.address)
        prefill_request = _prefill_request(current, request_id, decode_node.address)
        others = [n for n, _ in prefill_ranked if n is not prefill_node]
        prefill_node, prefilled = await _prefill(
            prefill_node, others, prefill_request, deadline, metadata, handle=current.context.handle
        )
        routes.record(key, prefill_node.address, prefilled.kv_handle.decode_address or None)
        if stats is None:
            stats = coordinator_pb2.GenerateStats(
                request_id=request_id,
                prefill_node=prefill_node.address,
                prefill=prefilled.stats,
                ttft_seconds=time.perf_counter() - start,
            )
        first = coordinator_pb2.GenerateResponse(
            token_ids=[prefilled.first_token_id], text=prefilled.first_text
        )
        if prefilled.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            first.finish_reason = prefilled.finish_reason
            stats.total_seconds = time.perf_counter() - start
            first.stats.CopyFrom(stats)
            yield first
            return
        handle = prefilled.kv_handle
        decode = nodes.decode_node(handle.decode_address)
        finished = False
        try:
            yield first
            streamed.append(prefilled.first_token_id)
            stream = decode.decode(handle.reservation_id, deadline.remaining(), metadata)
            async for part in stream:
                response = coordinator_pb2.GenerateResponse(token_ids=part.token_ids, text=part.text)
                if part.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finished = True
                    response.finish_reason = part.finish_reason
                    stats.decode_node = decode.address
                    stats.decode.CopyFrom(part.stats)
                    stats.decode.output_tokens = len(streamed) + len(part.token_ids)
                    stats.total_seconds = time.perf_counter() - start
                    response.stats.CopyFrom(stats)
                    log.info(
                        "finished (%s): TTFT %.3f s, %d tokens in %.3f s",
                        common_pb2.FinishReason.Name(part.finish_reason), stats.ttft_seconds,
                        stats.decode.output_tokens, stats.total_seconds,
                    )  # fmt: skip
                yield response
                streamed.extend(part.token_ids)
            return
        except grpc.aio.AioRpcError as e:
            max_model_len = nodes.max_model_len.get(decode.address, 0)
            if not _may_continue(e, request, streamed, len(failed), decode_retries, max_model_len):
                raise
            failed.add(decode.address)
            log.warning(
                "decode node %s failed after %d tokens (%s); continuing on another decode node",
                decode.address, len(streamed), e.code().name,
            )  # fmt: skip
            if on_retry is not None:
                on_retry()
        finally:
            if not finished:  # cancelled, deadline, or the stream broke: free the pages now
                await asyncio.shield(decode.abort(handle.reservation_id, metadata))


async def _prefill(
    node: Node,
    others: list[Node],
    request: prefill_pb2.PrefillRequest,
    deadline: Deadline,
    metadata: Any,
    handle: str,
) -> tuple[Node, prefill_pb2.PrefillResponse]:
    """Prefill on `node`; a PutContext handle it does not know is tried on the `others` in turn (the
    coordinator forgot where it was put: a restart, or its route was pushed out)."""
    candidates = [node, *others] if handle else [node]
    for i, candidate in enumerate(candidates):
        try:
            reply = await candidate.stub.Prefill(request, timeout=deadline.remaining(), metadata=metadata)
            return candidate, reply
        except grpc.aio.AioRpcError as e:
            if i == len(candidates) - 1 or not _unknown_handle(e):
                raise
            log.info(
                "context handle %s is not on %s; trying another prefill node", handle[:12], candidate.address
            )
    raise AssertionError("unreachable")


def _unknown_handle(error: grpc.aio.AioRpcError) -> bool:
    field = dict(error.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
    return error.code() == grpc.StatusCode.NOT_FOUND and field == "context.handle"


def _remaining_tokens(request: Any, streamed: list[int], max_model_len: int) -> int:
    """Tokens still due to a token-id request: its max_new_tokens, or when it set none the engine's
    default as the decode node applied it (capped by the room its max_model_len left)."""
    if request.sampling.HasField("max_new_tokens"):
        wanted = request.sampling.max_new_tokens
    else:
        room = max_model_len - len(request.prompt_token_ids.ids)
        wanted = min(DEFAULT_MAX_NEW_TOKENS, room) if max_model_len else DEFAULT_MAX_NEW_TOKENS
    return wanted - len(streamed)


def _may_continue(
    error: grpc.aio.AioRpcError,
    request: Any,
    streamed: list[int],
    retried: int,
    retries: int,
    max_model_len: int,
) -> bool:
    return (
        error.code() == grpc.StatusCode.UNAVAILABLE
        and retried < retries
        and request.WhichOneof("input") == "prompt_token_ids"
        and not request.HasField("question")  # its tokens follow the prompt's: no place for streamed ones
        and bool(streamed)
        and _remaining_tokens(request, streamed, max_model_len) >= 1
    )


def _continuation(request: Any, streamed: list[int], max_model_len: int) -> Any:
    """The same request with the streamed tokens appended to its prompt, for the tokens still due."""
    out = type(request)()
    out.CopyFrom(request)
    out.prompt_token_ids.ids.extend(streamed)
    out.sampling.max_new_tokens = _remaining_tokens(request, streamed, max_model_len)
    return out


def _prefill_request(request: Any, request_id: str, decode_address: str) -> prefill_pb2.PrefillRequest:
    out = prefill_pb2.PrefillRequest(
        request_id=request_id, sampling=request.sampling, decode_address=decode_address
    )
    which = request.WhichOneof("input")
    if which == "prompt":
        out.prompt = request.prompt
    elif which == "messages":
        out.messages.CopyFrom(request.messages)
    elif which == "prompt_token_ids":
        out.prompt_token_ids.CopyFrom(request.prompt_token_ids)
    if request.HasField("compression"):
        out.compression.CopyFrom(request.compression)
    if request.HasField("cache_context"):
        out.cache_context = request.cache_context
    if request.HasField("context"):
        out.context.CopyFrom(request.context)
    if request.HasField("question"):
        out.question = request.question
    return out
