"""Every call another process makes into a decode node, in one place.

The prefill node reserves pages (`reserve`: ReserveKV, waiting while the node is full for now), sets a
direct link up (`export`: ExportKV, `open_nccl`: OpenNccl), moves pages (`push`: PushKV for grpc,
`commit`: CommitKV for the direct transports) and frees a reservation it will not use (`abort`). The
coordinator streams a request's tokens (`decode`), reads the node's load (`info`), frees the
reservation of a client that went away (`abort`) and drops cached contexts (`drop_context`).

Torch-free: the coordinator imports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from kvferry.serving.deadline import Deadline
from kvferry.serving.error_interceptor import is_retryable
from kvferry.serving.security import ChannelFactory
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = logging.getLogger(__name__)
Metadata = Sequence[tuple[str, str]]
ABORT_TIMEOUT_SECONDS = 5.0
SETUP_TIMEOUT_SECONDS = 30.0  # ExportKV and OpenNccl
RESERVE_RETRY_FIRST_SECONDS = 0.02
RESERVE_RETRY_MAX_SECONDS = 0.1  # a decode step frees pages every ~10 ms on a GPU: poll close behind it


@dataclass(frozen=True)
class Reserved:
    """A ReserveKV answer and when the call that got it was sent (time.monotonic(): the reservation's
    lease runs from no earlier than that, see kvtransfer.transport.write_deadline)."""

    reply: decode_pb2.ReserveKVResponse
    sent_at: float


class DecodeClient:
    """One decode node (one address), through one channel."""

    def __init__(self, address: str, stub: Any, channel: grpc.aio.Channel | None = None) -> None:
        self.address = address
        self.stub = stub  # a DecodeServiceStub (tests may pass an object answering the same calls)
        self._channel = channel

    @classmethod
    def connect(cls, address: str, channels: ChannelFactory) -> DecodeClient:
        """A client on a new channel from `channels` (the service's TLS settings)."""
        channel = channels.aio_channel(address)
        return cls(address, decode_pb2_grpc.DecodeServiceStub(channel), channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    # ---- the prefill node --------------------------------------------------------------------------
    async def reserve(
        self, request: decode_pb2.ReserveKVRequest, deadline: Deadline, wait_seconds: float
    ) -> Reserved:
        """ReserveKV, waiting while the decode pool is full for now (its running requests will free
        pages): backpressure instead of failing a request whose KV is ready. Gives up with
        RESOURCE_EXHAUSTED after `wait_seconds` or at the deadline, at once when it can never fit."""
        give_up = time.monotonic() + wait_seconds
        delays = _backoff_delays()
        logged = False
        while True:
            try:
                sent_at = time.monotonic()
                return Reserved(await self.stub.ReserveKV(request, timeout=deadline.remaining()), sent_at)
            except grpc.aio.AioRpcError as e:
                delay = await anext(delays)
                remaining = deadline.remaining()
                out_of_time = time.monotonic() + delay > give_up or (
                    remaining is not None and remaining < delay
                )
                if not is_retryable(e) or out_of_time:
                    raise
                if not logged:
                    log.info(
                        "decode pool of %s full for %s; waiting for pages (%s)",
                        self.address, request.request_id, e.details(),
                    )  # fmt: skip
                    logged = True
                await asyncio.sleep(delay)

    async def export(self) -> decode_pb2.ExportKVResponse:
        """What the node serves and its pool's export (asked once per decode process)."""
        try:
            return await self.stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=SETUP_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return decode_pb2.ExportKVResponse(transports=["grpc"])  # an older decode node

    async def open_nccl(self, request: decode_pb2.OpenNcclRequest) -> decode_pb2.OpenNcclResponse:
        return await self.stub.OpenNccl(request, timeout=SETUP_TIMEOUT_SECONDS)

    async def push(
        self, chunks: AsyncIterator[decode_pb2.PushKVRequest], timeout: float | None
    ) -> decode_pb2.PushKVResponse:
        """The grpc transport's page bytes; the node commits when the stream ends."""
        return await self.stub.PushKV(chunks, timeout=timeout)

    async def commit(
        self, request: decode_pb2.CommitKVRequest, timeout: float | None
    ) -> decode_pb2.CommitKVResponse:
        """A direct transport's commit (nccl: the node receives the pages during the call)."""
        return await self.stub.CommitKV(request, timeout=timeout)

    # ---- both -----------------------------------------------------------------------------------
    async def abort(self, reservation_id: str, metadata: Metadata = ()) -> None:
        """Free a reservation in any state. Best effort: when the call fails, the reservation's lease
        frees it anyway (a reservation being decoded ends with its Decode stream)."""
        try:
            await self.stub.Abort(
                decode_pb2.AbortRequest(reservation_id=reservation_id),
                timeout=ABORT_TIMEOUT_SECONDS,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as e:
            log.warning("could not abort reservation %s on %s: %s", reservation_id, self.address, e.details())

    # ---- the coordinator ------------------------------------------------------------------------
    def decode(self, reservation_id: str, timeout: float | None, metadata: Metadata = ()) -> Any:
        """The committed request's token stream (an async iterator of DecodeResponse)."""
        return self.stub.Decode(
            decode_pb2.DecodeRequest(reservation_id=reservation_id), timeout=timeout, metadata=metadata
        )

    async def info(self, timeout: float) -> decode_pb2.DecodeInfoResponse:
        return await self.stub.Info(decode_pb2.DecodeInfoRequest(), timeout=timeout)

    async def drop_context(self, handle: str, timeout: float) -> bool:
        """Remove a cached context from the node; whether it held it."""
        reply = await self.stub.DropContext(common_pb2.DropContextRequest(handle=handle), timeout=timeout)
        return reply.found


async def _backoff_delays() -> AsyncIterator[float]:
    delay = RESERVE_RETRY_FIRST_SECONDS
    while True:
        yield delay
        delay = min(delay * 1.5, RESERVE_RETRY_MAX_SECONDS)
