"""Errors the services raise on purpose, beyond the engine's own (engine/errors.py).

They do not derive from the engine's errors so that the coordinator and clients never import the
engine (and torch).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the services' own errors. `field` names the offending input, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnavailableError(ServiceError):
    """The service cannot take the call now: model still loading, no reachable node (UNAVAILABLE)."""


class NotFoundError(ServiceError):
    """The call names something that does not exist (any more), e.g. an expired reservation (NOT_FOUND)."""


class FailedPreconditionError(ServiceError):
    """The call is valid but the system is not in a state to run it (FAILED_PRECONDITION)."""


class DataLossError(ServiceError):
    """Transferred bytes are missing or corrupt (DATA_LOSS)."""


class InvalidRequestError(ServiceError):
    """A request field is wrong before it reaches an engine (INVALID_ARGUMENT)."""


class OverloadedError(ServiceError):
    """A bounded queue is full: the call is refused now and may succeed later (RESOURCE_EXHAUSTED,
    marked retryable)."""

    retryable = True
