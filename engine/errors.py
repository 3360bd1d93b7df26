"""kvferry's one error hierarchy: every error it raises on purpose, in the engine and in the services.

Torch-free and import-free, so that the coordinator, the clients and the error interceptor use the same
classes as the engine. Each class maps to one gRPC status code (`STATUS_CODE_NAMES`; the services'
error interceptor is the one place the mapping is applied); `field` names the offending input, when
there is one, and travels with the status as `kvferry-field` metadata.
"""

from __future__ import annotations


class KvferryError(Exception):
    """Base of every error kvferry raises on purpose. `field` names the offending input, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgumentError(KvferryError, ValueError):
    """The caller sent a value that can never work (INVALID_ARGUMENT)."""


class ResourceExhaustedError(KvferryError):
    """Not enough KV pages, or a bounded queue is full (RESOURCE_EXHAUSTED).

    `retryable` is False when the request can never fit, whatever else finishes first."""

    def __init__(self, message: str, field: str | None = None, retryable: bool = True) -> None:
        super().__init__(message, field)
        self.retryable = retryable


class FailedPreconditionError(KvferryError):
    """The call is valid but the system is not in a state to run it (FAILED_PRECONDITION)."""


class ModelLoadError(FailedPreconditionError):
    """The model could not be found or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's `model_type` has no implementation in the model registry."""


class UnavailableError(KvferryError):
    """The service cannot take the call now: model still loading, no reachable node (UNAVAILABLE)."""


class NotFoundError(KvferryError):
    """The call names something that does not exist (any more), e.g. an expired reservation (NOT_FOUND)."""


class DataLossError(KvferryError):
    """Transferred bytes are missing or corrupt (DATA_LOSS)."""


class UnauthenticatedError(KvferryError):
    """The caller did not prove who it is: no or a wrong bearer token (UNAUTHENTICATED)."""


# Most derived first is not needed: the classes above do not overlap except by inheritance, and a
# subclass maps to its base's code.
STATUS_CODE_NAMES: dict[type[KvferryError], str] = {
    InvalidArgumentError: "INVALID_ARGUMENT",
    ResourceExhaustedError: "RESOURCE_EXHAUSTED",
    FailedPreconditionError: "FAILED_PRECONDITION",
    UnavailableError: "UNAVAILABLE",
    NotFoundError: "NOT_FOUND",
    DataLossError: "DATA_LOSS",
    UnauthenticatedError: "UNAUTHENTICATED",
}


def status_code_name(error: BaseException) -> str | None:
    """The gRPC status code name of a typed error (None for anything else)."""
    for cls, name in STATUS_CODE_NAMES.items():
        if isinstance(error, cls):
            return name
    return None


def require(condition: bool, field: str, message: str) -> None:
    """Raise InvalidArgumentError naming `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgumentError(f"{field}: {message}", field=field)
