"""One Generate call: prefill on one node (which ships the KV to the chosen decode node), then relay
the decode node's token stream. Cancellation and the deadline travel to both nodes; a stream that
ends early aborts the decode reservation so its pages are freed at once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvferry.coordinator.nodes import NodePool
from kvferry.engine.sampling_params import DEFAULT_MAX_NEW_TOKENS
from kvferry.serving import request_context
from kvferry.serving.deadline import Deadline
from kvferry.v1 import common_pb2, coordinator_pb2, prefill_pb2

log = logging.getLogger(__name__)


async def generate(
    nodes: NodePool,
    request: Any,
    timeout: float | None,
    decode_retries: int = 0,
    on_retry: Callable[[], None] | None = None,
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
    max_model_len = 0  # the failed decode node's, for a continuation
    while True:
        current = request if not streamed else _continuation(request, streamed, max_model_len)
        prefill_node, decode_node = await asyncio.gather(nodes.pick_prefill(), nodes.pick_decode(failed))
        log.debug("prefill on %s, decode on %s", prefill_node.address, decode_node.address)
        prefilled: prefill_pb2.PrefillResponse = await prefill_node.stub.Prefill(
            _prefill_request(current, request_id, decode_node.address),
            timeout=deadline.remaining(),
            metadata=metadata,
        )
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
    if request.HasField("question"):
        out.question = request.question
    return out
