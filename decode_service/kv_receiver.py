"""The decode node's receiving end of the KV handoff: reservations under leases, the pages' arrival
(PushKV for grpc, CommitKV for the direct transports), their verification, the commit that starts
decoding, and the quarantine of pages an aborted NCCL receive may still write.

Each request keeps one record here, an `IncomingRequest` (its reservation and its token stream), from
ReserveKV until its Decode stream ends:

    ReserveKV ─▶ AWAITING_PAGES ─PushKV / CommitKV─▶ RECEIVING ─verified─▶ COMMITTED ─Decode─▶ DECODING

Before DECODING a lease runs; `abort` (an Abort call, a failed check, a cancelled call, the lease) frees
the record and its pages in any state; a DECODING record ends with its stream (`ended`). Every engine
call goes through the engine thread; the records live on the event loop, and the engine thread looks
them up to publish tokens. The lifecycle on both nodes, step by step: docs/kv-handoff.md.

A request whose KV starts with a cached context (ReserveKVRequest.context) shares the context's pages
when the engine's context cache holds it (only the request's own pages travel), else receives them
ahead of its own, and the commit caches them. A ReserveKV for a context another record is receiving
waits (at most one lease) for that record to commit or end, then shares what it brought.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from kvferry.decode_service.direct_receiver import DirectReceiver
from kvferry.decode_service.settings import DecodeSettings
from kvferry.decode_service.token_stream import TokenStream
from kvferry.engine.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError, require
from kvferry.engine.kv_handoff import ContextRef, KVLayout
from kvferry.engine.llm_engine import ContextInFlight, LLMEngine
from kvferry.engine.sequence import Sequence
from kvferry.kvtransfer import (
    ModelSpec,
    Reservation,
    ReservationNotFoundError,
    ReservationTable,
    bytes_to_pages,
    check_manifest,
)
from kvferry.kvtransfer.device_util import TransferTimeoutError, pool_checksum
from kvferry.kvtransfer.errors import TransferIntegrityError
from kvferry.kvtransfer.manifest import (
    CHECKSUM_ALGORITHM,
    DEVICE_CHECKSUM_ALGORITHM,
    check_early_manifest,
    context_ref,
)
from kvferry.kvtransfer.transport import EarlyFinal, run_to_end
from kvferry.serving.convert import sampling_from_proto
from kvferry.serving.engine_worker import EngineWorker
from kvferry.v1 import decode_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class IncomingRequest(Reservation):
    """One request on this decode node: its reservation (pages, lease, bytes received) and the stream
    its tokens leave through."""

    stream: TokenStream = field(kw_only=True)
    context_cache: str = field(default="off", kw_only=True)  # its cached context here: hit, miss or off

    def publish(self, engine: LLMEngine, seq: Sequence) -> None:
        """Engine thread: `seq`'s new tokens, and its final output once it finished."""
        self.stream.publish(seq, engine.output(seq) if seq.is_finished else None)


