"""The `nccl` transport's device half: a 2-rank NCCL communicator per (prefill, decode) pair.

Rendezvous: the decode node hosts one TCPStore (NcclHub). A prefill node asks it, over gRPC, for an
NcclOffer (store address, a fresh pair id, chunk size); both ends then build a ProcessGroupNCCL of size 2
on a PrefixStore of that pair id (prefill = rank 0, decode = rank 1) and move one word to bring the
communicator and its P2P connection up. The pair is cached (by decode node on the prefill side, by pair
id on the decode side) and reused for every later request.

A transfer is the request's gathered pages, contiguous in travel order, cut into chunks of whole pages
of at most `chunk_bytes` (default 256 MiB: large sends run at link speed, and the receiver needs only
two chunk buffers): one send per chunk on the sender, and on the receiver one recv per chunk into a
double buffer whose scatter into the reserved pool pages overlaps the next chunk's recv. Both ends
issue their operations from their own CUDA stream (NCCL runs them on the process group's stream).

Timeouts: every wait polls a CUDA event against a deadline; when it passes, the communicator is aborted
(ncclCommAbort ends the kernels stuck on a dead or silent peer), the pair is dropped, and the transfer
fails with TransferTimeoutError instead of hanging the service. TORCH_NCCL_ASYNC_ERROR_HANDLING is set to
2 (clean up only) so that torch's own watchdog never tears the whole process down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from kvtransfer.device_util import (
    PeerUnreachableError,
    TransferTimeoutError,
    as_words,
    device_uuid,
    host_id,
    wait_for,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 << 20
DEFAULT_TIMEOUT_SECONDS = 30.0
DRAIN_SECONDS = 5.0  # after an abort, how long to wait for our own stream to finish
_SAFE_ERROR_HANDLING = ("0", "2")  # no handling / clean up only: never kill the process


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def chunk_plan(num_pages: int, page_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[start, end) page ranges of at most `chunk_bytes` each (at least one page); both ends compute
    the same plan from the manifest, so sends and recvs pair up without any extra message."""
    if page_bytes <= 0 or chunk_bytes <= 0:
        raise ValueError("page_bytes and chunk_bytes must be positive")
    per_chunk = max(1, chunk_bytes // page_bytes)
    return [(s, min(s + per_chunk, num_pages)) for s in range(0, num_pages, per_chunk)]


@dataclass(frozen=True)
class NcclOffer:
    """What a decode node hands a prefill node to set up a pair (travels over gRPC once per pair)."""

    pair_id: str
    store_host: str
    store_port: int
    chunk_bytes: int
    decode_node_id: str
    decode_device_uuid: str
    host_id: str

    def to_dict(self) -> dict:
        return asdict(self)


def _prepare_env() -> None:
    value = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    if value not in _SAFE_ERROR_HANDLING:
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)


class PendingTransfer:
    """NCCL operations issued on the pair's stream; `wait` blocks until done, the deadline, or abort."""

    def __init__(
        self, pair: NcclPair, event: torch.cuda.Event, nbytes: int, started: float, keep: list
    ) -> None:
        self.pair = pair
        self.event = event
        self.nbytes = nbytes
        self.started = started
        self._keep = keep  # tensors NCCL or the scatter still use

    def wait(self, timeout: float | None = None) -> float:
        """Seconds from issue to completion; TransferTimeoutError (pair aborted) past `timeout`."""
        timeout = self.pair.timeout if timeout is None else timeout
        try:
            wait_for(self.event.query, time.monotonic() + timeout, f"nccl pair {self.pair.pair_id}")
        except TransferTimeoutError:
            drained = self.pair.abort(drain_event=self.event)
            raise TransferTimeoutError(
                f"nccl pair {self.pair.pair_id} (rank {self.pair.rank}): the peer did not complete "
                f"{self.nbytes} bytes within {timeout:.1f} s; communicator aborted",
                drained=drained,
            ) from None
        self._keep.clear()
        return time.perf_counter() - self.started


