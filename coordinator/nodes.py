"""The prefill and decode services behind a coordinator, and how one of each is picked per request:
the decode node with the most available pages, the prefill node with the shortest queue; a request on
a cached context prefers the nodes that served its context last while they stay close to those
(coordinator/context_routes.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvferry.coordinator.context_routes import RoutePreference
from kvferry.decode_service.client import DecodeClient
from kvferry.engine.errors import UnavailableError
from kvferry.serving.security import ChannelFactory
from kvferry.serving.server import CHANNEL_OPTIONS
from kvferry.v1 import common_pb2, coordinator_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc


@dataclass
class Node:
    """A prefill node (decode nodes are DecodeClients: every call into one goes through it)."""

    address: str
    stub: prefill_pb2_grpc.PrefillServiceStub
    channel: grpc.aio.Channel


N = TypeVar("N", Node, DecodeClient)


class NodePool:
    def __init__(
        self,
        prefill_addresses: list[str],
        decode_addresses: list[str],
        info_timeout: float,
        channels: ChannelFactory | None = None,
        preference: RoutePreference | None = None,
    ) -> None:
        self.preference = preference or RoutePreference()
        self.channels = channels or ChannelFactory(options=tuple(CHANNEL_OPTIONS))
        self.prefill = [self._prefill_node(a) for a in prefill_addresses]
        self.decode = [DecodeClient.connect(a, self.channels) for a in decode_addresses]
        self._by_address = {n.address: n for n in self.decode}
        self.info_timeout = info_timeout
        self._turn = itertools.count()  # breaks ties so equal nodes share the load
        self.max_model_len: dict[str, int] = {}  # each decode node's model's, from its last Info

    async def close(self) -> None:
        for node in self.prefill:
            await node.channel.close()
        for client in self._by_address.values():
            await client.close()

    def decode_node(self, address: str) -> DecodeClient:
        if address not in self._by_address:  # a handle naming a node this coordinator does not know
            self._by_address[address] = DecodeClient.connect(address, self.channels)
        return self._by_address[address]

    def _prefill_node(self, address: str) -> Node:
        channel = self.channels.aio_channel(address)
        return Node(address, prefill_pb2_grpc.PrefillServiceStub(channel), channel)

    async def prefill_by_load(self) -> list[tuple[Node, prefill_pb2.PrefillInfoResponse]]:
        """The prefill nodes that answer Info, least loaded first (ties taken in turn)."""
        infos = await self._infos(self.prefill, self._prefill_info)
        live = [
            (info.queue_depth, next(self._turn) % 1000, n, info)
            for n, info in zip(self.prefill, infos)
            if info
        ]
        if not live:
            raise UnavailableError(
                f"no prefill service answers ({', '.join(n.address for n in self.prefill)})"
            )
        return [(n, info) for *_, n, info in sorted(live, key=lambda t: t[:2])]

    async def pick_prefill(self, prefer: str | None = None) -> Node:
        """The least loaded prefill node, or `prefer` while its queue is at most the preference's
        slack longer."""
        ranked = await self.prefill_by_load()
        return self.preferred_prefill(ranked, prefer)

    def preferred_prefill(
        self, ranked: list[tuple[Node, prefill_pb2.PrefillInfoResponse]], prefer: str | None
    ) -> Node:
        least = ranked[0][1].queue_depth
        for node, info in ranked:
            if node.address == prefer and info.queue_depth <= least + self.preference.prefill_slack:
                return node
        return ranked[0][0]

    async def decode_by_load(
        self, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[tuple[DecodeClient, int]]:
        """The decode nodes that answer Info (but `exclude`) with their available pages, most first."""
        candidates = [n for n in self.decode if n.address not in exclude]
        infos = await self._infos(candidates, self._decode_info)
        for node, info in zip(candidates, infos):
            if info:
                self.max_model_len[node.address] = info.model.max_model_len
        live = [
            (info.pool.available_pages, -(next(self._turn) % 1000), n)
            for n, info in zip(candidates, infos)
            if info
        ]
        if not live:
            raise UnavailableError(f"no decode service answers ({', '.join(n.address for n in self.decode)})")
        return [(n, available) for available, _, n in sorted(live, key=lambda t: t[:2], reverse=True)]

    async def pick_decode(
        self, exclude: set[str] | frozenset[str] = frozenset(), prefer: str | None = None
    ) -> DecodeClient:
        return self.preferred_decode(await self.decode_by_load(exclude), prefer)

    def preferred_decode(self, ranked: list[tuple[DecodeClient, int]], prefer: str | None) -> DecodeClient:
        """The decode node with the most available pages, or `prefer` while it has at least the
        preference's share of those."""
        most = ranked[0][1]
        for node, available in ranked:
            if node.address == prefer and available >= self.preference.decode_share * most:
                return node
        return ranked[0][0]

    async def drop_context(self, request: common_pb2.DropContextRequest, timeout: float | None) -> bool:
        """DropContext on every node at once; whether any knew the handle. A node that does not answer
        is skipped (its cache still evicts the context in time)."""
        limit = self.info_timeout if timeout is None else min(timeout, self.info_timeout)

        async def drop(found: Awaitable[Any]) -> bool:
            try:
                return bool(await found)
            except grpc.aio.AioRpcError:
                return False

        async def on_prefill(node: Node) -> bool:
            return (await node.stub.DropContext(request, timeout=limit)).found

        drops = [on_prefill(n) for n in self.prefill] + [
            n.drop_context(request.handle, limit) for n in self.decode
        ]
        return any(await asyncio.gather(*(drop(d) for d in drops)))

    async def describe(self) -> coordinator_pb2.InfoResponse:
        prefill, decode = await asyncio.gather(
            self._infos(self.prefill, self._prefill_info, errors=True),
            self._infos(self.decode, self._decode_info, errors=True),
        )
        reply = coordinator_pb2.InfoResponse()
        for node, info in zip(self.prefill, prefill):
            reply.prefill_nodes.append(_node_info(node, info, lambda i: i.queue_depth))
        for node, info in zip(self.decode, decode):
            reply.decode_nodes.append(_node_info(node, info, lambda i: i.running))
        return reply

    async def _prefill_info(self, node: Node) -> prefill_pb2.PrefillInfoResponse:
        return await node.stub.Info(prefill_pb2.PrefillInfoRequest(), timeout=self.info_timeout)

    async def _decode_info(self, node: DecodeClient) -> decode_pb2.DecodeInfoResponse:
        return await node.info(self.info_timeout)

    async def _infos(
        self, nodes: Sequence[N], info: Callable[[N], Awaitable[Any]], errors: bool = False
    ) -> list[Any]:
        """Each node's Info reply; None (or the error, with errors=True) for nodes that do not answer."""

        async def ask(node: N) -> Any:
            try:
                return await info(node)
            except grpc.aio.AioRpcError as e:
                return e if errors else None

        return list(await asyncio.gather(*(ask(n) for n in nodes)))


def _node_info(node: Node | DecodeClient, info: Any, load: Any) -> coordinator_pb2.NodeInfo:
    if isinstance(info, grpc.aio.AioRpcError):
        return coordinator_pb2.NodeInfo(
            address=node.address, reachable=False, error=f"{info.code().name}: {info.details()}"
        )
    return coordinator_pb2.NodeInfo(
        address=node.address, reachable=True, model=info.model, pool=info.pool, load=load(info),
        context_cache=info.context_cache,
    )  # fmt: skip
