"""The one exception the clients raise for a failed call."""

from __future__ import annotations

import grpc

FIELD_METADATA_KEY = "kvferry-field"  # set by the services' error interceptor


class KvferryRpcError(Exception):
    """A call ended with a non-OK gRPC status. `code` is the grpc.StatusCode, `details` the server's
    message, `field` the offending request field when the server named one."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> KvferryRpcError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else None) or str(error)
        field = None
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == FIELD_METADATA_KEY:
                field = value
        return cls(code, details, field)
