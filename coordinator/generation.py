"""One Generate call: prefill on one node (which ships the KV to the chosen decode node), then relay
the decode node's token stream. Cancellation and the deadline travel to both nodes; a stream that
ends early aborts the decode reservation so its pages are freed at once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator.nodes import NodePool
from protos.kvferry.v1 import common_pb2, coordinator_pb2, decode_pb2, prefill_pb2
from serving import request_context
from serving.deadline import Deadline

log = logging.getLogger(__name__)
ABORT_TIMEOUT_SECONDS = 5.0


async def generate(
    nodes: NodePool, request: Any, timeout: float | None
) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
    """`request` is a GenerateRequest or GenerateUnaryRequest; the last response carries the stats."""
    start = time.perf_counter()
    deadline = Deadline(timeout)
    request_id = request_context.check_request_id(request.request_id) or uuid.uuid4().hex
    request_context.bind(request_id)  # every log line of this call, here and downstream, names it
    metadata = request_context.metadata(request_id)
    prefill_node, decode_node = await asyncio.gather(nodes.pick_prefill(), nodes.pick_decode())
    log.debug("prefill on %s, decode on %s", prefill_node.address, decode_node.address)
    prefill_request = _prefill_request(request, request_id, decode_node.address)
    prefilled: prefill_pb2.PrefillResponse = await prefill_node.stub.Prefill(
        prefill_request, timeout=deadline.remaining(), metadata=metadata
    )
    stats = coordinator_pb2.GenerateStats(
        request_id=request_id,
        prefill_node=prefill_node.address,
        prefill=prefilled.stats,
        ttft_seconds=time.perf_counter() - start,
    )
    first = coordinator_pb2.GenerateResponse(token_ids=[prefilled.first_token_id], text=prefilled.first_text)
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
        stream = decode.stub.Decode(
            decode_pb2.DecodeRequest(reservation_id=handle.reservation_id),
            timeout=deadline.remaining(),
            metadata=metadata,
        )
        async for part in stream:
            response = coordinator_pb2.GenerateResponse(token_ids=part.token_ids, text=part.text)
            if part.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                finished = True
                response.finish_reason = part.finish_reason
                stats.decode_node = decode.address
                stats.decode.CopyFrom(part.stats)
                stats.total_seconds = time.perf_counter() - start
                response.stats.CopyFrom(stats)
                log.info(
                    "finished (%s): TTFT %.3f s, %d tokens in %.3f s",
                    common_pb2.FinishReason.Name(part.finish_reason), stats.ttft_seconds,
                    part.stats.output_tokens, stats.total_seconds,
                )  # fmt: skip
            yield response
    finally:
        if not finished:  # cancelled, deadline, or the stream broke: free the pages now
            await asyncio.shield(_abort(decode.stub, handle.reservation_id, metadata))


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
    return out


async def _abort(decode: Any, reservation_id: str, metadata: Any = ()) -> None:
    try:
        await decode.Abort(
            decode_pb2.AbortRequest(reservation_id=reservation_id),
            timeout=ABORT_TIMEOUT_SECONDS,
            metadata=metadata,
        )
    except grpc.aio.AioRpcError as e:  # its lease frees it anyway
        log.warning("could not abort reservation %s: %s", reservation_id, e.details())
