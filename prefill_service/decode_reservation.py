"""A reservation on a decode node as the prefill node holds it: the one object that frees it.

    reserve() ─▶ RESERVED ─send()─▶ COMMITTED   the pages are in and the decode node committed them;
                    │                            from here the decode node owns them (its Decode
                    │                            stream, or its lease, frees them)
                    └─abort()──▶ ABORTED          every other end: a failure, a cancel, the deadline,
                                                  an early reservation not used, outgrown or lapsed

`abort` is idempotent, does nothing once committed, and is shielded: a cancelled caller still frees
the decode pages at once. When the Abort call itself fails, the reservation's lease frees it. Whoever
holds the object frees it: the EarlyReservation until `take()` hands it over, then KVHandoff.ship,
whose `finally` aborts whatever it holds. The full lifecycle of a request's KV: docs/kv-handoff.md.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable
from typing import Any

from kvferry.decode_service.client import Reserved
from kvferry.kvtransfer.transport import EarlyFinal, Shipment, TransferResult, Transport, write_deadline
from kvferry.prefill_service.links import DecodeLink
from kvferry.serving.deadline import Deadline
from kvferry.v1 import decode_pb2, kv_pb2


class HeldState(enum.Enum):
    RESERVED = "reserved"
    COMMITTED = "committed"
    ABORTED = "aborted"


class DecodeReservation:
    def __init__(
        self, link: DecodeLink, transport: Transport, reserved: Reserved, early: bool, deadline: Deadline
    ) -> None:
        self.link = link
        self.transport = transport  # the one it was made for (its reserve_fields went with ReserveKV)
        self.reply = reserved.reply
        self.sent_at = reserved.sent_at  # its lease runs from no earlier than this (time.monotonic())
        self.early = early  # made while the prefill ran, for the most pages the kept KV can take
        self.deadline = deadline  # the request's
        self.state = HeldState.RESERVED

    @classmethod
    async def reserve(
        cls, link: DecodeLink, transport: Transport, request: decode_pb2.ReserveKVRequest, deadline: Deadline
    ) -> DecodeReservation:
        """ReserveKV on the link's node, waiting while it is full for now (`reserve_wait_seconds`).
        Nothing awaits between the answer and the return, so a cancelled caller cannot lose it."""
        reserved = await link.client.reserve(request, deadline, link.reserve_wait_seconds)
        return cls(link, transport, reserved, request.early, deadline)

    @property
    def id(self) -> str:
        return self.reply.reservation_id

    @property
    def num_pages(self) -> int:
        """Pages to write (an early reservation: the most the kept KV can take)."""
        return self.reply.num_pages

    @property
    def node_id(self) -> str:
        """The decode process that made it."""
        return self.reply.node_id

    def handle(self) -> kv_pb2.KVHandle:
        """What the coordinator streams the request's tokens with."""
        return kv_pb2.KVHandle(decode_address=self.link.address, reservation_id=self.id)

    async def send(
        self, transport: Transport, payload: Any, checksum: Awaitable[int] | None, final: EarlyFinal
    ) -> TransferResult:
        """Move the pages over `transport` (the one reserved for, or the same one set up again after the
        node restarted) and commit them: COMMITTED. `final` (the manifest of the pages and the first
        token) goes with the commit of an early reservation. On failure it stays RESERVED: its holder
        aborts it."""
        assert self.state is HeldState.RESERVED, self.state
        shipment = Shipment(
            self.reply, payload, self.deadline.remaining(), checksum, final if self.early else None,
            write_deadline(self.sent_at, self.reply),
        )  # fmt: skip
        result = await transport.send(self.link.client, shipment)
        self.state = HeldState.COMMITTED
        return result

    async def abort(self) -> None:
        """Free the decode pages unless they were committed (idempotent)."""
        if self.state is not HeldState.RESERVED:
            return
        self.state = HeldState.ABORTED
        await asyncio.shield(self.link.client.abort(self.id))
