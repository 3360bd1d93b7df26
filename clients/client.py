"""The blocking client of the coordinator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from kvferry.clients.errors import KvferryRpcError
from kvferry.clients.requests import (
    GENERATE,
    GENERATE_UNARY,
    Context,
    ContextHandle,
    Messages,
    build_put_context,
    build_request,
)
from kvferry.clients.results import GenerateResult, StreamChunk
from kvferry.serving.security import auth_metadata, client_credentials
from kvferry.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def channel_options(tls_server_name: str | None = None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = list(CHANNEL_OPTIONS)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


class Client:
    """Sampling keywords: max_new_tokens, temperature (0 = greedy), top_p, top_k, seed, stop,
    stop_token_ids, ignore_eos. Compression: `compression` (a method name or a dict of
    CompressionParams fields) and/or `retention` (fraction of the prompt KV kept, or "auto": chosen per
    request from the context, see `quality_target`); neither: the services' compression policy.
    `question` is appended to the prompt or last user message and always kept by compression. Cached
    contexts: `context` (text or token ids in front of the prompt, or a ContextHandle from
    `put_context`) and `cache_context` (compress the context, or a chat's turns before its last user
    turn, on its own and reuse it across requests; None: the cluster's default). Failures raise
    KvferryRpcError with the gRPC status code.

    Security: `token` is the coordinator's bearer token; `tls_ca` (a PEM file path or bytes) turns on
    TLS and verifies the coordinator's certificate; `tls_cert`/`tls_key` present a client certificate
    (mutual TLS); `tls_server_name` overrides the name expected in the certificate."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = auth_metadata(token) or None
        credentials = client_credentials(tls_ca, tls_cert, tls_key)
        options = channel_options(tls_server_name)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Messages | None = None,
        compression: str | Mapping[str, Any] | None = None,
        retention: float | str | None = None,
        question: str | None = None,
        context: Context | None = None,
        cache_context: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> GenerateResult:
        request = build_request(
            GENERATE_UNARY, prompt, messages, compression, retention, request_id, sampling, question, context,
            cache_context,
        )  # fmt: skip
        try:
            reply = self._stub.GenerateUnary(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        return GenerateResult.from_proto(reply)

    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Messages | None = None,
        compression: str | Mapping[str, Any] | None = None,
        retention: float | str | None = None,
        question: str | None = None,
        context: Context | None = None,
        cache_context: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[StreamChunk]:
        """Chunks as tokens are produced. Stopping early (break, close()) cancels the request and frees
        its KV on every node."""
        request = build_request(
            GENERATE, prompt, messages, compression, retention, request_id, sampling, question, context,
            cache_context,
        )  # fmt: skip
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for msg in call:
                yield StreamChunk.from_proto(msg)
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op when the stream already ended

    def put_context(
        self,
        context: str | Sequence[int] | None = None,
        *,
        messages: Messages | None = None,
        compression: str | Mapping[str, Any] | None = None,
        retention: float | str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ContextHandle:
        """Compress and cache a context (text, token ids, or `messages`: the conversation before the
        questions) on the cluster; later requests pass the handle as `context=` instead of the context
        (with `messages`: the turns after it). It stays until `drop_context`."""
        request = build_put_context(context, messages, compression, retention, request_id)
        try:
            reply = self._stub.PutContext(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        return ContextHandle.from_proto(reply)

    def drop_context(self, handle: ContextHandle | str, timeout: float | None = None) -> None:
        """Forget a context on every node (NOT_FOUND when no node knows it)."""
        name = handle.handle if isinstance(handle, ContextHandle) else handle
        try:
            self._stub.DropContext(
                common_pb2.DropContextRequest(handle=name),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    def info(self, timeout: float | None = None) -> coordinator_pb2.InfoResponse:
        try:
            return self._stub.Info(
                coordinator_pb2.InfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    def stats(self, timeout: float | None = None) -> coordinator_pb2.StatsResponse:
        try:
            return self._stub.Stats(
                coordinator_pb2.StatsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
