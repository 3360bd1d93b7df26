"""Moving KV pages from a prefill service to a decode service: the manifest that travels ahead of the
pages, reservations with leases on the decode side, and the transports (`grpc` now; `cuda_ipc` and
`nccl` plug into kvtransfer.transport.Transport)."""

from kvtransfer.errors import ManifestMismatchError, ReservationNotFoundError, TransferIntegrityError
from kvtransfer.manifest import ModelSpec, build_manifest, check_manifest, checksum
from kvtransfer.payload import bytes_to_pages, pages_to_bytes
from kvtransfer.reservation import Reservation, ReservationState, ReservationTable
from kvtransfer.transport import TRANSPORTS, TransferResult, Transport, get_transport

__all__ = [
    "TRANSPORTS",
    "ManifestMismatchError",
    "ModelSpec",
    "Reservation",
    "ReservationNotFoundError",
    "ReservationState",
    "ReservationTable",
    "TransferIntegrityError",
    "TransferResult",
    "Transport",
    "build_manifest",
    "bytes_to_pages",
    "check_manifest",
    "checksum",
    "get_transport",
    "pages_to_bytes",
]
