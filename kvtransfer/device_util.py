"""What the device transports (`cuda_ipc`, `nccl`) share: their errors, waiting on the GPU under a
deadline, runs of consecutive page ids, a word view of pages, and a cheap on-device checksum."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from kvferry.engine.errors import UnavailableError


class TransferTimeoutError(UnavailableError):
    """The peer did not finish its side of a transfer in time (dead, hung or silent).

    `drained` says whether the local GPU work of the transfer finished after the abort: when it did not,
    the pages it may still write must not be handed to anyone else."""

    def __init__(self, message: str, drained: bool = True) -> None:
        super().__init__(message)
        self.drained = drained


class PeerUnreachableError(UnavailableError):
    """The transport cannot reach the peer: another host, no device access, its pool or its process is
    gone (e.g. the NCCL rendezvous store it hosts went away with it).

    Raised only when nothing of the failed transfer can still write local memory (`drained` is always
    True): when a stuck transfer's local GPU work did not finish after an abort, the transports raise
    TransferTimeoutError(drained=False) instead, so one check of `drained` decides about the pages."""

    drained = True


def host_id() -> str:
    """Who shares this machine's GPUs and shared memory: the kernel's boot id plus the IPC namespace.

    Two processes (or containers) with equal ids run on one host and see one /dev/shm (`ipc: host`),
    which CUDA IPC through torch needs; a hostname alone differs between containers of one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        ipc_ns = os.readlink("/proc/self/ns/ipc")
    except OSError:
        ipc_ns = ""
    return f"{boot}/{ipc_ns}"


def device_uuid(device: torch.device | int) -> str:
    """Stable name of a CUDA device across processes (indices depend on CUDA_VISIBLE_DEVICES)."""
    index = device if isinstance(device, int) else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_index(uuid: str) -> int | None:
    """This process's index of the CUDA device named `uuid`, or None when it cannot see it."""
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    return None


