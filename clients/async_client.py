"""The asyncio client of the coordinator (same arguments as Client)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc

from kvferry.clients.client import DEFAULT_ADDRESS, channel_options
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


class AsyncClient:
    """See Client for the arguments. Create it inside a running event loop."""

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
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)

    async def generate(
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
            reply = await self._stub.GenerateUnary(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        return GenerateResult.from_proto(reply)

    async def stream(
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
    ) -> AsyncIterator[StreamChunk]:
        """Chunks as tokens are produced; leaving the loop early (or cancelling the task) cancels the
        request and frees its KV on every node."""
        request = build_request(
            GENERATE, prompt, messages, compression, retention, request_id, sampling, question, context,
            cache_context,
        )  # fmt: skip
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield StreamChunk.from_proto(msg)
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        finally:
            call.cancel()

    async def put_context(
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
            reply = await self._stub.PutContext(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None
        return ContextHandle.from_proto(reply)

    async def drop_context(self, handle: ContextHandle | str, timeout: float | None = None) -> None:
        """Forget a context on every node (NOT_FOUND when no node knows it)."""
        name = handle.handle if isinstance(handle, ContextHandle) else handle
        try:
            await self._stub.DropContext(
                common_pb2.DropContextRequest(handle=name),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    async def info(self, timeout: float | None = None) -> coordinator_pb2.InfoResponse:
        try:
            return await self._stub.Info(
                coordinator_pb2.InfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    async def stats(self, timeout: float | None = None) -> coordinator_pb2.StatsResponse:
        try:
            return await self._stub.Stats(
                coordinator_pb2.StatsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise KvferryRpcError.from_rpc_error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
