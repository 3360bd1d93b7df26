"""The `cuda_ipc` transport's device half: a decode node exports its KV pool once; a prefill node on the
same host maps it once per decode node and writes reserved pages straight into it.

Export: the CUDA IPC handle of the allocation holding `pool.kv` (through torch's `_share_cuda_`, which
also hands over an interprocess event that orders the exporter's pending work before the first use,
and a reference count that keeps the allocation alive while mapped), plus offsets and shape.

Map: `_new_shared_cuda` opens the handle in the WRITER's device context (cudaIpcOpenMemHandle with lazy
peer access). On one GPU that is the pool's own device; across GPUs the mapping is the pool's memory
seen through NVLink peer access, so a copy or scatter kernel on the writer's GPU stores straight into
the decode GPU's pool: no staging buffer, no memory taken on the decode GPU.

Write: runs of consecutive page ids are copied with one memcpy each; scattered ids go through one
index_copy_ of int64 words. The runs come from the reservation (`runs`, encode_runs format: a fresh
pool's reservation is one run) or are found on the host from CPU ids, so nothing waits on the GPU before
the copies. Writes run on the writer's own stream and are synchronised before `write` returns, so a
commit sent afterwards always finds the pages in place.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kvferry.kvtransfer.device_util import (
    PeerUnreachableError,
    as_words,
    check_runs,
    decode_runs,
    device_uuid,
    host_id,
    host_runs,
    local_device_index,
)
from kvferry.kvtransfer.peer_maps import PeerMaps

log = logging.getLogger(__name__)

DEFAULT_MAX_DIRECT_RUNS = 64  # more runs than this: one scatter kernel instead of a memcpy per run


@dataclass(frozen=True)
class PoolExport:
    """Everything a writer needs to map a decode node's KV pool; travels once per (prefill, decode)."""

    node_id: str  # the exporting decode process (a new id on every start)
    host_id: str  # device_util.host_id() of the exporter: IPC needs an equal one
    device_uuid: str  # the pool's GPU
    handle: bytes  # CUDA IPC handle of the allocation holding the pool (as torch encodes it)
    storage_bytes: int
    storage_offset_bytes: int  # of the pool's storage inside that allocation
    ref_counter_handle: bytes  # torch's shared reference count (a /dev/shm file name)
    ref_counter_offset: int
    event_handle: bytes | None  # interprocess event ordering the exporter's writes before ours
    event_sync_required: bool
    tensor_offset: int  # elements
    shape: tuple[int, ...]  # [num_pages, 2, page_size, head_dim]
    stride: tuple[int, ...]
    dtype: str

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        for name in ("handle", "ref_counter_handle", "event_handle"):
            if fields[name] is not None:
                fields[name] = base64.b64encode(fields[name]).decode()
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PoolExport:
        fields = json.loads(data)
        for name in ("handle", "ref_counter_handle", "event_handle"):
            if fields[name] is not None:
                fields[name] = base64.b64decode(fields[name])
        fields["shape"] = tuple(fields["shape"])
        fields["stride"] = tuple(fields["stride"])
        return cls(**fields)

    @property
    def num_pages(self) -> int:
        return self.shape[0]


def export_pool(kv: torch.Tensor, node_id: str | None = None) -> PoolExport:
    """Export `kv` (the decode pool) for CUDA IPC. Call once and hand the same export to every writer:
    each call adds a reference the mappers must release."""
    if kv.device.type != "cuda":
        raise PeerUnreachableError(f"cuda_ipc needs a CUDA pool, this one is on {kv.device}")
    if not kv.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    with torch.cuda.device(kv.device):
        (
            _device,
            handle,
            storage_bytes,
            storage_offset_bytes,
            ref_counter_handle,
            ref_counter_offset,
            event_handle,
            event_sync_required,
        ) = kv.untyped_storage()._share_cuda_()
    return PoolExport(
        node_id=node_id or uuid.uuid4().hex,
        host_id=host_id(),
        device_uuid=device_uuid(kv.device),
        handle=bytes(handle),
        storage_bytes=int(storage_bytes),
        storage_offset_bytes=int(storage_offset_bytes),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset),
        event_handle=None if event_handle is None else bytes(event_handle),
        event_sync_required=bool(event_sync_required),
        tensor_offset=kv.storage_offset(),
        shape=tuple(kv.shape),
        stride=tuple(kv.stride()),
        dtype=str(kv.dtype).removeprefix("torch."),
    )


