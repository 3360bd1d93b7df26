"""Shipping one request's kept pages to a decode node: transport, payload and manifest, ReserveKV (or
the early reservation), send and commit. The reservation it holds is aborted on every other way out.
The lifecycle on both nodes, step by step: docs/kv-handoff.md.

A request on a cached context names the context in its ReserveKV (its manifest then covers the
request's own pages): a decode node that holds it takes the own pages alone; one that does not gets
the context's pages ahead of them (gathered from the prefill pool only then), with the checksum of
everything sent (crc32 in the first PushKV message, sum64 with CommitKV)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from kvferry.kvtransfer import TransferResult, Transport, build_manifest
from kvferry.kvtransfer.device_util import page_checksum
from kvferry.kvtransfer.errors import LeaseLapsedError
from kvferry.kvtransfer.manifest import checksum as crc32
from kvferry.kvtransfer.transport import EarlyFinal, run_to_end
from kvferry.prefill_service.decode_reservation import DecodeReservation
from kvferry.prefill_service.early_reservation import EarlyReservation
from kvferry.prefill_service.handoff_request import HandoffRequest
from kvferry.prefill_service.links import DecodeLink, DecodeLinks
from kvferry.prefill_service.prefill_engine import PrefillOutcome
from kvferry.serving.deadline import Deadline
from kvferry.v1 import decode_pb2, kv_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Shipped:
    handle: kv_pb2.KVHandle
    manifest_bytes: int
    transfer: TransferResult
    seconds: float  # ReserveKV to commit
    transport: str
    handoff_seconds: float  # payload + manifest + ReserveKV to commit
    reserved_early: bool = False  # shipped into a reservation made while the prefill ran
    context_shipped: bool = False  # the decode node lacked the request's cached context: its pages went too


class KVHandoff:
    def __init__(self, links: DecodeLinks) -> None:
        self.links = links

    def early(self, request: HandoffRequest, max_pages: int) -> EarlyReservation:
        """An early reservation for `request` (started when its last prefill chunk starts)."""
        return EarlyReservation(self.links.link(request.decode_address), request, max_pages)

    async def close(self) -> None:
        await self.links.close()

    async def ship(
        self, request: HandoffRequest, outcome: PrefillOutcome, early: EarlyReservation | None = None
    ) -> Shipped:
        assert outcome.layout is not None and outcome.pages is not None
        link = self.links.link(request.decode_address)
        handoff_start = time.perf_counter()
        reservation = None if early is None else await early.take()
        try:  # from here this call owns `reservation`: the `finally` aborts it unless it was committed
            transport = reservation.transport if reservation else await link.transport(request.transport)
            payload = await asyncio.to_thread(transport.payload, outcome.pages)
            # Direct transports: the pages' sum64 is computed while ReserveKV and the write are under way
            # and goes with CommitKV; grpc's crc32 is part of the manifest (its bytes are on the host).
            direct = isinstance(payload, torch.Tensor)
            manifest = await asyncio.to_thread(
                build_manifest, request.spec, outcome.layout, payload, not direct
            )
            if reservation is not None and manifest.num_pages > reservation.num_pages:
                log.warning(
                    "the kept KV takes %d pages, more than the %d reserved early; reserving again",
                    manifest.num_pages, reservation.num_pages,
                )  # fmt: skip
                await reservation.abort()
                reservation = None
            final = EarlyFinal(manifest, outcome.first_token)  # what an early reservation's commit brings
            context = None if outcome.context is None else outcome.context.ref()
            start = time.perf_counter()  # payload and manifest ready
            with _running(run_to_end(page_checksum, payload) if direct else None) as checksum:
                while True:
                    if reservation is None:
                        reserve = request.reserve_kv(manifest, transport, outcome.first_token, context)
                        reservation = await _reserve(link, transport, reserve, request.deadline)
                    try:
                        transport = await _same_process(link, request, transport, reservation)
                        reserved = time.perf_counter()
                        if context is not None and not reservation.reply.context_cached:
                            result = await _send_with_context(reservation, transport, outcome, final)
                        else:
                            result = await reservation.send(transport, payload, checksum, final)
                        log.info(
                            "handoff over %s%s: payload + manifest %.1f ms, ReserveKV %.1f ms, send + commit %.1f ms",
                            transport.name, " (reserved early)" if reservation.early else "",
                            1e3 * (start - handoff_start), 1e3 * (reserved - start),
                            1e3 * (time.perf_counter() - reserved),
                        )  # fmt: skip
                        break
                    except LeaseLapsedError as e:
                        await reservation.abort()
                        if not reservation.early:  # reserved just now and still too late: overloaded host
                            raise
                        # The prefill outlasted the early reservation's lease: the pages wait for a new one.
                        log.warning(
                            "%s: early reservation lapsed (%s); reserving again", request.request_id, e
                        )
                        reservation = None
                    except BaseException as e:
                        if not isinstance(e, asyncio.CancelledError):
                            link.forget()
                        raise
        finally:
            if reservation is not None:
                await reservation.abort()  # nothing once committed
        return Shipped(
            reservation.handle(),
            manifest.ByteSize(),
            result,
            time.perf_counter() - start,
            transport.name,
            time.perf_counter() - handoff_start,
            reservation.early,
            context is not None and not reservation.reply.context_cached,
        )


async def _send_with_context(
    reservation: DecodeReservation, transport: Transport, outcome: PrefillOutcome, final: EarlyFinal
) -> TransferResult:
    """The decode node lacks the request's cached context: send its pages, then the request's own, with
    the checksum of all of them (crc32 of the bytes for grpc, sum64 of the pages otherwise)."""
    assert outcome.context is not None and outcome.pages is not None
    pages = await outcome.context.pages_before(outcome.pages)
    payload = await asyncio.to_thread(transport.payload, pages)
    summed = (
        run_to_end(page_checksum, payload)
        if isinstance(payload, torch.Tensor)
        else asyncio.to_thread(crc32, payload)
    )
    with _running(summed) as checksum:
        return await reservation.send(transport, payload, checksum, final)


async def _reserve(
    link: DecodeLink, transport: Transport, reserve: decode_pb2.ReserveKVRequest, deadline: Deadline
) -> DecodeReservation:
    """ReserveKV after prefill. A node that is gone, restarted or no longer serves the transport makes
    the link be set up again by the next request."""
    try:
        return await DecodeReservation.reserve(link, transport, reserve, deadline)
    except grpc.aio.AioRpcError as e:
        if e.code() in _LINK_FAILURES:
            link.forget()
        raise


async def _same_process(
    link: DecodeLink, request: HandoffRequest, transport: Transport, reservation: DecodeReservation
) -> Transport:
    """`transport`, or the same one set up again when the decode node restarted after its link was set
    up (the reservation names another process); the payload and manifest stay valid."""
    if transport.name == "grpc" or link.serves(reservation.node_id):
        return transport
    return await link.reopen(request.transport, transport.name)


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
