"""The `shm` transport's memory half: a CPU decode node keeps its KV pool in a /dev/shm file; a prefill
node on the same host maps that file once and writes reserved pages straight into it.

It is the CPU counterpart of `cuda_ipc` (same protocol: ExportKV once, write, CommitKV), so a
disaggregated CPU cluster on one host moves no page bytes through gRPC.

The file is created with its full size allocated up front (posix_fallocate: a full /dev/shm refuses
the export at start instead of killing a writer with SIGBUS later), named after the exporting
process, and unlinked on close; a start sweeps the files of processes that are gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvferry.kvtransfer.device_util import PeerUnreachableError, decode_runs, host_id
from kvferry.kvtransfer.peer_maps import PeerMaps

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_FILE_NAME = re.compile(r"kvferry-kv-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class ShmExport:
    """Everything a writer needs to map a decode node's pool file; travels once per (prefill, decode)."""

    node_id: str
    host_id: str
    path: str
    shape: tuple[int, ...]  # [num_pages, 2, page_size, head_dim]
    dtype: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShmExport:
        fields = json.loads(data)
        fields["shape"] = tuple(fields["shape"])
        return cls(**fields)

    @property
    def num_bytes(self) -> int:
        n = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        for size in self.shape:
            n *= size
        return n


class SharedPool:
    """The exporting side: moves a CPU pool tensor into a /dev/shm file (same values) and owns the file."""

    def __init__(self, kv: torch.Tensor, node_id: str, directory: Path = SHM_DIR) -> None:
        if kv.device.type != "cpu":
            raise PeerUnreachableError(f"shm needs a CPU pool, this one is on {kv.device}")
        sweep_stale_files(directory)
        self.path = directory / f"kvferry-kv-{os.getpid()}-{node_id}"
        num_bytes = kv.numel() * kv.element_size()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(num_bytes, 1))
        except OSError as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise PeerUnreachableError(f"shm: cannot allocate {num_bytes} bytes in {directory}: {e}") from e
        os.close(fd)
        self.kv = _map(self.path, tuple(kv.shape), kv.dtype)
        # The file starts zero-filled. A fresh pool is all zeros too (a decode service shares its pool
        # before any request), and then the copy, which faults in every page of the file (2 s for 2 GiB),
        # is skipped; reading the pool to check takes 0.15 s.
        if bool(kv.any()):
            self.kv.copy_(kv)
        self.export = ShmExport(
            node_id, host_id(), str(self.path), tuple(kv.shape), str(kv.dtype).removeprefix("torch.")
        )

    def close(self) -> None:
        """Unlink the file; mappings (ours and the writers') stay valid until they are dropped."""
        self.path.unlink(missing_ok=True)


def sweep_stale_files(directory: Path = SHM_DIR) -> int:
    """Remove pool files whose exporting process is gone (killed before it could unlink them)."""
    removed = 0
    for path in directory.glob("kvferry-kv-*"):
        match = _FILE_NAME.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("shm: removed %d pool files of processes that are gone", removed)
    return removed


def reachable(export: ShmExport) -> str | None:
    """None when this process can map `export`; else why not (for selection)."""
    if export.host_id != host_id():
        return "the pool is on another host (or another IPC namespace: run with `ipc: host`)"
    if not os.path.exists(export.path):
        return f"{export.path} does not exist here (another /dev/shm?)"
    return None


class MappedShmPool:
    """A decode node's pool file as seen from this (writer) process. Use ShmPeers to get one."""

    def __init__(self, export: ShmExport) -> None:
        why = reachable(export)
        if why is not None:
            raise PeerUnreachableError(f"shm: cannot map the pool of node {export.node_id}: {why}")
        self.export = export
        self.node_id = export.node_id
        self.kv: torch.Tensor | None = _map(Path(export.path), export.shape, getattr(torch, export.dtype))
        self.bytes_written = 0
        self.writes = 0

    @property
    def closed(self) -> bool:
        return self.kv is None

    def write(
        self, pages: torch.Tensor, page_ids: torch.Tensor | None = None, runs: list[int] | None = None
    ) -> float:
        """Copy `pages` ([N, 2, page_size, head_dim], travel order) into pool pages `page_ids` ([N]) or
        the pages of `runs` (encode_runs format; wins when both are given), as cuda_ipc's write does;
        the bytes are in the pool when this returns. Returns seconds."""
        if self.kv is None:
            raise PeerUnreachableError(f"shm: the mapping of node {self.node_id} is closed")
        if runs is not None:
            page_ids = decode_runs(runs)
        if page_ids is None:
            raise ValueError("write needs page_ids or runs")
        n = page_ids.numel()
        if tuple(pages.shape) != (n, *self.kv.shape[1:]) or pages.dtype != self.kv.dtype:
            raise ValueError(
                f"pages {tuple(pages.shape)} {pages.dtype} do not fit {n} pool pages of "
                f"{tuple(self.kv.shape[1:])} {self.kv.dtype}"
            )
        ids = page_ids.to(torch.int64)
        if n and bool(((ids < 0) | (ids >= self.kv.shape[0])).any()):
            raise ValueError(f"page ids outside the pool of {self.kv.shape[0]} pages")
        start = time.perf_counter()
        self.kv.index_copy_(0, ids, pages.to("cpu"))
        self.bytes_written += pages.numel() * pages.element_size()
        self.writes += 1
        return time.perf_counter() - start

    def close(self) -> None:
        self.kv = None


class ShmPeers(PeerMaps[MappedShmPool]):
    """The writer side's shm mappings, one per decode node."""

    def __init__(self) -> None:
        super().__init__(MappedShmPool)


def _map(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    element = torch.empty((), dtype=dtype).element_size()
    count = element
    for size in shape:
        count *= size
    raw = torch.from_file(str(path), shared=True, size=count, dtype=torch.uint8)
    return raw.view(dtype).view(shape)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
