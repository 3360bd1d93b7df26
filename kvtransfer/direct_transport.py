"""The direct transports, bound to one decode node: the pages go device to device (or shared memory to
shared memory), and gRPC carries only the reservation and the commit.

`DirectWriteTransport` (cuda_ipc, shm): write the pages into the decode node's mapped pool at the
reservation's page runs, then CommitKV. `NcclTransport`: CommitKV and the send run together (the decode
node receives during the call); one transfer at a time per pair, so both ends see them in one order.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import torch

from kvferry.decode_service.client import DecodeClient
from kvferry.kvtransfer.device_util import first_pages_of_runs
from kvferry.kvtransfer.errors import LeaseLapsedError, TransferIntegrityError
from kvferry.kvtransfer.nccl import NcclPair
from kvferry.kvtransfer.transport import Shipment, TransferResult, Transport, run_to_end
from kvferry.v1 import decode_pb2


class MappedPool(Protocol):
    """A decode pool mapped into this process (cuda_ipc.MappedPool, shm.MappedShmPool)."""

    node_id: str

    def write(
        self, pages: torch.Tensor, page_ids: torch.Tensor | None = None, runs: list[int] | None = None
    ) -> float: ...


class DirectWriteTransport(Transport):
    def __init__(self, name: str, mapped: MappedPool) -> None:
        self.name = name  # type: ignore[misc] - one class serves cuda_ipc and shm
        self.mapped = mapped

    async def send(self, decode: DecodeClient, shipment: Shipment) -> TransferResult:
        payload: torch.Tensor = shipment.payload
        runs = list(shipment.reservation.page_runs)
        pages = sum(runs[1::2])
        if shipment.early is not None and payload.shape[0] <= pages:  # an early reservation: its first pages
            runs, pages = first_pages_of_runs(runs, payload.shape[0]), payload.shape[0]
        if pages != payload.shape[0]:
            raise TransferIntegrityError(
                f"the decode node gave {pages} pages to write, the manifest has {payload.shape[0]}"
            )
        start = time.perf_counter()

        def write() -> float:  # in a worker thread, which may start late on a busy host
            _check_window(shipment)
            return self.mapped.write(payload, None, runs)  # runs: no page-id upload

        await run_to_end(write)
        checksum = (
            None if shipment.checksum is None else await shipment.checksum
        )  # computed while the write ran
        return await _commit(decode, shipment, checksum, start)


class NcclTransport(Transport):
    name = "nccl"

    def __init__(self, pair: NcclPair, lock: asyncio.Lock) -> None:
        self.pair = pair
        self.lock = lock  # one transfer at a time on the pair

    def reserve_fields(self) -> dict[str, Any]:
        return {"nccl_pair_id": self.pair.pair_id}

    async def send(self, decode: DecodeClient, shipment: Shipment) -> TransferResult:
        # CommitKV carries the checksum: ready before the send
        checksum = None if shipment.checksum is None else await shipment.checksum
        async with self.lock:
            # The decode node receives inside CommitKV, which owns the reservation from its start; a
            # reservation that may have lapsed would answer NOT_FOUND and leave this send unmatched.
            _check_window(shipment)
            start = time.perf_counter()
            commit = asyncio.ensure_future(_commit(decode, shipment, checksum, start))
            try:
                await run_to_end(self.pair.send_pages, shipment.payload, shipment.timeout)
            except BaseException:
                commit.cancel()
                raise
            return await commit


def _check_window(shipment: Shipment) -> None:
    if shipment.write_by is not None and time.monotonic() > shipment.write_by:
        reservation = shipment.reservation
        raise LeaseLapsedError(
            f"reservation {reservation.reservation_id}: its {reservation.lease_seconds:g} s lease may run "
            "out before the pages are in (the decode node may have freed them); nothing sent"
        )


async def _commit(
    decode: DecodeClient, shipment: Shipment, checksum: int | None, start: float
) -> TransferResult:
    request = decode_pb2.CommitKVRequest(
        reservation_id=shipment.reservation.reservation_id, checksum=checksum
    )
    if shipment.early is not None:
        request.manifest.CopyFrom(shipment.early.manifest)
        request.first_token_id = shipment.early.first_token_id
    reply = await decode.commit(request, shipment.timeout)
    payload: torch.Tensor = shipment.payload
    sent = payload.numel() * payload.element_size()
    if reply.bytes_received != sent:
        raise TransferIntegrityError(
            f"sent {sent} bytes but the decode node committed {reply.bytes_received}"
        )
    return TransferResult(sent, reply.bytes_received, time.perf_counter() - start)
