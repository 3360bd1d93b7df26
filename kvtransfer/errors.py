"""Why a KV transfer is refused."""

from __future__ import annotations

from kvferry.engine.errors import DataLossError, FailedPreconditionError, NotFoundError, UnavailableError


class ManifestMismatchError(FailedPreconditionError):
    """The manifest describes KV this decode node cannot take: another model, dtype, page size or codec."""


class TransferIntegrityError(DataLossError):
    """The bytes that arrived are not the bytes announced: count, order or checksum differ."""


class ReservationNotFoundError(NotFoundError):
    """No such reservation: never made, already finished or aborted, or its lease expired."""


class LeaseLapsedError(UnavailableError):
    """A direct write would start after the reservation's lease may have run out. The decode node may
    have freed its pages and handed them to another request, so the pages are not written."""
