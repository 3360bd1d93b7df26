"""The decode node's side of the direct transports: the pool's export (cuda_ipc on a GPU, shm on a CPU)
and the NCCL hub with its pairs, set up once at start and torn down at stop.

ExportKV hands the export out; OpenNccl creates a pair and joins it in the background (the prefill
node joins with the offer it got); CommitKV receives (nccl) and verifies the written pages.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import torch

from kvferry.decode_service.settings import DecodeSettings
from kvferry.engine.errors import FailedPreconditionError, UnavailableError
from kvferry.kvtransfer.device_util import device_uuid, host_id
from kvferry.kvtransfer.selection import CPU_TRANSPORTS, GPU_TRANSPORTS, IN_PROCESS_NODES, parse_transports
from kvferry.v1 import decode_pb2

log = logging.getLogger(__name__)


class DirectReceiver:
    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self.node_id = uuid.uuid4().hex  # this process; prefill nodes map a pool once per id
        self.transports: tuple[str, ...] = ("grpc",)
        self.device = torch.device("cpu")
        self.pool_export = b""
        self._shared: Any = None  # kvtransfer.shm.SharedPool
        self._hub: Any = None  # kvtransfer.nccl.NcclHub
        self._pairs: dict[str, asyncio.Future[Any]] = {}  # pair id -> the decode end (NcclPair) once joined
        self._joining: set[asyncio.Task[None]] = set()

    # ---- start and stop (the pool must not be in use yet at start) ----------------------------
    def share_pool(self, pool: Any) -> None:
        """Runs on the engine thread before any request: export the pool (moving it into shared memory
        on a CPU) and open the NCCL hub, for what the settings allow and the device can do."""
        wanted = parse_transports(self.settings.transports)
        self.device = pool.kv.device
        served = ["grpc"]
        if self.device.type == "cpu" and "shm" in wanted:
            from kvferry.kvtransfer.shm import SharedPool

            try:
                self._shared = SharedPool(pool.kv, self.node_id)
            except (OSError, UnavailableError) as e:
                log.warning("shm transport off: %s", e)
            else:
                pool.kv = self._shared.kv  # the same values, now in the shared file
                self.pool_export = self._shared.export.to_bytes()
                served.append("shm")
        if self.device.type == "cuda" and "cuda_ipc" in wanted:
            from kvferry.kvtransfer.cuda_ipc import export_pool

            try:
                self.pool_export = export_pool(pool.kv, self.node_id).to_bytes()
                served.append("cuda_ipc")
            except (RuntimeError, UnavailableError) as e:
                log.warning("cuda_ipc transport off: %s", e)
        if self.device.type == "cuda" and "nccl" in wanted:
            from kvferry.kvtransfer.nccl import NcclHub

            try:
                self._hub = NcclHub(
                    self.device,
                    host=self.settings.nccl_store_host,
                    timeout=self.settings.nccl_timeout_seconds,
                    node_id=self.node_id,
                )
                served.append("nccl")
            except (RuntimeError, UnavailableError) as e:
                log.warning("nccl transport off: %s", e)
        possible = CPU_TRANSPORTS if self.device.type == "cpu" else GPU_TRANSPORTS
        self.transports = tuple(t for t in served if t in possible)
        IN_PROCESS_NODES.add(self.node_id)
        log.info("KV transports served: %s (node %s)", ", ".join(self.transports), self.node_id)

    async def close(self) -> None:
        IN_PROCESS_NODES.discard(self.node_id)
        for task in self._joining:
            task.cancel()
        if self._hub is not None:
            await asyncio.to_thread(self._hub.close_all)
        if self._shared is not None:
            self._shared.close()

    # ---- RPC halves ----------------------------------------------------------------------------
    def export(self) -> decode_pb2.ExportKVResponse:
        cuda = self.device.type == "cuda"
        return decode_pb2.ExportKVResponse(
            node_id=self.node_id,
            host_id=host_id(),
            device_type=self.device.type,
            device_uuid=device_uuid(self.device) if cuda else "",
            transports=list(self.transports),
            pool_export=self.pool_export,
        )

    def check_transport(self, name: str, nccl_pair_id: str) -> str:
        """The transport a ReserveKV names, if served here (FAILED_PRECONDITION otherwise)."""
        name = name or "grpc"
        if name not in self.transports:
            raise FailedPreconditionError(
                f"transport: {name!r} is not served by this decode node; it serves {list(self.transports)}",
                field="transport",
            )
        if name == "nccl" and nccl_pair_id not in self._pairs:
            raise UnavailableError(
                f"nccl_pair_id: no pair {nccl_pair_id!r} here (the node restarted?); open a new one with OpenNccl"
            )
        return name

    async def open_nccl(self, request: decode_pb2.OpenNcclRequest) -> decode_pb2.OpenNcclResponse:
        if self._hub is None:
            raise FailedPreconditionError("this decode node does not serve nccl", field="transport")
        offer = self._hub.offer()
        loop = asyncio.get_running_loop()
        joined: asyncio.Future[Any] = loop.create_future()
        self._pairs[offer.pair_id] = joined
        task = asyncio.create_task(self._join(offer, joined, request))
        self._joining.add(task)
        task.add_done_callback(self._joining.discard)
        return decode_pb2.OpenNcclResponse(
            pair_id=offer.pair_id,
            store_host=offer.store_host,
            store_port=offer.store_port,
            chunk_bytes=offer.chunk_bytes,
            timeout_seconds=self.settings.nccl_timeout_seconds,
        )

    async def _join(
        self, offer: Any, joined: asyncio.Future[Any], request: decode_pb2.OpenNcclRequest
    ) -> None:
        try:
            pair = await asyncio.to_thread(self._hub.accept, offer)
        except BaseException as e:
            self._pairs.pop(offer.pair_id, None)
            log.warning(
                "nccl pair %s with %s failed to come up: %s", offer.pair_id, request.prefill_host_id, e
            )
            if not joined.done():
                joined.set_exception(UnavailableError(f"nccl pair {offer.pair_id} failed to come up: {e}"))
                joined.exception()  # retrieved: nobody may be waiting
            return
        log.info("nccl pair %s with GPU %s is up", offer.pair_id, request.prefill_device_uuid or "?")
        joined.set_result(pair)

    async def nccl_pair(self, pair_id: str) -> Any:
        """The decode end of `pair_id`, waiting for it to come up (within the NCCL timeout)."""
        joined = self._pairs.get(pair_id)
        if joined is None:
            raise UnavailableError(f"nccl_pair_id: no pair {pair_id!r} here; open a new one with OpenNccl")
        try:
            pair = await asyncio.wait_for(asyncio.shield(joined), self.settings.nccl_timeout_seconds)
        except TimeoutError:
            raise UnavailableError(f"nccl pair {pair_id} did not come up in time") from None
        if pair.broken:
            self._pairs.pop(pair_id, None)
            raise UnavailableError(f"nccl pair {pair_id} was aborted after a failed transfer; open a new one")
        return pair
