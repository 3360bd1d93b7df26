"""ReserveKV sent while a request's prefill still runs, so the handoff after prefill is the write and
the commit alone.

The prefill engine signals when the request's last chunk starts; the reservation then asks the decode
node for the most pages the kept KV can take (the compression budget's bound, known before scoring)
plus the decode growth. After prefill the pages go into the reservation's first pages and CommitKV
brings their layout; the decode node frees what was not needed. Direct transports only: grpc's
manifest carries a crc32 of the bytes, which exist only after prefill.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc

from kvferry.kvtransfer import ModelSpec, Transport
from kvferry.kvtransfer.manifest import early_manifest
from kvferry.kvtransfer.selection import DIRECT_TRANSPORTS
from kvferry.serving.deadline import Deadline
from kvferry.serving.reservations import abort_reservation
from kvferry.v1 import common_pb2, decode_pb2

if TYPE_CHECKING:
    from kvferry.prefill_service.handoff import KVHandoff

log = logging.getLogger(__name__)
Taken = tuple[Transport, decode_pb2.ReserveKVResponse, float]  # + when its ReserveKV was sent


class EarlyReservation:
    def __init__(
        self,
        handoff: KVHandoff,
        request_id: str,
        address: str,
        prompt: list[int],
        sampling: common_pb2.SamplingParams,
        spec: ModelSpec,
        max_pages: int,
        transport_name: str,
        deadline: Deadline,
    ) -> None:
        self.handoff = handoff
        self.request_id = request_id
        self.address = address
        self.prompt = prompt
        self.sampling = sampling
        self.spec = spec
        self.max_pages = max_pages
        self.transport_name = transport_name
        self.deadline = deadline
        self._task: asyncio.Task[Taken | None] | None = None
        self._used = False

    def start(self) -> None:
        """Send ReserveKV now (the prefill's last chunk is starting); runs on the event loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._reserve())

    async def _reserve(self) -> Taken | None:
        decode = self.handoff.decode_stub(self.address)
        transport = await self.handoff.links.transport(self.address, decode, self.transport_name)
        if transport.name not in DIRECT_TRANSPORTS:
            return None
        request = decode_pb2.ReserveKVRequest(
            request_id=self.request_id,
            manifest=early_manifest(self.spec, self.max_pages),
            sampling=self.sampling,
            prompt_token_ids=self.prompt,
            transport=transport.name,
            early=True,
            **transport.reserve_fields(),
        )
        reservation, sent_at = await self.handoff.reserve(decode, request, self.deadline)
        return transport, reservation, sent_at

    async def take(self) -> Taken | None:
        """The transport and early reservation to ship into; None: reserve after prefill as usual (the
        early one was never started, is not for this transport, or failed for a reason a fresh try may
        not meet). A decode node that stayed full for the whole wait raises its RESOURCE_EXHAUSTED."""
        if self._task is None:
            return None
        try:
            taken = await self._task
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            log.info("early reservation failed (%s: %s); reserving after prefill", e.code().name, e.details())
            return None
        self._used = taken is not None
        return taken

    def give_up(self) -> None:
        """The reservation will not be shipped into (the kept KV outgrew it): `discard` frees it."""
        self._used = False

    async def discard(self) -> None:
        """Free the early reservation unless a handoff used it (the prefill failed or was cancelled, its
        first token ended the request, or the bound was exceeded). Safe to call more than once."""
        task, self._task = self._task, None
        if task is None or self._used:
            return
        if not task.done():
            task.cancel()  # a cancelled ReserveKV frees what it reserved on the decode node
        try:
            taken: Any = await task
        except BaseException:  # cancelled or failed: nothing to free here
            return
        if taken is not None:
            decode = self.handoff.decode_stub(self.address)
            await asyncio.shield(abort_reservation(decode, taken[1].reservation_id))
