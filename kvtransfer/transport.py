"""The transport interface both sides use, and the registry of transports by name.

The prefill side calls `send` after ReserveKV succeeded; on the decode side each transport delivers
bytes into the Reservation (kvtransfer.reservation), which verifies them before anything is written to
the pool. `grpc` streams bytes (PushKV); `cuda_ipc` and `nccl` will write pages directly and only
commit over gRPC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.errors import InvalidArgumentError
from protos.kvferry.v1 import decode_pb2


@dataclass
class TransferResult:
    bytes_sent: int  # page bytes, the manifest excluded
    bytes_received: int  # as confirmed by the decode node on commit
    seconds: float  # first byte to commit


class Transport(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def send(
        self,
        decode: Any,  # a DecodeServiceStub on an aio channel
        reservation: decode_pb2.ReserveKVResponse,
        payload: memoryview,
        timeout: float | None = None,
    ) -> TransferResult:
        """Deliver `payload` (the pages in travel order) into `reservation` and commit it."""


TRANSPORTS: dict[str, type[Transport]] = {}


def register(cls: type[Transport]) -> type[Transport]:
    TRANSPORTS[cls.name] = cls
    return cls


def get_transport(name: str, **options: Any) -> Transport:
    from kvtransfer import grpc_transport  # noqa: F401 - registers itself

    if name not in TRANSPORTS:
        raise InvalidArgumentError(
            f"transport: unknown transport {name!r}; available: {sorted(TRANSPORTS)}", field="transport"
        )
    return TRANSPORTS[name](**options)
