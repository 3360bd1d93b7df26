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

Failures never hang a service and always surface as UNAVAILABLE-class errors:
- every wait (the pair's lock, each transfer, bringing a pair up, the drain after an abort) polls
  against a deadline; past it the communicator is aborted (ncclCommAbort ends kernels stuck on a dead or
  silent peer) and the pair dropped;
- the abort itself runs in a helper thread that nobody waits for (ncclCommAbort and torch's abort
  have been seen to block on dead peers); what is waited for, under DRAIN_SECONDS, is our own stream:
  only a drained stream lets the pages it was writing be reused;
- any c10d or CUDA error while a pair is set up or used (the decode node's TCPStore dies with its
  process, so store calls fail with DistNetworkError "Connection was likely closed") aborts the pair and
  becomes PeerUnreachableError, or TransferTimeoutError(drained=False) when our stream did not drain,
  so the pages it may still write stay quarantined;
- the prefill end asks the decode node's store whether it is still there before each send (one round
  trip): a dead decode process fails the transfer at once, before NCCL kernels get stuck on it;
- TORCH_NCCL_ASYNC_ERROR_HANDLING is 2 (clean up only) and torch's heartbeat monitor is off by default:
  torch never kills the process; the deadlines above replace its watchdog.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from kvferry.engine.errors import UnavailableError
from kvferry.kvtransfer.device_util import (
    PeerUnreachableError,
    TransferTimeoutError,
    as_words,
    device_uuid,
    host_id,
    run_bounded,
    wait_for,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 << 20
DEFAULT_TIMEOUT_SECONDS = 30.0
DRAIN_SECONDS = 5.0  # after an abort: how long to wait for our own stream (and the abort) to finish
_SAFE_ERROR_HANDLING = ("0", "2")  # no handling / clean up only: never kill the process
_ALIVE_KEY = "kvferry/nccl/alive"  # only checked for: any answer means the store's process lives


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _short(error: BaseException) -> str:
    """The first line of an error: c10d errors carry a C++ stack trace after it."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


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
    # torch's heartbeat monitor polls the rendezvous store (gone with the decode process: endless
    # "recvValue failed" logs) and kills the whole process when the watchdog looks stuck. Our deadlines
    # replace it; so no dumps on timeout either (they, too, go through the store).
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    if os.environ.get("TORCH_NCCL_BLOCKING_WAIT", "0") not in ("0", ""):
        log.warning("TORCH_NCCL_BLOCKING_WAIT set: turned off, the nccl transport's waits must poll")
        os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "0"


def connect_store(host: str, port: int, timeout: float) -> torch.distributed.Store:
    """A client of the decode node's rendezvous store; PeerUnreachableError when it does not answer
    within `timeout` (the decode process is gone, or the address is wrong)."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout)
        )
    except Exception as e:  # noqa: BLE001 - DistNetworkError, DistStoreError, TimeoutError...
        raise PeerUnreachableError(
            f"nccl: the decode node's rendezvous store at {host}:{port} is unreachable ({_short(e)})"
        ) from e


def check_store(store: torch.distributed.Store, where: str) -> None:
    """One round trip to the store; PeerUnreachableError when it fails (its process is gone)."""
    try:
        store.check([_ALIVE_KEY])
    except Exception as e:  # noqa: BLE001 - c10d errors only say "Connection was likely closed"
        raise PeerUnreachableError(
            f"{where}: the decode node's rendezvous store stopped answering ({_short(e)}); "
            "its process is gone"
        ) from e


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
        """Seconds from issue to completion. Past `timeout` the pair is aborted and
        TransferTimeoutError(drained=...) is raised; an error while waiting aborts it too."""
        timeout = self.pair.timeout if timeout is None else timeout
        what = f"{self.nbytes} bytes"
        try:
            wait_for(self.event.query, time.monotonic() + timeout, f"nccl pair {self.pair.pair_id}")
        except TransferTimeoutError:
            raise self.pair._failed(
                f"the peer did not complete {what} within {timeout:.1f} s", self.event, timed_out=True
            ) from None
        except Exception as e:  # noqa: BLE001 - a CUDA error surfacing in the query
            raise self.pair._failed(f"waiting for {what} failed ({_short(e)})", self.event) from e
        self._keep.clear()
        return time.perf_counter() - self.started


