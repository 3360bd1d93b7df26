"""Moving KV pages from a prefill service to a decode service: the manifest that travels ahead of the
pages, reservations with leases on the decode side, and the transports (kvtransfer.transport: `grpc`, and the
direct ones, `cuda_ipc`, `shm` and `nccl`)."""

from kvtransfer.errors import ManifestMismatchError, ReservationNotFoundError, TransferIntegrityError
from kvtransfer.manifest import ModelSpec, build_manifest, check_manifest, checksum
from kvtransfer.payload import bytes_to_pages, pages_to_bytes
from kvtransfer.reservation import Reservation, ReservationState, ReservationTable
from kvtransfer.transport import TransferResult, Transport

__all__ = [
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
    "pages_to_bytes",
]
