"""Decode-side reservations: pages set aside for one incoming KV, under a lease.

A reservation lives AWAITING_PAGES -> RECEIVING -> COMMITTED -> DECODING. Until DECODING (a Decode
call is streaming it) it holds a lease: pages that never arrive, or a Decode that never comes, free
it when the lease runs out. Each received chunk and the commit renew the lease.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from kvferry.engine.errors import FailedPreconditionError
from kvferry.kvtransfer.errors import ReservationNotFoundError, TransferIntegrityError
from kvferry.kvtransfer.manifest import checksum
from kvferry.v1 import kv_pb2


class ReservationState(enum.Enum):
    AWAITING_PAGES = "awaiting_pages"
    RECEIVING = "receiving"
    COMMITTED = "committed"
    DECODING = "decoding"


@dataclass
class Reservation:
    request_id: str  # the caller's id, for logs
    manifest: kv_pb2.KVManifest
    page_ids: torch.Tensor  # [N] pool pages to fill, in travel order
    reserved_pages: int  # page_ids plus future decode growth
    lease_seconds: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    transport: str = "grpc"  # grpc: bytes through accept(); a direct one writes the pool itself
    nccl_pair_id: str = ""
    early: bool = False  # ReserveKVRequest.early: page_ids are staged, laid out at the commit
    # A cached context this node did not hold travels ahead of the manifest's pages: its pages (the
    # first of page_ids) and bytes; the sender then gives the checksum of everything it sends.
    context_pages: int = 0
    context_bytes: int = 0
    checksum: int | None = None  # of everything sent, when it is more than the manifest's pages
    state: ReservationState = ReservationState.AWAITING_PAGES
    created: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    received: int = 0
    _crc: int = 0
    _buffer: bytearray | None = None
    committed_at: float | None = None

    def __post_init__(self) -> None:
        self.renew()

    @property
    def travel_pages(self) -> int:
        """Pages the transport brings: a context's that travel ahead, then the manifest's."""
        return self.context_pages + self.manifest.num_pages

    @property
    def travel_bytes(self) -> int:
        return self.context_bytes + self.manifest.byte_count

    def expected_checksum(self) -> int:
        return self.manifest.checksum if self.checksum is None else self.checksum

    def renew(self) -> None:
        self.deadline = time.monotonic() + self.lease_seconds

    def expired(self, now: float) -> bool:
        if self.state == ReservationState.RECEIVING and self.transport != "grpc":
            return False  # a CommitKV call owns it and ends it (with its own timeout)
        return self.state != ReservationState.DECODING and now > self.deadline

    def begin_receive(self, direct: bool = False) -> None:
        """Pages start arriving: as bytes through accept() (grpc), or written into the pool by a direct
        transport (`direct`: no buffer here)."""
        if self.state != ReservationState.AWAITING_PAGES:
            raise FailedPreconditionError(
                f"reservation_id: {self.id} is {self.state.value}, not waiting for pages",
                field="reservation_id",
            )
        if direct != (self.transport != "grpc"):
            how = "CommitKV" if self.transport != "grpc" else "PushKV"
            raise FailedPreconditionError(
                f"reservation_id: {self.id} was reserved for the {self.transport} transport; its pages come "
                f"through {how}",
                field="reservation_id",
            )
        self.state = ReservationState.RECEIVING
        self.renew()
        if not direct:
            self._buffer = bytearray(self.travel_bytes)

    def accept(self, offset: int, data: bytes) -> None:
        """Take the next chunk; bytes must come in order and never beyond what the manifest announced."""
        assert self._buffer is not None
        if offset != self.received:
            raise TransferIntegrityError(
                f"chunk at offset {offset} but {self.received} bytes were received so far"
            )
        end = offset + len(data)
        if end > self.travel_bytes:
            raise TransferIntegrityError(f"got {end} bytes but the manifest announced {self.travel_bytes}")
        self._buffer[offset:end] = data
        self._crc = checksum(data, self._crc)
        self.received = end
        self.renew()

    def verified_payload(self) -> bytearray:
        """All bytes, after checking their count and checksum against the manifest."""
        if self.received != self.travel_bytes:
            raise TransferIntegrityError(
                f"received {self.received} bytes but the manifest announced {self.travel_bytes}"
            )
        if self._crc != self.expected_checksum():
            raise TransferIntegrityError(
                f"checksum mismatch: {self.manifest.checksum_algorithm} of the bytes is {self._crc:#010x}, "
                f"the sender says {self.expected_checksum():#010x}"
            )
        assert self._buffer is not None
        return self._buffer

    def mark_committed(self) -> None:
        self._buffer = None
        self.state = ReservationState.COMMITTED
        self.committed_at = time.monotonic()
        self.renew()

    def begin_decoding(self) -> None:
        """A Decode call streams the request from now on: it owns the reservation (no lease)."""
        if self.state != ReservationState.COMMITTED:
            raise FailedPreconditionError(
                f"reservation_id: {self.id} is {self.state.value}; Decode needs committed pages",
                field="reservation_id",
            )
        self.state = ReservationState.DECODING


R = TypeVar("R", bound=Reservation)


class ReservationTable(Generic[R]):
    """Reservations by id. The service's event loop adds and removes them; its engine thread may look
    them up too (`find`, `snapshot`), hence the lock."""

    def __init__(self) -> None:
        self._by_id: dict[str, R] = {}
        self._lock = threading.Lock()
        self.expired_total = 0  # reservations freed by their lease since start (a metric)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, reservation: R) -> None:
        with self._lock:
            self._by_id[reservation.id] = reservation

    def find(self, reservation_id: str) -> R | None:
        with self._lock:
            return self._by_id.get(reservation_id)

    def get(self, reservation_id: str) -> R:
        reservation = self.find(reservation_id)
        if reservation is None:
            raise ReservationNotFoundError(
                f"reservation_id: no reservation {reservation_id!r} (finished, aborted or lease expired)",
                field="reservation_id",
            )
        return reservation

    def snapshot(self) -> list[R]:
        with self._lock:
            return list(self._by_id.values())

    def pop(self, reservation_id: str) -> R | None:
        with self._lock:
            return self._by_id.pop(reservation_id, None)

    def pop_expired(self, now: float | None = None) -> list[R]:
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [r for r in self._by_id.values() if r.expired(now)]
            for r in gone:
                del self._by_id[r.id]
        self.expired_total += len(gone)
        return gone
