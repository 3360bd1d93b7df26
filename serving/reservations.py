"""Freeing a decode reservation from another node (prefill after a failed ship, coordinator after a
client left). Best effort: when the call fails the reservation's lease frees it anyway."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from kvferry.v1 import decode_pb2

log = logging.getLogger(__name__)
ABORT_TIMEOUT_SECONDS = 5.0


async def abort_reservation(decode: Any, reservation_id: str, metadata: Any = ()) -> None:
    """`decode` is a DecodeServiceStub on an aio channel."""
    try:
        await decode.Abort(
            decode_pb2.AbortRequest(reservation_id=reservation_id),
            timeout=ABORT_TIMEOUT_SECONDS,
            metadata=metadata,
        )
    except grpc.aio.AioRpcError as e:
        log.warning("could not abort reservation %s: %s", reservation_id, e.details())
