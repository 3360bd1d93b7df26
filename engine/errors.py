"""Typed errors raised by the engine; the gRPC services map each class to one status code."""

from __future__ import annotations


class KvferryError(Exception):
    """Base of every error kvferry raises on purpose. `field` names the offending input, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgumentError(KvferryError, ValueError):
    """The caller sent a value that can never work (maps to INVALID_ARGUMENT)."""


class ResourceExhaustedError(KvferryError):
    """Not enough KV pages (or queue room) for the request (maps to RESOURCE_EXHAUSTED).

    `retryable` is False when the request can never fit, whatever else finishes first."""

    def __init__(self, message: str, field: str | None = None, retryable: bool = True) -> None:
        super().__init__(message, field)
        self.retryable = retryable


class ModelLoadError(KvferryError):
    """The model could not be found or loaded (maps to FAILED_PRECONDITION)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's `model_type` has no implementation in the model registry."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise InvalidArgumentError naming `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgumentError(f"{field}: {message}", field=field)