def reachable(export: PoolExport, writer_device: torch.device | int | None = None) -> str | None:
    """None when this process can map `export` from `writer_device`; else why not (for selection)."""
    if not torch.cuda.is_available():
        return "no CUDA here"
    if export.host_id != host_id():
        return "the pool is on another host (or another IPC namespace: run with `ipc: host`)"
    writer = _index(writer_device)
    owner = local_device_index(export.device_uuid)
    if owner is None:
        return None  # not visible here: cudaIpcOpenMemHandle may still map it; map() will tell
    if owner != writer and not torch.cuda.can_device_access_peer(writer, owner):
        return f"GPU {writer} has no peer access to the pool's GPU {owner}"
    return None


@dataclass(frozen=True)
class WritePlan:
    """How `MappedPool.write` moves N pages, decided on the host before any GPU work."""

    num_pages: int
    firsts: list[int]  # runs of destination pages (memcpy per run) when scatter_ids is None
    lengths: list[int]
    scatter_ids: np.ndarray | None = None  # too many runs: the [N] ids for one scatter kernel
    device_ids: torch.Tensor | None = None  # ids already on a GPU: checked and cut there


def plan_write(
    pool_pages: int,
    page_ids: torch.Tensor | None,
    runs: list[int] | None,
    max_direct_runs: int = DEFAULT_MAX_DIRECT_RUNS,
) -> WritePlan:
    """The runs (or scatter ids) of a write into a pool of `pool_pages`, from the reservation's `runs`
    (encode_runs format; they win over `page_ids`) or from CPU `page_ids`, checked on the host:
    ValueError for ids or runs outside the pool. CUDA `page_ids` are left to the device path."""
    if runs is not None:
        firsts, lengths, n = check_runs(runs, pool_pages)
        if len(firsts) <= max_direct_runs:
            return WritePlan(n, firsts, lengths)
        return WritePlan(n, [], [], scatter_ids=decode_runs(runs).numpy())
    if page_ids is None:
        raise ValueError("write needs page_ids or runs")
    n = page_ids.numel()
    if n == 0:
        return WritePlan(0, [], [])
    if page_ids.device.type != "cpu":
        return WritePlan(n, [], [], device_ids=page_ids)
    ids = page_ids.detach().to(torch.int64).reshape(-1).numpy()
    if int(ids.min()) < 0 or int(ids.max()) >= pool_pages:
        raise ValueError(f"page ids outside the pool of {pool_pages} pages")
    firsts, lengths = host_runs(ids)
    if firsts.size <= max_direct_runs:
        return WritePlan(n, firsts.tolist(), lengths.tolist())
    return WritePlan(n, [], [], scatter_ids=ids)


