"""The transport interface the prefill side uses.

A Transport is bound to one decode node (prefill_service.links sets direct ones up). The prefill side
turns the gathered pages into the transport's payload (`payload`), builds the manifest from it, reserves
on the decode node, then calls `send` with a `Shipment` (the reservation, the payload and how to send
it), which must not return before the decode node committed. The states of a request's KV on both
nodes around this, and who frees what on each failure: docs/kv-handoff.md.

- `grpc` streams page bytes (PushKV); the decode node verifies their crc32 and writes them.
- `cuda_ipc` and `shm` write the pages into the decode node's mapped pool, then call CommitKV; the
  decode node verifies the pages' sum64 where they are.
- `nccl` sends the pages while CommitKV runs; the decode node receives them into the reserved pages.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from kvferry.decode_service.client import DecodeClient
from kvferry.v1 import decode_pb2, kv_pb2

T = TypeVar("T")

# A direct write (cuda_ipc, shm) must start within this share of the reservation's lease, counted from
# when its ReserveKV was sent: the decode node's lease cannot run out before then. The rest of the lease
# is the margin for the write itself. Both ends read CLOCK_MONOTONIC on the same host.
WRITE_WINDOW = 0.5


def write_deadline(sent_at: float, reservation: decode_pb2.ReserveKVResponse) -> float:
    """The time.monotonic() after which a direct write into `reservation` is refused (LeaseLapsedError);
    `sent_at`: time.monotonic() when the ReserveKV that made it was sent."""
    return sent_at + WRITE_WINDOW * reservation.lease_seconds


@dataclass
class TransferResult:
    bytes_sent: int  # page bytes, the manifest excluded
    bytes_received: int  # as confirmed by the decode node on commit
    seconds: float  # first byte to commit


@dataclass(frozen=True)
class EarlyFinal:
    """What the commit of an early reservation (ReserveKVRequest.early) brings: the manifest of the
    pages sent, which fill the reservation's first pages, and the first token."""

    manifest: kv_pb2.KVManifest
    first_token_id: int


@dataclass(frozen=True)
class Shipment:
    """One request's pages on their way into one reservation."""

    reservation: decode_pb2.ReserveKVResponse
    payload: Any  # what Transport.payload made of the pages
    timeout: float | None = None  # of the calls that move and commit the pages
    # The pages' sum64 still being computed (direct transports), sent with CommitKV when the manifest
    # left it out.
    checksum: Awaitable[int] | None = None
    # The reservation was made early (direct transports only): the pages go to its first pages and the
    # commit carries their manifest and the first token.
    early: EarlyFinal | None = None
    # `write_deadline`: the direct transports raise LeaseLapsedError instead of starting later (cuda_ipc
    # and shm write the decode node's pages themselves; nccl's receive is CommitKV, which would find the
    # reservation gone); grpc ignores it, as each chunk renews the lease.
    write_by: float | None = None


class Transport(ABC):
    name: ClassVar[str]

    def payload(self, pages: torch.Tensor) -> Any:
        """What `send` moves and the manifest describes: the pages themselves by default."""
        return pages.contiguous()

    def reserve_fields(self) -> dict[str, Any]:
        """Extra ReserveKVRequest fields this transport needs (nccl: its pair)."""
        return {}

    @abstractmethod
    async def send(self, decode: DecodeClient, shipment: Shipment) -> TransferResult:
        """Deliver the shipment's payload (the pages in travel order) into its reservation on `decode`
        and commit it; must not return before the decode node committed."""


async def run_to_end(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread; a cancelled caller still waits for it to end before the cancellation
    goes on, so no write into a reservation's pages can outlive the reservation's abort."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
