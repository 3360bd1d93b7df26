"""The coordinator's request id, carried across services and into every log line.

The coordinator sends it as `kvferry-request-id` metadata on each downstream call (and in the
request messages); the call interceptor puts it into a context variable for the handler, and a
logging filter writes it into each record (`[request_id]` in the log format, `-` outside a request).
"""

from __future__ import annotations

import contextvars
import logging
import re

from kvferry.engine.errors import InvalidArgumentError

REQUEST_ID_METADATA_KEY = "kvferry-request-id"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("kvferry_request_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no spaces: safe in metadata and log lines


def check_request_id(request_id: str) -> str:
    """A caller's request id, or INVALID_ARGUMENT (it travels as gRPC metadata and into log lines)."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgumentError(
            f"request_id: at most {MAX_REQUEST_ID_LENGTH} printable ASCII characters without spaces",
            field="request_id",
        )
    return request_id


def metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_METADATA_KEY, request_id),) if request_id else ()


def from_metadata(metadata: object) -> str | None:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def bind(request_id: str | None) -> None:
    """Name the request the current task works on (its log lines carry the id from now on)."""
    if request_id:
        request_id_var.set(request_id)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True