class MappedPool:
    """A decode node's pool as seen from this (writer) process. Use IpcPeers to get one."""

    def __init__(
        self, export: PoolExport, device: torch.device | int | None = None, max_direct_runs: int = 0
    ):
        self.export = export
        self.node_id = export.node_id
        self.device = torch.device("cuda", _index(device))
        self.max_direct_runs = max_direct_runs or DEFAULT_MAX_DIRECT_RUNS
        why = reachable(export, self.device)
        if why is not None:
            raise PeerUnreachableError(f"cuda_ipc: cannot map pool of node {export.node_id}: {why}")
        with torch.cuda.device(self.device):
            try:
                storage = torch.UntypedStorage._new_shared_cuda(
                    self.device.index,
                    export.handle,
                    export.storage_bytes,
                    export.storage_offset_bytes,
                    export.ref_counter_handle,
                    export.ref_counter_offset,
                    export.event_handle,
                    export.event_sync_required,
                )
            except Exception as e:  # noqa: BLE001 - any driver refusal means: not reachable
                raise PeerUnreachableError(
                    f"cuda_ipc: opening the pool of node {export.node_id} failed: {e}"
                ) from e
            kv = torch.empty((0,), dtype=getattr(torch, export.dtype), device=self.device)
            kv.set_(storage, export.tensor_offset, export.shape, export.stride)
            self.stream = torch.cuda.Stream(self.device)
        torch.cuda.current_stream(self.device).synchronize()  # the exporter's event was waited on there
        self.kv: torch.Tensor | None = kv
        self._words = as_words(kv)
        self.bytes_written = 0
        self.writes = 0
        self._lock = threading.Lock()
        self._pinned: torch.Tensor | None = None

    @property
    def closed(self) -> bool:
        return self.kv is None

    def write(
        self,
        pages: torch.Tensor,
        page_ids: torch.Tensor | None = None,
        runs: list[int] | None = None,
    ) -> float:
        """Copy `pages` ([N, 2, page_size, head_dim], travel order) into pool pages `page_ids` ([N]), or
        into the pages of `runs` (the reservation's encode_runs output [first, length, ...], which wins
        when both are given).

        Waits for the caller's current stream on the pages' device first (the producer), and returns
        (seconds) only once every byte is in the pool, so the caller may commit right after.

        Fixed cost: with `runs` or CPU `page_ids`, the ids are checked and cut into runs on the host, so
        nothing waits on the GPU before the copies; up to `max_direct_runs` runs are one memcpy each
        (no id upload at all), more go through one scatter kernel fed from a pinned buffer. The only
        host sync is the final one. CUDA `page_ids` take the device path (three syncs)."""
        if self.kv is None:
            raise PeerUnreachableError(f"cuda_ipc: the mapping of node {self.node_id} is closed")
        plan = plan_write(self.kv.shape[0], page_ids, runs, self.max_direct_runs)
        if tuple(pages.shape) != (plan.num_pages, *self.kv.shape[1:]) or pages.dtype != self.kv.dtype:
            raise ValueError(
                f"pages {tuple(pages.shape)} {pages.dtype} do not fit {plan.num_pages} pool pages of "
                f"{tuple(self.kv.shape[1:])} {self.kv.dtype}"
            )
        if plan.num_pages == 0:
            return 0.0
        with self._lock:  # one stream and one pinned buffer per mapping
            start = time.perf_counter()
            src = pages if pages.device == self.device else pages.to(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(src.device))
            words = as_words(src.contiguous())
            with torch.cuda.stream(self.stream):
                if plan.device_ids is not None:
                    self._write_device_ids(words, plan.device_ids, plan.num_pages)
                elif plan.scatter_ids is None:  # few runs: one memcpy each, no ids at all
                    pos = 0
                    for first, length in zip(plan.firsts, plan.lengths):
                        self._words[first : first + length].copy_(
                            words[pos : pos + length], non_blocking=True
                        )
                        pos += length
                else:  # scattered: one scatter kernel over int64 words, ids from pinned memory
                    self._words.index_copy_(0, self._upload(plan.scatter_ids), words)
            self.stream.synchronize()
            self.bytes_written += plan.num_pages * self._words.shape[1] * self._words.element_size()
            self.writes += 1
            return time.perf_counter() - start

    def _write_device_ids(self, words: torch.Tensor, page_ids: torch.Tensor, n: int) -> None:
        """Ids already on a GPU: checked and cut into runs there (three syncs on our stream)."""
        num_pages = self._words.shape[0]
        ids = page_ids.detach().to(self.device, torch.int64, non_blocking=True).reshape(-1)
        if bool(((ids < 0) | (ids >= num_pages)).any()):
            raise ValueError(f"page ids outside the pool of {num_pages} pages")
        breaks = torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1  # run starts after the first
        if breaks.numel() + 1 <= self.max_direct_runs:
            starts = [0, *breaks.tolist()]
            ends = [*starts[1:], n]
            for pos, end, first in zip(starts, ends, ids[starts].tolist()):
                self._words[first : first + end - pos].copy_(words[pos:end], non_blocking=True)
        else:
            self._words.index_copy_(0, ids, words)

    def _upload(self, ids: np.ndarray) -> torch.Tensor:
        """Host ids to the GPU through a reused pinned buffer (an async copy; the previous write's copy
        finished at its final sync, so the buffer is free)."""
        n = ids.size
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 2 * (0 if self._pinned is None else self._pinned.numel())),
                                       dtype=torch.int64, pin_memory=True)  # fmt: skip
        self._pinned[:n].numpy()[:] = ids
        return self._pinned[:n].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Unmap: waits for our writes, then drops the storage (torch closes the IPC handle and releases
        the exporter's reference count). Idempotent."""
        if self.kv is None:
            return
        try:
            self.stream.synchronize()
        except Exception as e:  # noqa: BLE001 - closing after a failure must not raise
            log.warning("cuda_ipc: syncing before closing node %s failed: %s", self.node_id, e)
        self.kv = None
        self._words = None  # type: ignore[assignment]


class IpcPeers(PeerMaps[MappedPool]):
    """The writer side's cuda_ipc mappings, one per decode node, in this process's GPU context."""

    def __init__(self, device: torch.device | int | None = None, max_direct_runs: int = 0) -> None:
        super().__init__(lambda export: MappedPool(export, device, max_direct_runs))
        self.device = device
        self.max_direct_runs = max_direct_runs


def _index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index