class NcclPair:
    """One end of a 2-rank communicator: rank 0 sends (prefill), rank 1 receives (decode).

    `check_peer` (default: rank 0, whose store lives in the peer's process) asks the store whether the
    peer is alive before each send."""

    def __init__(
        self,
        store: torch.distributed.Store,
        pair_id: str,
        rank: int,
        device: torch.device | int,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        check_peer: bool | None = None,
    ) -> None:
        import torch.distributed as dist

        _prepare_env()
        self.pair_id = pair_id
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device("cuda", device if isinstance(device, int) else torch.device(device).index)
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.check_peer = rank == 0 if check_peer is None else check_peer
        self.lock = threading.Lock()  # one transfer at a time: sends and recvs pair up in issue order
        self.broken = False
        self.transfers = 0
        self._state = threading.Lock()
        self._abort_thread: threading.Thread | None = None
        self._store = store  # keep the client connection alive
        options = dist.ProcessGroupNCCL.Options()
        # torch's watchdog is the last resort; our own deadline (self.timeout) aborts long before.
        options._timeout = timedelta(seconds=max(300.0, 10 * timeout))
        try:
            prefixed = dist.PrefixStore(f"kvferry/nccl/{pair_id}", store)
            with torch.cuda.device(self.device):
                self._backend = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
                self.stream = torch.cuda.Stream(self.device)
        except Exception as e:  # noqa: BLE001 - store or NCCL errors: the pair cannot exist
            self.broken = True
            raise PeerUnreachableError(
                f"nccl pair {pair_id} (rank {rank}): creating the process group failed ({_short(e)})"
            ) from e

    # ---- set-up ---------------------------------------------------------------------------------
    def warm_up(self, timeout: float | None = None) -> float:
        """Bring the communicator and its P2P connection up with one word (both ends must call).

        Creating the communicator blocks the calling thread inside NCCL until the peer joins (and may
        never return when the peer is gone), so it runs in a helper thread under the deadline: past it
        the pair is aborted (which ends a stuck set-up) and PeerUnreachableError is raised."""
        timeout = self.timeout if timeout is None else timeout
        word = torch.full((1,), 7 if self.rank == 0 else 0, dtype=torch.int64, device=self.device)

        def bring_up() -> float:
            pending = self.start_send_tensor(word) if self.rank == 0 else self.start_recv_tensor(word)
            return pending.wait(timeout)

        # a failed wait itself aborts and drains (up to DRAIN_SECONDS) before raising
        finished, seconds, error = run_bounded(
            bring_up, timeout + DRAIN_SECONDS + 1.0, f"nccl-setup-{self.pair_id[:8]}"
        )
        if not finished:
            self.abort()
            raise PeerUnreachableError(
                f"nccl pair {self.pair_id} (rank {self.rank}): the communicator was not up within "
                f"{timeout:.1f} s (peer absent, or NCCL set-up stuck); pair aborted"
            )
        if error is not None:
            if isinstance(error, UnavailableError):
                raise error
            raise self._failed(f"bringing the pair up failed ({_short(error)})") from error
        if self.rank == 1 and int(word.item()) != 7:
            self.abort()
            raise PeerUnreachableError(f"nccl pair {self.pair_id}: warm-up word corrupted")
        return float(seconds)  # type: ignore[arg-type]

    def ping(self) -> None:
        """Rank 0: PeerUnreachableError (pair aborted) unless the decode node's store still answers."""
        self._check()
        try:
            check_store(self._store, f"nccl pair {self.pair_id} (rank {self.rank})")
        except PeerUnreachableError:
            self.abort()  # nothing in flight: returns at once
            raise

    # ---- raw tensors --------------------------------------------------------------------------
    def start_send_tensor(self, tensor: torch.Tensor) -> PendingTransfer:
        return self._start([tensor], send=True)

    def start_recv_tensor(self, tensor: torch.Tensor) -> PendingTransfer:
        return self._start([tensor], send=False)

    def _start(self, tensors: list[torch.Tensor], send: bool) -> PendingTransfer:
        for t in tensors:
            if not t.is_contiguous() or t.device != self.device:
                raise ValueError(f"NCCL buffers must be contiguous on {self.device}")
        self._check()
        started = time.perf_counter()
        try:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                works = [self._op(t, send) for t in tensors]
                for work in works:
                    work.wait()  # our stream waits for NCCL's (no host block)
                event = torch.cuda.Event()
                event.record(self.stream)
        except Exception as e:  # noqa: BLE001 - c10d errors (DistBackendError, DistNetworkError...)
            raise self._failed(f"{'send' if send else 'recv'} could not be issued ({_short(e)})") from e
        return PendingTransfer(
            self, event, sum(t.numel() * t.element_size() for t in tensors), started, list(tensors)
        )

    def _op(self, tensor: torch.Tensor, send: bool):  # noqa: ANN202 - a c10d Work
        if send:
            return self._backend.send([tensor], self.peer, 0)
        return self._backend.recv([tensor], self.peer, 0)

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
        try:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                ids = page_ids.to(self.device, torch.int64, non_blocking=True)
                buffers = [
                    torch.empty((largest, row), dtype=pool.dtype, device=self.device) for _ in plan[:2]
                ]
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
        except torch.OutOfMemoryError as e:
            # the sender's chunks now have no recv: the pair is out of step and must go either way
            failure = self._failed(f"no memory for the receive buffers ({_short(e)})")
            if not failure.drained:
                raise failure from e
            raise
        except Exception as e:  # noqa: BLE001 - c10d errors
            raise self._failed(f"recv could not be issued ({_short(e)})") from e
        return PendingTransfer(self, event, n * row * pool.element_size(), started, [ids, *buffers])

    def send_pages(self, pages: torch.Tensor, timeout: float | None = None) -> float:
        """Send and wait; the whole call (the pair's lock, the peer check, the transfer) is under
        `timeout` (default: the pair's)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._exclusive(deadline):
            if self.check_peer:
                self.ping()
            seconds = self.start_send_pages(pages).wait(max(0.0, deadline - time.monotonic()))
            self.transfers += 1
            return seconds

    def recv_pages(self, kv: torch.Tensor, page_ids: torch.Tensor, timeout: float | None = None) -> float:
        """Receive and wait; the whole call is under `timeout` (default: the pair's). On failure the
        pair is aborted: PeerUnreachableError or TransferTimeoutError(drained=True) leave the pages
        free to reuse, TransferTimeoutError(drained=False) means they must stay quarantined."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._exclusive(deadline):
            seconds = self.start_recv_pages(kv, page_ids).wait(max(0.0, deadline - time.monotonic()))
            self.transfers += 1
            return seconds

    @contextmanager
    def _exclusive(self, deadline: float) -> Iterator[None]:
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferTimeoutError(
                f"nccl pair {self.pair_id}: another transfer still held the pair at the deadline",
                drained=True,  # nothing of this transfer was issued
            )
        try:
            yield
        finally:
            self.lock.release()

    # ---- failure and shutdown -------------------------------------------------------------------
    def _failed(
        self, what: str, drain_event: torch.cuda.Event | None = None, timed_out: bool = False
    ) -> PeerUnreachableError | TransferTimeoutError:
        """Abort the pair after a failure and build the error to raise: PeerUnreachableError when our
        stream drained, else (or on a deadline) TransferTimeoutError with `drained`."""
        if drain_event is None:
            try:
                drain_event = torch.cuda.Event()
                with torch.cuda.device(self.device):
                    drain_event.record(self.stream)  # after whatever this transfer issued
            except Exception as e:  # noqa: BLE001 - CUDA itself is failing: assume the worst
                log.error("nccl pair %s: cannot record a drain event: %s", self.pair_id, _short(e))
                drain_event = None
                self.abort()
                drained = False
            else:
                drained = self.abort(drain_event=drain_event)
        else:
            drained = self.abort(drain_event=drain_event)
        where = f"nccl pair {self.pair_id} (rank {self.rank})"
        if timed_out or not drained:
            tail = "" if drained else "; our stream did not drain, its pages must stay quarantined"
            return TransferTimeoutError(f"{where}: {what}; communicator aborted{tail}", drained=drained)
        return PeerUnreachableError(f"{where}: {what}; communicator aborted")

    def abort(self, drain_event: torch.cuda.Event | None = None) -> bool:
        """Abort the communicator (kernels stuck on the peer end) and mark the pair unusable.

        The abort runs in a helper thread (ncclCommAbort can block on a dead peer), so this returns
        within DRAIN_SECONDS whatever NCCL does. With `drain_event`, returns whether our stream then
        drained (the event completed): only then may the pages it was going to write be reused.
        Without one there is nothing to wait for and it returns at once."""
        with self._state:
            first = self._abort_thread is None
            self.broken = True
            if first:
                self._abort_thread = threading.Thread(
                    target=self._abort_backend, name=f"nccl-abort-{self.pair_id[:8]}", daemon=True
                )
                self._abort_thread.start()
        if drain_event is None:
            return True
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            wait_for(drain_event.query, deadline, "drain")
        except Exception as e:  # noqa: BLE001 - TransferTimeoutError, or a CUDA error
            log.error(
                "nccl pair %s: stream did not drain after abort (%s); its pages stay quarantined",
                self.pair_id,
                _short(e),
            )
            return False
        return True

    def _abort_backend(self) -> None:
        started = time.monotonic()
        try:
            abort = getattr(self._backend, "abort", None) or self._backend._abort
            try:
                abort()
            except TypeError:  # older torch: abort(reason)
                abort(None)
        except Exception as e:  # noqa: BLE001
            log.warning("nccl pair %s: abort failed: %s", self.pair_id, _short(e))
        seconds = time.monotonic() - started
        if seconds > DRAIN_SECONDS:
            log.warning("nccl pair %s: the communicator abort took %.1f s", self.pair_id, seconds)

    def close(self) -> None:
        """Drop the communicator (idempotent). Waits (bounded) for our stream, then aborts: aborting
        is local and never waits on the peer."""
        if not self.broken:
            try:
                event = torch.cuda.Event()
                with torch.cuda.device(self.device):
                    event.record(self.stream)
                wait_for(event.query, time.monotonic() + DRAIN_SECONDS, "close")
            except Exception as e:  # noqa: BLE001
                log.warning("nccl pair %s: waiting for the stream before close failed: %s", self.pair_id, e)
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
    """Decode side: hosts the rendezvous store and the pairs, one per prefill node, by pair id.

    The store lives (and dies) with this process; its timeout bounds every store call of the pairs."""

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
        """Build rank 1 of `offer`'s pair and warm it up; blocks (at most the timeout plus the abort's
        drain) until the prefill end joins: call it off the event loop, right after handing the offer
        out. PeerUnreachableError when the prefill end never comes."""
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
        self._addresses: dict[str, tuple[str, int]] = {}  # decode node -> its store
        self._lock = threading.Lock()
        self.opened = 0

    def get(self, decode_node_id: str) -> NcclPair | None:
        pair = self.pairs.get(decode_node_id)
        return None if pair is None or pair.broken else pair

    def _store(self, offer: NcclOffer) -> torch.distributed.Store:
        """The cached client of the offer's store if it still answers, else a new one."""
        key = (offer.store_host, offer.store_port)
        with self._lock:
            store = self._stores.get(key)
        if store is not None:
            try:
                check_store(store, "nccl")
                return store
            except PeerUnreachableError:  # that store's process is gone; maybe a new one listens there
                with self._lock:
                    self._stores.pop(key, None)
        store = connect_store(offer.store_host, offer.store_port, self.timeout)
        with self._lock:
            self._stores[key] = store
        return store

    def connect(self, offer: NcclOffer) -> NcclPair:
        """Rank 0 of `offer`'s pair, warmed up (the decode end runs NcclHub.accept meanwhile).
        PeerUnreachableError when the decode node or its store does not answer in time."""
        key = (offer.store_host, offer.store_port)
        try:
            pair = NcclPair(
                self._store(offer), offer.pair_id, 0, self.device, self.timeout, offer.chunk_bytes
            )
        except PeerUnreachableError:
            self._forget_store(key)
            raise
        try:
            pair.warm_up()
        except BaseException:
            pair.close()
            self._forget_store(key)
            raise
        with self._lock:
            old = self.pairs.pop(offer.decode_node_id, None)
            self.pairs[offer.decode_node_id] = pair
            self._addresses[offer.decode_node_id] = key
            self.opened += 1
        if old is not None:
            old.close()
        return pair

    def _forget_store(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._stores.pop(key, None)

    def close(self, decode_node_id: str) -> bool:
        """Drop the pair with a decode node (e.g. after a failed transfer) and its store client."""
        with self._lock:
            pair = self.pairs.pop(decode_node_id, None)
            key = self._addresses.pop(decode_node_id, None)
            if key is not None and key not in self._addresses.values():
                self._stores.pop(key, None)
        if pair is not None:
            pair.close()
        return pair is not None

    def close_all(self) -> None:
        for node_id in list(self.pairs):
            self.close(node_id)
        self._stores.clear()