class KVReceiver:
    def __init__(self, settings: DecodeSettings, worker: EngineWorker, direct: DirectReceiver) -> None:
        self.settings = settings
        self.worker = worker
        self.direct = direct
        self.records: ReservationTable[IncomingRequest] = ReservationTable()
        self.spec: ModelSpec | None = None  # set at start, once the model is loaded and warm
        self.quarantined_pages = 0  # pages a failed NCCL receive may still write: never reused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._freed = asyncio.Event()  # set (and replaced) whenever a request gives its pages back
        self._settled = asyncio.Event()  # set (and replaced) whenever a record receiving a context ends

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, spec: ModelSpec) -> None:
        """Take requests from now on (the engine is loaded and warm); runs on the event loop."""
        self._loop = asyncio.get_running_loop()
        self.spec = spec
        self._sweeper = asyncio.create_task(self._sweep_leases())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for record in self.records.snapshot():
            self.abort(record.id)

    def ready_engine(self) -> LLMEngine:
        """The engine once loaded and warmed; UNAVAILABLE before."""
        if self.spec is None or self.worker.engine is None:
            raise UnavailableError("the decode service is still loading its model")
        return self.worker.engine

    # ---- reserve ------------------------------------------------------------------------------
    async def reserve(self, request: decode_pb2.ReserveKVRequest) -> IncomingRequest:
        checked = time.perf_counter()
        engine = self.ready_engine()
        assert self.spec is not None and self._loop is not None
        transport = self.direct.check_transport(request.transport, request.nccl_pair_id)
        if request.early:  # the layout comes with CommitKV
            require(
                transport != "grpc",
                "early",
                "an early reservation needs a direct transport (its pages are laid out at CommitKV)",
            )
            early_pages = check_early_manifest(request.manifest, self.spec)
        else:
            layout = check_manifest(request.manifest, self.spec)  # before anything is reserved
        algorithm = CHECKSUM_ALGORITHM if transport == "grpc" else DEVICE_CHECKSUM_ALGORITHM
        require(
            request.manifest.checksum_algorithm == algorithm,
            "manifest.checksum_algorithm",
            f"must be {algorithm!r} for the {transport} transport, got {request.manifest.checksum_algorithm!r}",
        )
        context = None
        if request.HasField("context"):
            require(not request.early, "context", "an early reservation cannot carry a cached context")
            context = context_ref(request.context, self.spec)
        sampling = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        first = request.first_token_id
        rid = uuid.uuid4().hex
        loop = self._loop
        wait_for_context = True  # the waiter rule: wait for another record's arriving context once

        ran: list[float] = []  # when the engine thread started and ended `reserve`

        def reserve(engine: LLMEngine) -> IncomingRequest:
            ran.append(time.perf_counter())
            if request.early:
                page_ids = engine.reserve_import_early(prompt, sampling, early_pages, rid)
            else:
                page_ids = engine.reserve_import(
                    prompt, first, sampling, layout, rid, context, wait_if_arriving=wait_for_context
                )
            seq = engine.requests[rid]
            kv = seq.kv
            assert kv is not None
            shared = 0 if seq.context_entry is None else seq.context_entry.num_pages  # not this request's
            record = IncomingRequest(
                request.request_id, request.manifest, page_ids, kv.num_pages_held + kv.reserved - shared,
                self.settings.lease_seconds, id=rid, transport=transport, nccl_pair_id=request.nccl_pair_id,
                early=request.early,
                stream=TokenStream(loop, engine.tokenizer, sampling, None if request.early else first),
                context_cache=seq.stats.context_cache,
            )  # fmt: skip
            if seq.stats.context_cache == "miss":  # the context's pages travel ahead of the manifest's
                assert context is not None and self.spec is not None
                record.context_pages = context.num_pages
                record.context_bytes = context.num_pages * self.spec.bytes_per_page
            ran.append(time.perf_counter())
            return record

        needed = engine.import_pages_needed(
            len(prompt), sampling, layout=None if request.early else layout,
            max_pages=early_pages if request.early else None,
        ) + (0 if context is None else context.num_pages)  # fmt: skip
        hold_until = time.monotonic() + self.settings.reserve_hold_seconds
        while True:
            asked = time.perf_counter()
            try:
                if engine.pool.num_cached == 0:  # else cached contexts may give room: the engine decides
                    engine.pool.check_room(needed)  # a stale read off the engine thread, which decides
                record = await self.worker.call(reserve)
                break
            except ResourceExhaustedError as e:
                if not e.retryable or not await self._pages_freed(hold_until):
                    raise
                ran.clear()
            except ContextInFlight as e:
                assert context is not None
                await self._context_settled(engine, context, e.request_id)
                wait_for_context = False
                ran.clear()
            except asyncio.CancelledError:  # runs after `reserve` if it ran; no one reads its stream
                self.worker.submit(lambda e: self._abort_on_engine(e, rid, None))
                raise
        self.records.add(record)
        done = time.perf_counter()
        log.info(
            "reserved %s for %s: %d pages + %d for growth, lease %.1f s, in %.1f ms (checks %.1f, "
            "waiting for the engine thread %.1f, on it %.1f, back %.1f)",
            rid, request.request_id, record.page_ids.numel(),
            record.reserved_pages - record.page_ids.numel(), record.lease_seconds,
            1e3 * (done - checked), 1e3 * (asked - checked), 1e3 * (ran[0] - asked),
            1e3 * (ran[1] - ran[0]), 1e3 * (done - ran[1]),
        )  # fmt: skip
        return record

    async def _pages_freed(self, until: float) -> bool:
        """Wait until a request frees pages (it finished or was aborted), at most until `until`
        (monotonic); False when the time ran out first. A ReserveKV that finds the pool full waits here
        instead of making its caller poll."""
        left = until - time.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(self._freed.wait(), left)
        except TimeoutError:
            return False
        return True

    async def _context_settled(self, engine: LLMEngine, context: ContextRef, receiver: str) -> None:
        """Wait until the record receiving `context` (its engine request `receiver`) committed or
        ended, at most one lease: then the context is cached here, or the caller receives it itself."""
        until = time.monotonic() + self.settings.lease_seconds
        log.info("context %s is arriving with %s; waiting for it", context.handle[:12], receiver)
        while engine.context_cache.computing(context.handle) == receiver:  # a dict read: atomic
            left = until - time.monotonic()
            if left <= 0:
                return
            settled = self._settled
            try:
                await asyncio.wait_for(settled.wait(), left)
            except TimeoutError:
                return

    def context_settled(self) -> None:
        """Engine thread: a record that was receiving a context committed or ended."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._signal_settled)

    def _signal_settled(self) -> None:
        self._settled.set()
        self._settled = asyncio.Event()

    def pages_returned(self) -> None:
        """Engine thread: a request gave its pages back (it finished or was aborted); every ReserveKV
        waiting for room wakes up."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._signal_freed)

    def _signal_freed(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    # ---- receive and commit -------------------------------------------------------------------
    async def receive(self, chunks: AsyncIterator[decode_pb2.PushKVRequest]) -> decode_pb2.PushKVResponse:
        """The grpc transport's receiving end: chunks -> verified bytes -> pool -> decoding starts."""
        record: IncomingRequest | None = None
        try:
            async for chunk in chunks:
                if record is None:
                    candidate = self.records.get(chunk.reservation_id)
                    candidate.begin_receive()
                    record = candidate
                    started = time.perf_counter()
                    _take_checksum(record, chunk.checksum if chunk.HasField("checksum") else None)
                elif chunk.reservation_id not in ("", record.id):
                    raise InvalidArgumentError(
                        "reservation_id: one PushKV stream carries one reservation", field="reservation_id"
                    )
                if len(chunk.data) > self.settings.max_chunk_bytes:
                    raise InvalidArgumentError(
                        f"data: chunk of {len(chunk.data)} bytes exceeds max_chunk_bytes {self.settings.max_chunk_bytes}",
                        field="data",
                    )
                self.records.get(record.id)  # NOT_FOUND if the lease ran out meanwhile
                record.accept(chunk.offset, chunk.data)
            if record is None:
                raise InvalidArgumentError(
                    "reservation_id: the PushKV stream carried no chunk", field="reservation_id"
                )
            assert self.spec is not None
            payload = record.verified_payload()  # count and checksum, before any page is written
            await self._commit(record, bytes_to_pages(payload, self.spec, record.travel_pages))
        except BaseException:
            if record is not None:
                self.abort(record.id)
            raise
        return decode_pb2.PushKVResponse(
            bytes_received=record.received, transfer_seconds=time.perf_counter() - started
        )

    async def commit_direct(
        self, reservation_id: str, checksum: int | None = None, final: EarlyFinal | None = None
    ) -> decode_pb2.CommitKVResponse:
        """A direct transport's commit: receive the pages (nccl) or find them written (cuda_ipc, shm),
        verify their sum64 where they are (`checksum`, or the manifest's when None), start decoding.
        An early reservation needs `final` (the manifest of what was written and the first token): its
        pages are the first ones of the reservation, laid out at the commit. Any failure frees the
        reservation, except pages an aborted NCCL receive may still write, which stay quarantined."""
        record = self.records.get(reservation_id)
        placement = None  # an early reservation's first token and layout
        if record.early:
            try:
                layout = self._early_layout(record, final)
            except BaseException:
                self.abort(record.id)
                raise
            assert final is not None
            record.manifest = final.manifest  # what was written: its first pages
            placement = (final.first_token_id, layout)
        if record.context_pages and checksum is None:
            self.abort(record.id)
            raise InvalidArgumentError(
                "checksum: CommitKV must carry the sum64 of every page sent when a context's pages travel",
                field="checksum",
            )
        expected = record.manifest.checksum if checksum is None else checksum
        record.begin_receive(direct=True)
        started = time.perf_counter()
        engine = self.ready_engine()
        page_ids = record.page_ids[: record.travel_pages].to(engine.pool.kv.device)
        received = verified = started
        try:
            if record.transport == "nccl":
                pair = await self.direct.nccl_pair(record.nccl_pair_id)
                await run_to_end(
                    pair.recv_pages, engine.pool.kv, page_ids, self.settings.nccl_timeout_seconds
                )
            received = time.perf_counter()
            if self.settings.verify_direct_writes and page_ids.numel():
                found = await run_to_end(pool_checksum, engine.pool.kv, page_ids)
                if found != expected:
                    raise TransferIntegrityError(
                        f"checksum mismatch: sum64 of the {record.transport} pages in the pool is "
                        f"{found:#018x}, the sender says {expected:#018x}"
                    )
            record.received = record.travel_bytes
            verified = time.perf_counter()
            await self._commit(record, None, placement)
        except TransferTimeoutError as e:
            if e.drained:
                self.abort(record.id)
            else:
                self._quarantine(record)
            raise
        except BaseException:
            self.abort(record.id)
            raise
        done = time.perf_counter()
        log.info(
            "committed %s (%d bytes over %s): receive %.1f ms, sum64 %.1f ms, commit %.1f ms",
            record.id, record.received, record.transport, 1e3 * (received - started),
            1e3 * (verified - received), 1e3 * (done - verified),
        )  # fmt: skip
        return decode_pb2.CommitKVResponse(bytes_received=record.received, transfer_seconds=done - started)

    def _early_layout(self, record: IncomingRequest, final: EarlyFinal | None) -> KVLayout:
        """The layout an early reservation's commit brings, checked against this model and the pages
        reserved."""
        assert self.spec is not None
        require(final is not None, "manifest", "CommitKV of an early reservation needs the final manifest")
        assert final is not None
        layout = check_manifest(final.manifest, self.spec)
        require(
            final.manifest.checksum_algorithm == DEVICE_CHECKSUM_ALGORITHM,
            "manifest.checksum_algorithm",
            f"must be {DEVICE_CHECKSUM_ALGORITHM!r} for the {record.transport} transport",
        )
        require(
            layout.num_pages <= record.page_ids.numel(),
            "manifest.num_pages",
            f"is {layout.num_pages} but the early reservation holds {record.page_ids.numel()} pages",
        )
        return layout

    def _quarantine(self, record: IncomingRequest) -> None:
        """Forget the record but keep its pages held forever: an aborted NCCL receive that did not
        drain may still write them."""
        self.records.pop(record.id)
        record.stream.close("abort")
        self.quarantined_pages += record.reserved_pages
        log.error(
            "reservation %s: the aborted nccl receive did not drain; its %d pages stay out of use",
            record.id, record.reserved_pages,
        )  # fmt: skip

    async def _commit(
        self,
        record: IncomingRequest,
        pages: torch.Tensor | None,
        placement: tuple[int, KVLayout] | None = None,
    ) -> None:
        """Write `pages` (grpc; None: a direct transport already wrote them), lay an early reservation's
        pages out (`placement`: its first token and layout) and start decoding."""
        rid = record.id

        def commit(engine: LLMEngine) -> None:
            if rid not in engine.requests:  # aborted (lease, cancel) while the bytes were checked
                raise ReservationNotFoundError(f"reservation_id: {rid} was aborted", field="reservation_id")
            if placement is not None:
                first_token, layout = placement
                freed = engine.place_import(rid, first_token, layout)
                record.stream.set_first(first_token)
                kv = engine.requests[rid].kv
                assert kv is not None
                record.reserved_pages = kv.num_pages_held + kv.reserved
                log.info("laid out early reservation %s: %d pages written, %d unused freed", rid,
                         layout.num_pages, freed)  # fmt: skip
            if pages is not None:
                device = engine.pool.kv.device
                engine.pool.kv[record.page_ids.to(device)] = pages.to(device)
            seq = engine.commit_import(rid)
            if record.context_cache == "miss":  # its context is cached now (or kept alone): waiters go
                self.context_settled()
            if seq.is_finished:  # the first token was the last one allowed
                record.publish(engine, seq)

        await self.worker.call(commit)
        record.mark_committed()

    # ---- decode, end, abort -------------------------------------------------------------------
    def start_decoding(self, reservation_id: str) -> IncomingRequest:
        """The committed record a Decode call streams; it owns the record from here (no lease)."""
        record = self.records.get(reservation_id)
        record.begin_decoding()
        return record

    def ended(self, reservation_id: str) -> None:
        """The record's stream ended (its request finished or was aborted, which freed its pages)."""
        self.records.pop(reservation_id)

    def abort(self, reservation_id: str) -> bool:
        """Free a record and its pages in any state (idempotent)."""
        record = self.records.pop(reservation_id)
        if record is not None:
            self.worker.submit(lambda e: self._abort_on_engine(e, record.id, record.stream))
        return record is not None

    def _abort_on_engine(self, engine: LLMEngine, rid: str, stream: TokenStream | None) -> None:
        if engine.abort(rid):
            self.pages_returned()
            self.context_settled()
        if stream is not None:
            stream.close("abort")

    async def _sweep_leases(self) -> None:
        period = min(0.5, self.settings.lease_seconds / 4)
        while True:
            await asyncio.sleep(period)
            for record in self.records.pop_expired():
                log.warning(
                    "lease of reservation %s (%s) expired while %s: freeing its pages",
                    record.id, record.request_id, record.state.value,
                )  # fmt: skip
                self.worker.submit(lambda e, r=record: self._abort_on_engine(e, r.id, r.stream))


def _take_checksum(record: IncomingRequest, checksum: int | None) -> None:
    """The first PushKV message's checksum: required, and only allowed, when a context's pages travel
    ahead of the manifest's (the manifest's crc32 covers its own pages only)."""
    if record.context_pages:
        require(
            checksum is not None,
            "checksum",
            "the crc32 of every byte sent is required when a context's pages travel",
        )
    else:
        require(checksum is None, "checksum", "only when a context's pages travel ahead of the manifest's")
    record.checksum = checksum
