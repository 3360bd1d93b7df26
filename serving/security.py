"""TLS, mutual TLS and the bearer token of the client-facing API.

Every service takes the same certificate settings (ServerSettings):
- `tls_cert` + `tls_key`: its port serves TLS with this certificate; the same pair is its client
  certificate toward the services it calls (so peers that require mTLS accept it);
- `tls_client_ca`: require a client certificate signed by this CA on its port (mTLS);
- `tls_ca`: verify the services it calls against this CA (TLS on its outgoing channels);
- `tls_server_name`: the name to expect in their certificates when it is not the address's host.
Every service also takes a bearer token (`auth_token` or `auth_token_file`; one per cluster): with it,
every method of its own services and of reflection requires `authorization: Bearer <token>` (the scheme
in any case), and every channel it opens to another service carries the token (`ChannelFactory`), so
the calls between services pass the same check. Health stays open: it says SERVING or not, nothing else.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

AUTH_METADATA_KEY = "authorization"
# Inter-service channels: reconnect quickly to a restarted node instead of backing off up to 2 minutes.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def read_pem(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The bearer token from the setting itself or from a file (stripped); None when neither is set."""
    if token and token_file:
        raise ValueError("auth_token and auth_token_file: set one of them, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"auth_token_file: cannot read {token_file}: {e.strerror or e}") from None
        if not token:
            raise ValueError(f"auth_token_file: {token_file} is empty")
    return token or None


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS (mTLS with `tls_client_ca`) credentials of a service's port; None: plaintext."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if not cert and not key:
        if client_ca:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        return None
    if not (cert and key):
        raise ValueError("tls_cert and tls_key: set both or neither")
    ca = read_pem(client_ca, "tls_client_ca") if client_ca else None
    return grpc.ssl_server_credentials(
        [(read_pem(key, "tls_key"), read_pem(cert, "tls_cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def client_credentials(
    ca: str | Path | bytes | None,
    cert: str | Path | bytes | None = None,
    key: str | Path | bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """Channel credentials verifying servers against `ca` (bytes or a PEM file), presenting cert/key
    when given (mTLS); None: plaintext."""
    if ca is None:
        if cert or key:
            raise ValueError("a client certificate needs a CA to verify the server (tls_ca)")
        return None
    if bool(cert) != bool(key):
        raise ValueError("client certificate and key: set both or neither")

    def pem(value: str | Path | bytes | None, what: str) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        return read_pem(value, what)

    return grpc.ssl_channel_credentials(
        root_certificates=pem(ca, "tls_ca"),
        private_key=pem(key, "tls_key"),
        certificate_chain=pem(cert, "tls_cert"),
    )


@dataclass
class ChannelFactory:
    """Opens the channels a service uses to call other services, with its TLS settings and its bearer
    token (added to every call by an interceptor, so callers need not pass it)."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    token: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Any, options: list[tuple[str, Any]], token: str | None = None
    ) -> ChannelFactory:
        credentials = client_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        return cls(credentials, settings.tls_server_name, tuple(options), token)

    @property
    def secure(self) -> bool:
        return self.credentials is not None

    def _options(self) -> list[tuple[str, Any]]:
        options = [*self.options, *RECONNECT_OPTIONS]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        interceptors = bearer_interceptors(self.token) if self.token else None
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=self._options(), interceptors=interceptors)
        return grpc.aio.secure_channel(
            address, self.credentials, options=self._options(), interceptors=interceptors
        )


class TokenAuth:
    """Checks `authorization: Bearer <token>` on the methods of the protected services. The scheme is
    matched in any case (RFC 7235), the token exactly and in constant time."""

    def __init__(self, token: str, services: list[str]) -> None:
        if not token:
            raise ValueError("auth token: must not be empty")
        self._expected = token.encode()
        self._prefixes = tuple(f"/{name}/" for name in services)

    def applies(self, method: str) -> bool:
        return method.startswith(self._prefixes)

    def denial(self, metadata: Any) -> str | None:
        """Why a call with this invocation metadata is refused; None when it may pass."""
        presented = None
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY:
                presented = value
        if presented is None:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        if isinstance(presented, bytes):
            presented = presented.decode("latin-1")
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer":
            return "authorization: use the Bearer scheme ('authorization: Bearer <token>')"
        if not hmac.compare_digest(token.strip(" ").encode("latin-1", "replace"), self._expected):
            return "invalid bearer token"
        return None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


class _AddsToken:
    """Adds the bearer token to a call's metadata (the base of the four aio client interceptors: grpc.aio
    files an interceptor under one call kind only)."""

    def __init__(self, token: str) -> None:
        self._header = auth_metadata(token)[0]

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    async def _call(self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryUnaryToken(_AddsToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _UnaryStreamToken(_AddsToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _StreamUnaryToken(_AddsToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


class _StreamStreamToken(_AddsToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """aio client interceptors that send `authorization: Bearer <token>` on every call of a channel."""
    return [
        cls(token) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    ]
