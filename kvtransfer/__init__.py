"""Moving KV pages from a prefill service to a decode service: the manifest that travels ahead of the
pages, reservations with leases on the decode side, and the transports (kvferry.kvtransfer.transport:
`grpc`, and the direct ones, `cuda_ipc`, `shm` and `nccl`).

The names below load on first use (most need torch).
"""

from __future__ import annotations

from kvferry._lazy import lazy_exports

_MODULES = {
    "kvferry.kvtransfer.errors": [
        "ManifestMismatchError",
        "ReservationNotFoundError",
        "TransferIntegrityError",
    ],
    "kvferry.kvtransfer.manifest": ["ModelSpec", "build_manifest", "check_manifest", "checksum"],
    "kvferry.kvtransfer.payload": ["bytes_to_pages", "pages_to_bytes"],
    "kvferry.kvtransfer.reservation": ["Reservation", "ReservationState", "ReservationTable"],
    "kvferry.kvtransfer.transport": ["TransferResult", "Transport"],
}
__all__ = sorted(name for names in _MODULES.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})