class NcclPair:
    """One end of a 2-rank communicator: rank 0 sends (prefill), rank 1 receives (decode)."""

    def __init__(
        self,
        store: torch.distributed.Store,
        pair_id: str,
        rank: int,
        device: torch.device | int,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        import torch.distributed as dist

        _prepare_env()
        self.pair_id = pair_id
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device("cuda", device if isinstance(device, int) else torch.device(device).index)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.lock = threading.Lock()  # one transfer at a time: sends and recvs pair up in issue order
        self.broken = False
        self.transfers = 0
        self._store = store  # keep the client connection alive
        prefixed = dist.PrefixStore(f"kvferry/nccl/{pair_id}", store)
        options = dist.ProcessGroupNCCL.Options()
        # torch's watchdog is the last resort; our own deadline (self.timeout) aborts long before.
        options._timeout = timedelta(seconds=max(300.0, 10 * timeout))
        with torch.cuda.device(self.device):
            self._backend = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
            self.stream = torch.cuda.Stream(self.device)

    # ---- set-up ---------------------------------------------------------------------------------
    def warm_up(self, timeout: float | None = None) -> float:
        """Bring the communicator and its P2P connection up with one word (both ends must call).

        Creating the communicator blocks the calling thread inside NCCL until the peer joins (and, seen
        on the device machine, may never return), so it runs in a helper thread under the deadline:
        past it the pair is marked broken and PeerUnreachableError is raised; a thread stuck inside
        NCCL stays behind (it cannot be interrupted) but the service goes on."""
        timeout = self.timeout if timeout is None else timeout
        word = torch.full((1,), 7 if self.rank == 0 else 0, dtype=torch.int64, device=self.device)
        result: dict[str, object] = {}

        def bring_up() -> None:
            try:
                pending = self.start_send_tensor(word) if self.rank == 0 else self.start_recv_tensor(word)
                result["seconds"] = pending.wait(timeout)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result["error"] = e

        thread = threading.Thread(target=bring_up, name=f"nccl-setup-{self.pair_id[:8]}", daemon=True)
        thread.start()
        thread.join(timeout + DRAIN_SECONDS)
        if thread.is_alive():
            self.broken = True  # no abort(): it could wait on the lock the stuck thread holds
            raise PeerUnreachableError(
                f"nccl pair {self.pair_id} (rank {self.rank}): the communicator was not up within "
                f"{timeout:.1f} s (peer absent, or NCCL set-up stuck); pair dropped"
            )
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        if self.rank == 1 and int(word.item()) != 7:
            self.abort()
            raise PeerUnreachableError(f"nccl pair {self.pair_id}: warm-up word corrupted")
        return float(result["seconds"])  # type: ignore[arg-type]

    # ---- raw tensors --------------------------------------------------------------------------
    def start_send_tensor(self, tensor: torch.Tensor) -> PendingTransfer:
        return self._start([tensor], send=True)

    def start_recv_tensor(self, tensor: torch.Tensor) -> PendingTransfer:
        return self._start([tensor], send=False)

    def _start(self, tensors: list[torch.Tensor], send: bool) -> PendingTransfer:
        self._check()
        started = time.perf_counter()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            works = [self._op(t, send) for t in tensors]
            for work in works:
                work.wait()  # our stream waits for NCCL's (no host block)
            event = torch.cuda.Event()
            event.record(self.stream)
        return PendingTransfer(
            self, event, sum(t.numel() * t.element_size() for t in tensors), started, list(tensors)
        )

    def _op(self, tensor: torch.Tensor, send: bool):  # noqa: ANN202 - a c10d Work
        if not tensor.is_contiguous() or tensor.device != self.device:
            raise ValueError(f"NCCL buffers must be contiguous on {self.device}")
        try:
            if send:
                return self._backend.send([tensor], self.peer, 0)
            return self._backend.recv([tensor], self.peer, 0)
        except Exception as e:  # noqa: BLE001 - NCCL errors arrive as RuntimeError/DistBackendError
            self.abort()
            raise PeerUnreachableError(
                f"nccl pair {self.pair_id}: {'send' if send else 'recv'} failed: {e}"
            ) from e

    # ---- pages --------------------------------------------------------------------------------
    def start_send_pages(self, pages: torch.Tensor) -> PendingTransfer:
        """Send contiguous [N, ...] pages (travel order) in chunk_plan chunks."""
        n = pages.shape[0]
        if n == 0:
            return self._done(0)
        words = as_words(pages)
        plan = chunk_plan(n, words.shape[1] * words.element_size(), self.chunk_bytes)
        return self._start([words[s:e] for s, e in plan], send=True)

    def start_recv_pages(self, kv: torch.Tensor, page_ids: torch.Tensor) -> PendingTransfer:
        """Receive len(page_ids) pages into pool `kv` at `page_ids` (travel order), chunk by chunk."""
        self._check()
        n = page_ids.numel()
        if n == 0:
            return self._done(0)
        pool = as_words(kv)
        row = pool.shape[1]
        plan = chunk_plan(n, row * pool.element_size(), self.chunk_bytes)
        largest = max(e - s for s, e in plan)
        started = time.perf_counter()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            ids = page_ids.to(self.device, torch.int64, non_blocking=True)
            buffers = [torch.empty((largest, row), dtype=pool.dtype, device=self.device) for _ in plan[:2]]
            works = [None] * len(plan)
            works[0] = self._op(buffers[0][: plan[0][1] - plan[0][0]], send=False)
            for k, (s, e) in enumerate(plan):
                if k + 1 < len(plan):  # post the next recv before this chunk's scatter: they overlap
                    s2, e2 = plan[k + 1]
                    works[k + 1] = self._op(buffers[(k + 1) % 2][: e2 - s2], send=False)
                works[k].wait()
                pool.index_copy_(0, ids[s:e], buffers[k % 2][: e - s])
            event = torch.cuda.Event()
            event.record(self.stream)
        return PendingTransfer(self, event, n * row * pool.element_size(), started, [ids, *buffers])

    def send_pages(self, pages: torch.Tensor, timeout: float | None = None) -> float:
        with self.lock:
            seconds = self.start_send_pages(pages).wait(timeout)
            self.transfers += 1
            return seconds

    def recv_pages(self, kv: torch.Tensor, page_ids: torch.Tensor, timeout: float | None = None) -> float:
        with self.lock:
            seconds = self.start_recv_pages(kv, page_ids).wait(timeout)
            self.transfers += 1
            return seconds

    # ---- failure and shutdown -------------------------------------------------------------------
    def abort(self, drain_event: torch.cuda.Event | None = None) -> bool:
        """Abort the communicator (kernels stuck on the peer end) and mark the pair unusable.

        Returns whether our stream then drained (`drain_event` completed): only then may the pages it
        was going to write be reused."""
        if not self.broken:
            self.broken = True
            try:
                try:
                    self._backend.abort()
                except TypeError:  # older torch: abort(reason)
                    self._backend.abort(None)
            except Exception as e:  # noqa: BLE001
                log.warning("nccl pair %s: abort failed: %s", self.pair_id, e)
        if drain_event is None:
            return True
        try:
            wait_for(drain_event.query, time.monotonic() + DRAIN_SECONDS, "drain")
            return True
        except TransferTimeoutError:
            log.error(
                "nccl pair %s: stream did not drain after abort; its pages stay quarantined", self.pair_id
            )
            return False

    def close(self) -> None:
        """Drop the communicator (idempotent). Aborting is local and never waits on the peer."""
        if not self.broken:
            try:
                self.stream.synchronize()
            except Exception as e:  # noqa: BLE001
                log.warning("nccl pair %s: sync before close failed: %s", self.pair_id, e)
        self.abort()

    def _check(self) -> None:
        if self.broken:
            raise PeerUnreachableError(f"nccl pair {self.pair_id} was aborted; set up a new one")

    def _done(self, nbytes: int) -> PendingTransfer:
        event = torch.cuda.Event()
        with torch.cuda.device(self.device):
            event.record(self.stream)
        return PendingTransfer(self, event, nbytes, time.perf_counter(), [])


class NcclHub:
    """Decode side: hosts the rendezvous store and the pairs, one per prefill node, by pair id."""

    def __init__(
        self,
        device: torch.device | int,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        node_id: str | None = None,
    ) -> None:
        import torch.distributed as dist

        self.device = torch.device("cuda", device if isinstance(device, int) else torch.device(device).index)
        self.host = host
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.node_id = node_id or uuid.uuid4().hex
        self.port = port or _free_port(host)
        self.store = dist.TCPStore(
            host, self.port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
        )
        self.pairs: dict[str, NcclPair] = {}
        self._lock = threading.Lock()

    def offer(self) -> NcclOffer:
        return NcclOffer(
            pair_id=uuid.uuid4().hex,
            store_host=self.host,
            store_port=self.port,
            chunk_bytes=self.chunk_bytes,
            decode_node_id=self.node_id,
            decode_device_uuid=device_uuid(self.device),
            host_id=host_id(),
        )

    def accept(self, offer: NcclOffer) -> NcclPair:
        """Build rank 1 of `offer`'s pair and warm it up; blocks until the prefill end joins (call it
        off the event loop, e.g. in a thread, right after handing the offer out)."""
        pair = NcclPair(self.store, offer.pair_id, 1, self.device, self.timeout, offer.chunk_bytes)
        try:
            pair.warm_up()
        except BaseException:
            pair.close()
            raise
        with self._lock:
            self.pairs[offer.pair_id] = pair
        return pair

    def pair(self, pair_id: str) -> NcclPair:
        pair = self.pairs.get(pair_id)
        if pair is None or pair.broken:
            raise PeerUnreachableError(
                f"no live nccl pair {pair_id!r}; the prefill node must set up a new one"
            )
        return pair

    def close(self, pair_id: str) -> bool:
        with self._lock:
            pair = self.pairs.pop(pair_id, None)
        if pair is not None:
            pair.close()
        return pair is not None

    def close_all(self) -> None:
        for pair_id in list(self.pairs):
            self.close(pair_id)


class NcclPeers:
    """Prefill side: one pair per decode node, set up on first use and reused."""

    def __init__(self, device: torch.device | int, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.device = torch.device("cuda", device if isinstance(device, int) else torch.device(device).index)
        self.timeout = timeout
        self.pairs: dict[str, NcclPair] = {}
        self._stores: dict[tuple[str, int], torch.distributed.Store] = {}
        self._lock = threading.Lock()
        self.opened = 0

    def get(self, decode_node_id: str) -> NcclPair | None:
        pair = self.pairs.get(decode_node_id)
        return None if pair is None or pair.broken else pair

    def connect(self, offer: NcclOffer) -> NcclPair:
        """Rank 0 of `offer`'s pair, warmed up (the decode end runs NcclHub.accept meanwhile)."""
        import torch.distributed as dist

        with self._lock:
            key = (offer.store_host, offer.store_port)
            store = self._stores.get(key)
            if store is None:
                store = dist.TCPStore(
                    offer.store_host,
                    offer.store_port,
                    is_master=False,
                    wait_for_workers=False,
                    timeout=timedelta(seconds=self.timeout),
                )
                self._stores[key] = store
            pair = NcclPair(store, offer.pair_id, 0, self.device, self.timeout, offer.chunk_bytes)
        try:
            pair.warm_up()
        except BaseException:
            pair.close()
            raise
        with self._lock:
            old = self.pairs.pop(offer.decode_node_id, None)
            self.pairs[offer.decode_node_id] = pair
            self.opened += 1
        if old is not None:
            old.close()
        return pair

    def close(self, decode_node_id: str) -> bool:
        with self._lock:
            pair = self.pairs.pop(decode_node_id, None)
        if pair is not None:
            pair.close()
        return pair is not None

    def close_all(self) -> None:
        for node_id in list(self.pairs):
            self.close(node_id)
        self._stores.clear()