def page_runs(page_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids: (position in page_ids, first id, length). [5,6,7,2,3] ->
    [(0, 5, 3), (3, 2, 2)]. A fresh pool hands out consecutive pages, so a request is often one run."""
    ids = page_ids.detach().to("cpu", torch.int64).flatten()
    n = ids.numel()
    if n == 0:
        return []
    breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, n]
    first = ids[starts].tolist()
    return [(s, f, e - s) for s, f, e in zip(starts, first, ends)]


def host_runs(page_ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive ids, found on the host: (first ids, lengths). O(n) in numpy, no
    device round trip (CPU ids only)."""
    ids = (
        page_ids.detach().to(torch.int64).reshape(-1).numpy()
        if isinstance(page_ids, torch.Tensor)
        else page_ids
    )
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.size
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    breaks = np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return ids[starts], ends - starts


def encode_runs(page_ids: torch.Tensor) -> list[int]:
    """Page ids as flat [first, length, first, length, ...] runs: what a reservation reply carries to a
    cuda_ipc writer (a fresh pool's reservation is one run, whatever its size)."""
    firsts, lengths = host_runs(page_ids.detach().cpu() if isinstance(page_ids, torch.Tensor) else page_ids)
    flat = np.empty(2 * firsts.size, dtype=np.int64)
    flat[0::2], flat[1::2] = firsts, lengths
    return flat.tolist()


def first_pages_of_runs(runs: list[int], n: int) -> list[int]:
    """The runs of the first `n` pages of `runs` (encode_runs output): where an early reservation's
    sender writes its n pages. Raises ValueError when the runs hold fewer."""
    out: list[int] = []
    left = n
    for first, length in zip(runs[0::2], runs[1::2]):
        if left == 0:
            break
        take = min(length, left)
        out += [first, take]
        left -= take
    if left:
        raise ValueError(f"the runs hold {n - left} pages, not {n}")
    return out


def check_runs(
    runs: list[int] | torch.Tensor | np.ndarray, num_pages: int
) -> tuple[list[int], list[int], int]:
    """Validate encode_runs output against a pool of `num_pages`: (firsts, lengths, total pages).
    ValueError for an odd length, a negative or empty run, or a run outside the pool."""
    flat = np.asarray(runs.cpu() if isinstance(runs, torch.Tensor) else runs, dtype=np.int64).reshape(-1)
    if flat.size % 2:
        raise ValueError(f"page runs must be [first, length, ...] pairs, got {flat.size} numbers")
    firsts, lengths = flat[0::2], flat[1::2]
    if firsts.size and (
        int(firsts.min()) < 0 or int(lengths.min()) < 1 or int((firsts + lengths).max()) > num_pages
    ):
        raise ValueError(f"page runs outside the pool of {num_pages} pages (or empty runs)")
    return firsts.tolist(), lengths.tolist(), int(lengths.sum())


def decode_runs(runs: list[int] | torch.Tensor) -> torch.Tensor:
    """The [N] int64 page ids of encode_runs output."""
    flat = torch.as_tensor(runs, dtype=torch.int64).view(-1, 2)
    firsts, lengths = flat[:, 0], flat[:, 1]
    total = int(lengths.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(firsts - offsets, lengths) + torch.arange(total)


def as_words(pages: torch.Tensor) -> torch.Tensor:
    """Contiguous [N, ...] pages as an [N, W] view of the widest integer type dividing a page: copies
    and NCCL moves of int64 words are bit-exact whatever the pool dtype, and wider than 2-byte ones."""
    if not pages.is_contiguous():
        raise ValueError("pages must be contiguous to be moved as words")
    n = pages.shape[0]
    row = 1
    for size in pages.shape[1:]:
        row *= size
    raw = pages.reshape(n, row).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if raw.shape[1] % size == 0 and raw.storage_offset() % size == 0:
            return raw.view(dtype)
    return raw


_MASK64 = (1 << 64) - 1


def page_checksum(pages: torch.Tensor, chunk_pages: int = 1 << 14) -> int:
    """Position-weighted sum of 32-bit words, mod 2^64, computed where the pages are (no host copy).

    Sum over pages i of (i + 1) * (sum of page i's int32 words). Integer adds commute, so both ends get
    the same value whatever their reduction order; a moved, dropped or altered page changes it (not
    cryptographic: it catches transport and placement bugs, not an adversary). Pages of a whole number
    of 4-byte words only. On CUDA one Triton kernel reads each page once (kernels/page_checksum.py);
    this is its reference."""
    if pages.is_cuda and pages.is_contiguous():
        from kvferry.kernels.page_checksum import page_checksum as fused

        return fused(pages)
    total = 0
    for start in range(0, pages.shape[0], chunk_pages):
        total = (total + _weighted_sum(pages[start : start + chunk_pages], start)) & _MASK64
    return total


def pool_checksum(kv: torch.Tensor, page_ids: torch.Tensor, chunk_pages: int = 1 << 14) -> int:
    """page_checksum of pool pages `page_ids`, in that order: on CUDA read in place by the kernel,
    elsewhere gathered chunk by chunk (the reference)."""
    if kv.is_cuda and kv.is_contiguous():
        from kvferry.kernels.page_checksum import page_checksum as fused

        return fused(kv, page_ids)
    ids = page_ids.to(kv.device, torch.int64)
    total = 0
    for start in range(0, ids.numel(), chunk_pages):
        block = kv.index_select(0, ids[start : start + chunk_pages])
        total = (total + _weighted_sum(block, start)) & _MASK64
    return total


def _weighted_sum(block: torch.Tensor, start: int) -> int:
    words = as_words(block.contiguous())
    words = words.view(torch.uint8).view(torch.int32)
    per_page = words.sum(dim=1, dtype=torch.int64)
    weights = torch.arange(start + 1, start + 1 + block.shape[0], device=block.device, dtype=torch.int64)
    return int((per_page * weights).sum()) & _MASK64


def wait_for(done: Callable[[], bool], deadline: float | None, what: str) -> None:
    """Poll `done()` (e.g. a CUDA event's query) until it holds or the monotonic `deadline` passes.

    Spins briefly first (a handoff is a few ms), then sleeps 100 us between polls."""
    polls = 0
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise TransferTimeoutError(f"{what}: no completion before the deadline")
        polls += 1
        time.sleep(0 if polls < 200 else 1e-4)


def run_bounded(
    fn: Callable[[], object], seconds: float, name: str
) -> tuple[bool, object, BaseException | None]:
    """Run `fn()` in a daemon thread and wait for it at most `seconds`: (finished, result, error).

    For calls that may block inside native code with no deadline of their own (NCCL communicator
    set-up and abort, seen stuck on dead peers): past `seconds` the caller goes on and the thread is
    left behind, still running; it cannot be interrupted."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    if thread.is_alive():
        return False, None, None
    error = box.get("error")
    return True, box.get("result"), error if isinstance(error, BaseException) else None
