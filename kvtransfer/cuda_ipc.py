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
index_copy_ of int64 words. Writes run on the writer's own stream and are synchronised before `write`
returns, so a commit sent afterwards always finds the pages in place.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import torch

from kvtransfer.device_util import (
    PeerUnreachableError,
    as_words,
    device_uuid,
    host_id,
    local_device_index,
)

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

    @property
    def closed(self) -> bool:
        return self.kv is None

    def write(self, pages: torch.Tensor, page_ids: torch.Tensor) -> float:
        """Copy `pages` ([N, 2, page_size, head_dim], travel order) into pool pages `page_ids` ([N]).

        Waits for the caller's current stream on the pages' device first (the producer), and returns
        (seconds) only once every byte is in the pool, so the caller may commit right after."""
        if self.kv is None:
            raise PeerUnreachableError(f"cuda_ipc: the mapping of node {self.node_id} is closed")
        n = page_ids.numel()
        if tuple(pages.shape) != (n, *self.kv.shape[1:]) or pages.dtype != self.kv.dtype:
            raise ValueError(
                f"pages {tuple(pages.shape)} {pages.dtype} do not fit {n} pool pages of "
                f"{tuple(self.kv.shape[1:])} {self.kv.dtype}"
            )
        if n == 0:
            return 0.0
        start = time.perf_counter()
        src = pages if pages.device == self.device else pages.to(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(src.device))
        words = as_words(src.contiguous())
        num_pages = self._words.shape[0]
        with torch.cuda.stream(self.stream):
            ids = page_ids.detach().to(self.device, torch.int64, non_blocking=True)
            if bool(((ids < 0) | (ids >= num_pages)).any()):  # one sync on our stream
                raise ValueError(f"page ids outside the pool of {num_pages} pages")
            breaks = torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1  # run starts after the first
            if breaks.numel() + 1 <= self.max_direct_runs:  # few runs: one memcpy each
                starts = [0, *breaks.tolist()]
                ends = [*starts[1:], n]
                for pos, end, first in zip(starts, ends, ids[starts].tolist()):
                    self._words[first : first + end - pos].copy_(words[pos:end], non_blocking=True)
            else:  # scattered: one scatter kernel over int64 words
                self._words.index_copy_(0, ids, words)
        self.stream.synchronize()
        self.bytes_written += n * self._words.shape[1] * self._words.element_size()
        self.writes += 1
        return time.perf_counter() - start

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


class IpcPeers:
    """The writer side's mappings, one per decode node, opened on first use and reused."""

    def __init__(self, device: torch.device | int | None = None, max_direct_runs: int = 0) -> None:
        self.device = device
        self.max_direct_runs = max_direct_runs
        self._maps: dict[str, MappedPool] = {}
        self._lock = threading.Lock()
        self.opened = 0  # mappings ever opened (a test checks reuse)

    def map(self, export: PoolExport) -> MappedPool:
        with self._lock:
            mapped = self._maps.get(export.node_id)
            if mapped is not None and not mapped.closed and mapped.export == export:
                return mapped
            if mapped is not None:  # the node restarted or re-exported: drop the stale mapping
                mapped.close()
            mapped = MappedPool(export, self.device, self.max_direct_runs)
            self._maps[export.node_id] = mapped
            self.opened += 1
            return mapped

    def get(self, node_id: str) -> MappedPool | None:
        return self._maps.get(node_id)

    def close(self, node_id: str) -> bool:
        """Forget a decode node (it went away or failed a transfer); True when it was mapped."""
        with self._lock:
            mapped = self._maps.pop(node_id, None)
        if mapped is None:
            return False
        mapped.close()
        return True

    def close_all(self) -> None:
        for node_id in list(self._maps):
            self.close(node_id)

    def __len__(self) -> int:
        return len(self._maps)


def _index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index
