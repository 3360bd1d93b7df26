"""The prefill node's links to decode nodes: one `DecodeLink` per decode address, the only thing kept
per address.

A link holds the node's client (channel and stub), its ExportKV answer (asked once per decode
process), and the transports set up to it (the mapped pool for cuda_ipc / shm, the NCCL pair). A link
that fails is forgotten, so the next request asks again (a restarted decode node has a new node id and
a new pool); its channel stays, since gRPC reconnects by itself. `LocalEnd` is this node's side of
every link: its device, the grpc transport and the mappings of decode pools and pairs (keyed by decode
process, shared by all links).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvferry.decode_service.client import DecodeClient
from kvferry.engine.errors import InvalidArgumentError, UnavailableError
from kvferry.kvtransfer.device_util import PeerUnreachableError
from kvferry.kvtransfer.direct_transport import DirectWriteTransport, NcclTransport
from kvferry.kvtransfer.grpc_transport import GrpcTransport
from kvferry.kvtransfer.selection import (
    AUTO,
    IN_PROCESS_NODES,
    TRANSPORT_NAMES,
    NodeInfo,
    choose_transport,
    local_node,
)
from kvferry.kvtransfer.transport import Transport
from kvferry.v1 import decode_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkOptions:
    """How this prefill node reaches decode nodes (its settings)."""

    device: str  # the prefill engine's torch device (where the pages are)
    transports: tuple[str, ...]  # the transports this node may use
    default: str  # the transport of requests that name none (auto: chosen per decode node)
    grpc_chunk_bytes: int = 1 << 20
    reserve_wait_seconds: float = 30.0  # how long a ReserveKV waits for room on a full decode node


class LocalEnd:
    """This node's side of every link."""

    def __init__(self, options: LinkOptions) -> None:
        dev = torch.device(options.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = str(dev)
        self.info = local_node(self.device, options.transports)
        self.options = options
        self.grpc = GrpcTransport(options.grpc_chunk_bytes)
        self._ipc: Any = None  # kvtransfer.cuda_ipc.IpcPeers, created on first use
        self._shm: Any = None  # kvtransfer.shm.ShmPeers
        self._nccl: Any = None  # kvtransfer.nccl.NcclPeers

    def check_name(self, requested: str) -> str:
        """The transport a request names (or the default), refused before prefill when unknown."""
        name = requested or self.options.default
        if name != AUTO and name not in TRANSPORT_NAMES:
            raise InvalidArgumentError(
                f"transport: unknown transport {name!r}; use {AUTO} or one of {TRANSPORT_NAMES}",
                field="transport",
            )
        return name

    async def open(self, name: str, export: decode_pb2.ExportKVResponse, client: DecodeClient) -> Transport:
        """Set transport `name` up toward the decode process that gave `export`."""
        if name == "grpc":
            return self.grpc
        if name == "shm":
            from kvferry.kvtransfer.shm import ShmExport, ShmPeers

            self._shm = self._shm or ShmPeers()
            mapped = await asyncio.to_thread(self._shm.map, ShmExport.from_bytes(export.pool_export))
            return DirectWriteTransport("shm", mapped)
        if name == "cuda_ipc":
            from kvferry.kvtransfer.cuda_ipc import IpcPeers, PoolExport

            if export.node_id in IN_PROCESS_NODES:
                raise PeerUnreachableError("cuda_ipc: the decode node runs in this process (IPC needs two)")
            self._ipc = self._ipc or IpcPeers(self.device)
            mapped = await asyncio.to_thread(self._ipc.map, PoolExport.from_bytes(export.pool_export))
            return DirectWriteTransport("cuda_ipc", mapped)
        assert name == "nccl", name
        from kvferry.kvtransfer.nccl import NcclOffer, NcclPeers

        reply = await client.open_nccl(
            decode_pb2.OpenNcclRequest(
                prefill_host_id=self.info.host_id, prefill_device_uuid=self.info.device_uuid
            )
        )
        self._nccl = self._nccl or NcclPeers(self.device, timeout=reply.timeout_seconds or 30.0)
        offer = NcclOffer(
            pair_id=reply.pair_id,
            store_host=reply.store_host,
            store_port=reply.store_port,
            chunk_bytes=reply.chunk_bytes,
            decode_node_id=export.node_id,
            decode_device_uuid=export.device_uuid,
            host_id=export.host_id,
        )
        pair = await asyncio.to_thread(self._nccl.connect, offer)
        return NcclTransport(pair, asyncio.Lock())

    def close(self, node_id: str) -> None:
        """Unmap the pool and close the NCCL pairs of decode process `node_id`."""
        for manager in (self._ipc, self._shm, self._nccl):
            if manager is not None:
                manager.close(node_id)


@dataclass
class _Peer:
    """What one decode process said about itself, and the transports set up to it."""

    export: decode_pb2.ExportKVResponse
    info: NodeInfo
    transports: dict[str, Transport] = field(default_factory=dict)  # by name, built on first use
    direct_failed: str | None = None  # why the direct transport could not be set up (auto then uses grpc)


class DecodeLink:
    """This node's link to the decode node at one address."""

    def __init__(self, client: DecodeClient, local: LocalEnd) -> None:
        self.client = client
        self.local = local
        self._peer: _Peer | None = None  # None: not asked yet, or forgotten
        self._setup = asyncio.Lock()  # concurrent first requests set the link up once

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def reserve_wait_seconds(self) -> float:
        return self.local.options.reserve_wait_seconds

    async def transport(self, requested: str) -> Transport:
        """The transport to this node for a request naming `requested` (empty: the default)."""
        name = self.local.check_name(requested)
        if name == "grpc":  # needs nothing from the decode node
            return self.local.grpc
        async with self._setup:
            peer = await self._peer_info()
            choice = choose_transport(self.local.info, peer.info, name)
            if choice.name != "grpc" and name == AUTO and peer.direct_failed is not None:
                return self.local.grpc
            if choice.name in peer.transports:
                return peer.transports[choice.name]
            try:
                transport = await self.local.open(choice.name, peer.export, self.client)
            except UnavailableError as e:
                if name != AUTO:
                    raise
                peer.direct_failed = str(e)
                log.warning(
                    "decode node %s: %s failed to set up (%s); using grpc", self.address, choice.name, e
                )
                return self.local.grpc
            log.info("decode node %s: transport %s (%s)", self.address, choice.name, choice.reason)
            peer.transports[choice.name] = transport
            return transport

    def serves(self, node_id: str) -> bool:
        """Whether the link still points at decode process `node_id` (a ReserveKV reply's)."""
        return self._peer is not None and self._peer.export.node_id == node_id

    async def reopen(self, requested: str, name: str) -> Transport:
        """The decode node restarted after the link was set up (a ReserveKV reply names another
        process): set it up again. A payload and manifest made for transport `name` stay valid only if
        the node takes the same transport."""
        log.info("decode node %s restarted; setting its %s link up again", self.address, name)
        self.forget()
        transport = await self.transport(requested)
        if transport.name != name:
            raise UnavailableError(
                f"decode node {self.address} restarted and now takes {transport.name}, not {name}"
            )
        return transport

    def forget(self) -> None:
        """Drop what is known about the node (after a failed transfer or a restart): its pool is
        unmapped and its NCCL pairs closed; the next request sets the link up again."""
        peer, self._peer = self._peer, None
        if peer is not None:
            self.local.close(peer.export.node_id)

    async def close(self) -> None:
        self.forget()
        await self.client.close()

    async def _peer_info(self) -> _Peer:
        if self._peer is None:
            export = await self.client.export()
            info = NodeInfo(
                export.host_id, export.device_type or "cpu", export.device_uuid, tuple(export.transports)
            )
            self._peer = _Peer(export, info)
        return self._peer


class DecodeLinks:
    """Every decode node this prefill node sends to, one link per address, made on first use."""

    def __init__(self, options: LinkOptions, connect: Callable[[str], DecodeClient]) -> None:
        self.local = LocalEnd(options)
        self._connect = connect  # address -> a client on a new channel (the service's TLS settings)
        self._links: dict[str, DecodeLink] = {}

    def check_name(self, requested: str) -> str:
        return self.local.check_name(requested)

    def link(self, address: str) -> DecodeLink:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = DecodeLink(self._connect(address), self.local)
        return link

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()
