"""The `grpc` transport: page bytes as a client stream of bounded chunks (DecodeService.PushKV).

Works anywhere (CPU default, cross-host fallback). The decode node commits when the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import torch

from kvferry.decode_service.client import DecodeClient
from kvferry.kvtransfer.errors import TransferIntegrityError
from kvferry.kvtransfer.payload import pages_to_bytes
from kvferry.kvtransfer.transport import Shipment, TransferResult, Transport
from kvferry.v1 import decode_pb2

DEFAULT_CHUNK_BYTES = 1 << 20


class GrpcTransport(Transport):
    name = "grpc"

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes

    def payload(self, pages: torch.Tensor) -> memoryview:
        return pages_to_bytes(pages)

    async def send(self, decode: DecodeClient, shipment: Shipment) -> TransferResult:
        # The manifest's crc32 covers the bytes, unless the payload is more than its pages (a cached
        # context's pages ahead of them): then the first message carries the crc32 of all of them.
        # Each chunk renews the lease.
        if shipment.early is not None:
            raise ValueError("the grpc transport takes no early reservation (its manifest carries the crc32)")
        reservation, payload = shipment.reservation, shipment.payload
        chunk = min(self.chunk_bytes, reservation.max_chunk_bytes or self.chunk_bytes)
        crc = None if shipment.checksum is None else await shipment.checksum
        start = time.perf_counter()
        reply = await decode.push(_chunks(reservation.reservation_id, payload, chunk, crc), shipment.timeout)
        if reply.bytes_received != len(payload):
            raise TransferIntegrityError(
                f"sent {len(payload)} bytes but the decode node committed {reply.bytes_received}"
            )
        return TransferResult(len(payload), reply.bytes_received, time.perf_counter() - start)


async def _chunks(
    reservation_id: str, payload: memoryview, chunk: int, crc: int | None = None
) -> AsyncIterator[decode_pb2.PushKVRequest]:
    if len(payload) == 0:  # still tell the decode node which reservation is complete
        yield decode_pb2.PushKVRequest(reservation_id=reservation_id, offset=0, data=b"", checksum=crc)
        return
    for offset in range(0, len(payload), chunk):
        data = bytes(payload[offset : offset + chunk])
        first = crc if offset == 0 else None
        yield decode_pb2.PushKVRequest(
            reservation_id=reservation_id, offset=offset, data=data, checksum=first
        )
