"""ReserveKV sent while a request's prefill still runs, so the handoff after prefill is the write and
the commit alone.

The prefill engine signals when the request's last chunk starts; the reservation then asks the decode
node for the most pages the kept KV can take (the compression budget's bound, known before scoring)
plus the decode growth. After prefill the pages go into the reservation's first pages and CommitKV
brings their layout; the decode node frees what was not needed. Direct transports only: grpc's
manifest carries a crc32 of the bytes, which exist only after prefill.

Ownership: this object holds the reservation until `take()` hands it to the handoff; `discard()` frees
one that was never taken (the prefill failed or was cancelled, or its first token ended the request).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvferry.kvtransfer.manifest import early_manifest
from kvferry.kvtransfer.selection import DIRECT_TRANSPORTS
from kvferry.prefill_service.decode_reservation import DecodeReservation
from kvferry.prefill_service.handoff_request import HandoffRequest
from kvferry.prefill_service.links import DecodeLink

log = logging.getLogger(__name__)


class EarlyReservation:
    def __init__(self, link: DecodeLink, request: HandoffRequest, max_pages: int) -> None:
        self.link = link
        self.request = request
        self.max_pages = max_pages  # the most pages the kept KV can take
        self._task: asyncio.Task[DecodeReservation | None] | None = None  # None: not started, or handed over

    def start(self) -> None:
        """Send ReserveKV now (the prefill's last chunk is starting); runs on the event loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._reserve())

    async def _reserve(self) -> DecodeReservation | None:
        transport = await self.link.transport(self.request.transport)
        if transport.name not in DIRECT_TRANSPORTS:
            return None
        manifest = early_manifest(self.request.spec, self.max_pages)
        reserve = self.request.reserve_kv(manifest, transport, first_token=None)
        return await DecodeReservation.reserve(self.link, transport, reserve, self.request.deadline)

    async def take(self) -> DecodeReservation | None:
        """The early reservation, handed over: the caller owns it from here (ships into it or aborts
        it). None: reserve after prefill as usual (it was never started, is not for this transport, or
        failed for a reason a fresh try may not meet). A decode node that stayed full for the whole wait
        raises its RESOURCE_EXHAUSTED."""
        if self._task is None:
            return None
        try:
            reservation = await self._task  # a cancel here leaves it to discard()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            log.info("early reservation failed (%s: %s); reserving after prefill", e.code().name, e.details())
            return None
        self._task = None
        return reservation

    async def discard(self) -> None:
        """Free the early reservation unless `take()` handed it over. Safe to call more than once."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()  # a cancelled ReserveKV frees what it reserved on the decode node
            await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            return  # nothing to free here
        reservation = task.result()
        if reservation is not None:
            await reservation.abort()
