"""Shipping one request's kept pages to a decode service: transport, manifest, ReserveKV, send, and
freeing the reservation when anything after ReserveKV fails or is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from kvferry.engine.errors import UnavailableError
from kvferry.kvtransfer import ModelSpec, TransferResult, Transport, build_manifest
from kvferry.kvtransfer.device_util import page_checksum
from kvferry.kvtransfer.errors import LeaseLapsedError
from kvferry.kvtransfer.transport import EarlyFinal, run_to_end, write_deadline
from kvferry.prefill_service.early_reservation import EarlyReservation
from kvferry.prefill_service.links import DecodeLinks
from kvferry.prefill_service.prefill_engine import PrefillOutcome
from kvferry.serving.deadline import Deadline
from kvferry.serving.error_interceptor import is_retryable
from kvferry.serving.reservations import abort_reservation
from kvferry.serving.server import CHANNEL_OPTIONS
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
RESERVE_RETRY_FIRST_SECONDS = 0.02
RESERVE_RETRY_MAX_SECONDS = 0.1  # a decode step frees pages every ~10 ms on a GPU: poll close behind it


@dataclass
class Shipped:
    handle: kv_pb2.KVHandle
    manifest_bytes: int
    transfer: TransferResult
    seconds: float  # ReserveKV to commit
    transport: str
    handoff_seconds: float  # payload + manifest + ReserveKV to commit
    reserved_early: bool = False  # shipped into a reservation made while the prefill ran


class KVHandoff:
    def __init__(self, links: DecodeLinks, reserve_wait_seconds: float = 30.0) -> None:
        self.links = links
        self.reserve_wait_seconds = reserve_wait_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}

    channels: Any = None  # serving.security.ChannelFactory, set by the server: outgoing TLS settings

    def decode_stub(self, address: str) -> decode_pb2_grpc.DecodeServiceStub:
        if address not in self._channels:
            if self.channels is not None:
                self._channels[address] = self.channels.aio_channel(address)
            else:
                self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return decode_pb2_grpc.DecodeServiceStub(self._channels[address])

    async def reserve(
        self,
        decode: decode_pb2_grpc.DecodeServiceStub,
        request: decode_pb2.ReserveKVRequest,
        deadline: Deadline,
    ) -> tuple[decode_pb2.ReserveKVResponse, float]:
        """ReserveKV, waiting while the decode pool is full for now (its running requests will free
        pages): backpressure instead of failing a request whose KV is ready. Gives up with
        RESOURCE_EXHAUSTED after `reserve_wait_seconds` or at the deadline, at once when it can never fit.
        Returns the reservation and time.monotonic() when the ReserveKV that made it was sent (its
        lease runs from no earlier than that: `write_deadline`)."""
        give_up = time.monotonic() + self.reserve_wait_seconds
        delays = _backoff_delays()
        logged = False
        while True:
            try:
                sent_at = time.monotonic()
                return await decode.ReserveKV(request, timeout=deadline.remaining()), sent_at
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
                        "decode pool full for %s; waiting for pages (%s)", request.request_id, e.details()
                    )
                    logged = True
                await asyncio.sleep(delay)

    async def close(self) -> None:
        self.links.close()
        for channel in self._channels.values():
            await channel.close()

    async def ship(
        self,
        request_id: str,
        address: str,
        outcome: PrefillOutcome,
        prompt: list[int],
        sampling: common_pb2.SamplingParams,
        spec: ModelSpec,
        transport_name: str,
        deadline: Deadline,
        early: EarlyReservation | None = None,
    ) -> Shipped:
        assert outcome.layout is not None and outcome.pages is not None
        decode = self.decode_stub(address)
        handoff_start = time.perf_counter()
        taken = None if early is None else await early.take()
        if taken is not None:
            transport = taken[0]
        else:
            transport = await self.links.transport(address, decode, transport_name)
        payload = await asyncio.to_thread(transport.payload, outcome.pages)
        # Direct transports: the pages' sum64 is computed while ReserveKV and the write are under way
        # and goes with CommitKV; grpc's crc32 is part of the manifest (its bytes are on the host).
        direct = isinstance(payload, torch.Tensor)
        manifest = await asyncio.to_thread(build_manifest, spec, outcome.layout, payload, not direct)
        if taken is not None and manifest.num_pages > taken[1].num_pages:
            log.warning(
                "the kept KV takes %d pages, more than the %d reserved early; reserving again",
                manifest.num_pages, taken[1].num_pages,
            )  # fmt: skip
            assert early is not None
            early.give_up()
            await early.discard()
            taken = None
        start = time.perf_counter()  # payload and manifest ready

        async def reserve_now() -> tuple[decode_pb2.ReserveKVResponse, float]:
            reserve = decode_pb2.ReserveKVRequest(
                request_id=request_id,
                manifest=manifest,
                sampling=sampling,
                prompt_token_ids=prompt,
                first_token_id=outcome.first_token,
                transport=transport.name,
                **transport.reserve_fields(),
            )
            try:
                return await self.reserve(decode, reserve, deadline)
            except grpc.aio.AioRpcError as e:
                if e.code() in _LINK_FAILURES:
                    self.links.forget(address)
                raise

        with _running(run_to_end(page_checksum, payload) if direct else None) as checksum:
            while True:
                reservation, sent_at = taken[1:] if taken is not None else await reserve_now()
                try:
                    if transport is not self.links.grpc and not self.links.matches(
                        address, reservation.node_id
                    ):
                        transport = await self._relink(address, decode, transport_name, transport.name)
                    reserved = time.perf_counter()
                    final = None if taken is None else EarlyFinal(manifest, outcome.first_token)
                    result = await transport.send(
                        decode, reservation, payload, timeout=deadline.remaining(), checksum=checksum,
                        early=final, write_by=write_deadline(sent_at, reservation),
                    )  # fmt: skip
                    log.info(
                        "handoff over %s%s: payload + manifest %.1f ms, ReserveKV %.1f ms, send + commit %.1f ms",
                        transport.name, " (reserved early)" if taken else "", 1e3 * (start - handoff_start),
                        1e3 * (reserved - start), 1e3 * (time.perf_counter() - reserved),
                    )  # fmt: skip
                    break
                except LeaseLapsedError as e:
                    await asyncio.shield(abort_reservation(decode, reservation.reservation_id))
                    if taken is None:  # reserved just now and still too late: the host is overloaded
                        raise
                    # The prefill outlasted the early reservation's lease: the pages wait for a new one.
                    log.warning("%s: early reservation lapsed (%s); reserving again", request_id, e)
                    taken = None
                except BaseException as e:
                    if not isinstance(e, asyncio.CancelledError):
                        self.links.forget(address)
                    await asyncio.shield(abort_reservation(decode, reservation.reservation_id))
                    raise
        return Shipped(
            kv_pb2.KVHandle(decode_address=address, reservation_id=reservation.reservation_id),
            manifest.ByteSize(),
            result,
            time.perf_counter() - start,
            transport.name,
            time.perf_counter() - handoff_start,
            taken is not None,
        )

    async def _relink(self, address: str, decode: Any, requested: str, name: str) -> Transport:
        """The decode node restarted after its link was set up (its ReserveKV reply names another
        process): set the link up again; the payload and manifest stay valid for the same transport."""
        log.info("decode node %s restarted; setting its %s link up again", address, name)
        self.links.forget(address)
        transport = await self.links.transport(address, decode, requested)
        if transport.name != name:
            raise UnavailableError(
                f"decode node {address} restarted and now takes {transport.name}, not {name}"
            )
        return transport


_LINK_FAILURES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,  # e.g. a transport the (restarted) node no longer serves
    grpc.StatusCode.NOT_FOUND,
)


@contextlib.contextmanager
def _running(work: Coroutine[Any, Any, T] | None) -> Iterator[asyncio.Future[T] | None]:
    """`work` started as a task for the block's duration; cancelled if the block ends before it does
    (its thread, if any, still runs to its end: run_to_end)."""
    task = None if work is None else asyncio.ensure_future(work)
    try:
        yield task
    finally:
        if task is not None and not task.done():
            task.cancel()


async def _backoff_delays() -> AsyncIterator[float]:
    delay = RESERVE_RETRY_FIRST_SECONDS
    while True:
        yield delay
        delay = min(delay * 1.5, RESERVE_RETRY_MAX_SECONDS)
