"""The prefill node's links to decode nodes: which transport reaches each one, set up once and reused.

Per decode address: its ExportKV answer (asked once per decode process), the chosen transport and what
a direct one needs (the mapped pool for cuda_ipc / shm, the NCCL pair). A link that fails is forgotten,
so the next request asks again (a restarted decode node has a new node id and a new pool).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

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


@dataclass
class DecodePeer:
    export: decode_pb2.ExportKVResponse
    info: NodeInfo
    transports: dict[str, Transport] = field(default_factory=dict)  # by name, built on first use
    direct_failed: str | None = None  # why the direct transport could not be set up (auto then uses grpc)


class DecodeLinks:
    def __init__(self, device: str, transports: tuple[str, ...], default: str, grpc_chunk_bytes: int) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = str(dev)  # the prefill engine's torch device (where the pages are)
        self.local = local_node(self.device, transports)
        self.default = default
        self.grpc = GrpcTransport(grpc_chunk_bytes)
        self._peers: dict[str, DecodePeer] = {}
        self._setup_locks: dict[str, asyncio.Lock] = {}
        self._ipc: Any = None  # kvtransfer.cuda_ipc.IpcPeers, created on first use
        self._shm: Any = None  # kvtransfer.shm.ShmPeers
        self._nccl: Any = None  # kvtransfer.nccl.NcclPeers

    def check_name(self, requested: str) -> str:
        """The transport a request names (or the default), refused before prefill when unknown."""
        name = requested or self.default
        if name != AUTO and name not in TRANSPORT_NAMES:
            raise InvalidArgumentError(
                f"transport: unknown transport {name!r}; use {AUTO} or one of {TRANSPORT_NAMES}",
                field="transport",
            )
        return name

    async def transport(self, address: str, decode: Any, requested: str) -> Transport:
        """The transport to `address` for a request naming `requested` (empty: the default)."""
        name = self.check_name(requested)
        if name == "grpc":  # needs nothing from the decode node
            return self.grpc
        lock = self._setup_locks.setdefault(address, asyncio.Lock())
        async with lock:  # concurrent first requests set a link up once
            peer = await self._peer(address, decode)
            choice = choose_transport(self.local, peer.info, name)
            if choice.name != "grpc" and name == AUTO and peer.direct_failed is not None:
                return self.grpc
            if choice.name in peer.transports:
                return peer.transports[choice.name]
            try:
                transport = await self._open(choice.name, peer, decode)
            except UnavailableError as e:
                if name != AUTO:
                    raise
                peer.direct_failed = str(e)
                log.warning("decode node %s: %s failed to set up (%s); using grpc", address, choice.name, e)
                return self.grpc
            log.info("decode node %s: transport %s (%s)", address, choice.name, choice.reason)
            peer.transports[choice.name] = transport
            return transport

    def matches(self, address: str, node_id: str) -> bool:
        """Whether the link to `address` still points at decode process `node_id` (a ReserveKV reply's)."""
        peer = self._peers.get(address)
        return peer is not None and peer.export.node_id == node_id

    def forget(self, address: str) -> None:
        """Drop what is known about `address` (after a failed transfer or a restart): mapped pools are
        unmapped and NCCL pairs closed; the next request sets the link up again."""
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        node_id = peer.export.node_id
        for manager in (self._ipc, self._shm, self._nccl):
            if manager is not None:
                manager.close(node_id)

    def close(self) -> None:
        for address in list(self._peers):
            self.forget(address)

    async def _peer(self, address: str, decode: Any) -> DecodePeer:
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        try:
            export = await decode.ExportKV(decode_pb2.ExportKVRequest(), timeout=30.0)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            export = decode_pb2.ExportKVResponse(transports=["grpc"])  # an older decode node
        info = NodeInfo(
            export.host_id, export.device_type or "cpu", export.device_uuid, tuple(export.transports)
        )
        peer = DecodePeer(export, info)
        self._peers[address] = peer
        return peer

    async def _open(self, name: str, peer: DecodePeer, decode: Any) -> Transport:
        if name == "grpc":
            return self.grpc
        if name == "shm":
            from kvferry.kvtransfer.shm import ShmExport, ShmPeers

            self._shm = self._shm or ShmPeers()
            mapped = await asyncio.to_thread(self._shm.map, ShmExport.from_bytes(peer.export.pool_export))
            return DirectWriteTransport("shm", mapped)
        if name == "cuda_ipc":
            from kvferry.kvtransfer.cuda_ipc import IpcPeers, PoolExport

            if peer.export.node_id in IN_PROCESS_NODES:
                raise PeerUnreachableError("cuda_ipc: the decode node runs in this process (IPC needs two)")
            self._ipc = self._ipc or IpcPeers(self.device)
            mapped = await asyncio.to_thread(self._ipc.map, PoolExport.from_bytes(peer.export.pool_export))
            return DirectWriteTransport("cuda_ipc", mapped)
        assert name == "nccl", name
        from kvferry.kvtransfer.nccl import NcclOffer, NcclPeers

        reply = await decode.OpenNccl(
            decode_pb2.OpenNcclRequest(
                prefill_host_id=self.local.host_id, prefill_device_uuid=self.local.device_uuid
            ),
            timeout=30.0,
        )
        self._nccl = self._nccl or NcclPeers(self.device, timeout=reply.timeout_seconds or 30.0)
        offer = NcclOffer(
            pair_id=reply.pair_id,
            store_host=reply.store_host,
            store_port=reply.store_port,
            chunk_bytes=reply.chunk_bytes,
            decode_node_id=peer.export.node_id,
            decode_device_uuid=peer.export.device_uuid,
            host_id=peer.export.host_id,
        )
        pair = await asyncio.to_thread(self._nccl.connect, offer)
        return NcclTransport(pair, asyncio.Lock())
