"""The decode node's engine side: reservations in, verified pages into the pool, tokens out.

Every engine call goes through the engine thread (serving.engine_worker); reservations and their
leases live on the event loop. Any failure or cancellation after pages were reserved frees them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import torch

from kvferry.decode_service.direct_receiver import DirectReceiver
from kvferry.decode_service.settings import DecodeSettings
from kvferry.decode_service.token_stream import TokenEvent, TokenStream
from kvferry.engine.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    require,
)
from kvferry.engine.kv_handoff import KVLayout
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.sequence import Sequence
from kvferry.kvtransfer import (
    ModelSpec,
    Reservation,
    ReservationNotFoundError,
    ReservationState,
    ReservationTable,
    bytes_to_pages,
    check_manifest,
)
from kvferry.kvtransfer.device_util import TransferTimeoutError, pool_checksum
from kvferry.kvtransfer.errors import TransferIntegrityError
from kvferry.kvtransfer.manifest import CHECKSUM_ALGORITHM, DEVICE_CHECKSUM_ALGORITHM, check_early_manifest
from kvferry.kvtransfer.transport import EarlyFinal, run_to_end
from kvferry.serving.convert import sampling_from_proto
from kvferry.serving.engine_worker import EngineWorker
from kvferry.v1 import decode_pb2

log = logging.getLogger(__name__)


class DecodeEngine:
    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self.worker = EngineWorker(
            lambda: LLMEngine(settings.engine_config()),
            self._after_step,
            self._step_failed,
            name="decode-engine",
        )
        self.reservations = ReservationTable()
        self._streams: dict[str, TokenStream] = {}  # engine thread only: requests still producing tokens
        self._outputs: dict[str, TokenStream] = {}  # event loop: a reservation's stream until it ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.spec: ModelSpec | None = None
        self.direct = DirectReceiver(settings)
        self.quarantined_pages = 0  # pages a failed NCCL receive may still write: never reused
        self._freed = asyncio.Event()  # set (and replaced) whenever a request gives its pages back

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.worker.start()
        engine = await self.worker.wait_loaded()
        await self.worker.call(lambda e: self.direct.share_pool(e.pool))
        await self.worker.call(_warm_up)
        self.spec = ModelSpec.of_engine(engine)
        self._sweeper = asyncio.create_task(self._sweep_leases())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for reservation_id in list(self._outputs):
            self.abort(reservation_id)
        await asyncio.to_thread(self.worker.stop, 10.0)
        await self.direct.close()

    def ready_engine(self) -> LLMEngine:
        """The engine once loaded and warmed; UNAVAILABLE before."""
        if self.spec is None or self.worker.engine is None:
            raise UnavailableError("the decode service is still loading its model")
        return self.worker.engine

    # ---- reserve, receive, commit -------------------------------------------------------------
    async def reserve(self, request: decode_pb2.ReserveKVRequest) -> Reservation:
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
        sampling = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        first = request.first_token_id
        rid = uuid.uuid4().hex
        loop = self._loop

        ran: list[float] = []  # when the engine thread started and ended `reserve`

        def reserve(engine: LLMEngine) -> tuple[Reservation, TokenStream]:
            ran.append(time.perf_counter())
            if request.early:
                page_ids = engine.reserve_import_early(prompt, sampling, early_pages, rid)
            else:
                page_ids = engine.reserve_import(prompt, first, sampling, layout, rid)
            kv = engine.requests[rid].kv
            assert kv is not None
            stream = TokenStream(loop, engine.tokenizer, sampling, None if request.early else first)
            self._streams[rid] = stream
            reservation = Reservation(
                request.request_id, request.manifest, page_ids, kv.num_pages_held + kv.reserved,
                self.settings.lease_seconds, id=rid, transport=transport, nccl_pair_id=request.nccl_pair_id,
                early=request.early,
            )  # fmt: skip
            ran.append(time.perf_counter())
            return reservation, stream

        needed = engine.import_pages_needed(
            len(prompt), sampling, layout=None if request.early else layout,
            max_pages=early_pages if request.early else None,
        )  # fmt: skip
        hold_until = time.monotonic() + self.settings.reserve_hold_seconds
        while True:
            asked = time.perf_counter()
            try:
                engine.pool.check_room(needed)  # a stale read off the engine thread, which decides
                reservation, stream = await self.worker.call(reserve)
                break
            except ResourceExhaustedError as e:
                if not e.retryable or not await self._pages_freed(hold_until):
                    raise
                ran.clear()
            except asyncio.CancelledError:
                self.worker.submit(lambda e: self._abort_on_engine(e, rid))  # runs after `reserve` if it ran
                raise
        self.reservations.add(reservation)
        self._outputs[rid] = stream
        done = time.perf_counter()
        log.info(
            "reserved %s for %s: %d pages + %d for growth, lease %.1f s, in %.1f ms (checks %.1f, "
            "waiting for the engine thread %.1f, on it %.1f, back %.1f)",
            rid, request.request_id, reservation.page_ids.numel(),
            reservation.reserved_pages - reservation.page_ids.numel(), reservation.lease_seconds,
            1e3 * (done - checked), 1e3 * (asked - checked), 1e3 * (ran[0] - asked),
            1e3 * (ran[1] - ran[0]), 1e3 * (done - ran[1]),
        )  # fmt: skip
        return reservation

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

    def _signal_freed(self) -> None:
        """Event loop: wake every ReserveKV waiting for pages."""
        self._freed.set()
        self._freed = asyncio.Event()

    async def receive(self, chunks: AsyncIterator[decode_pb2.PushKVRequest]) -> decode_pb2.PushKVResponse:
        """The grpc transport's receiving end: chunks -> verified bytes -> pool -> decoding starts."""
        reservation: Reservation | None = None
        try:
            async for chunk in chunks:
                if reservation is None:
                    candidate = self.reservations.get(chunk.reservation_id)
                    candidate.begin_receive()
                    reservation = candidate
                    started = time.perf_counter()
                elif chunk.reservation_id not in ("", reservation.id):
                    raise InvalidArgumentError(
                        "reservation_id: one PushKV stream carries one reservation", field="reservation_id"
                    )
                if len(chunk.data) > self.settings.max_chunk_bytes:
                    raise InvalidArgumentError(
                        f"data: chunk of {len(chunk.data)} bytes exceeds max_chunk_bytes {self.settings.max_chunk_bytes}",
                        field="data",
                    )
                self.reservations.get(reservation.id)  # NOT_FOUND if the lease ran out meanwhile
                reservation.accept(chunk.offset, chunk.data)
            if reservation is None:
                raise InvalidArgumentError(
                    "reservation_id: the PushKV stream carried no chunk", field="reservation_id"
                )
            assert self.spec is not None
            payload = reservation.verified_payload()  # count and checksum, before any page is written
            await self._commit(reservation, bytes_to_pages(payload, self.spec, reservation.page_ids.numel()))
        except BaseException:
            if reservation is not None:
                self.abort(reservation.id)
            raise
        return decode_pb2.PushKVResponse(
            bytes_received=reservation.received, transfer_seconds=time.perf_counter() - started
        )

    async def commit_direct(
        self, reservation_id: str, checksum: int | None = None, final: EarlyFinal | None = None
    ) -> decode_pb2.CommitKVResponse:
        """A direct transport's commit: receive the pages (nccl) or find them written (cuda_ipc, shm),
        verify their sum64 where they are (`checksum`, or the manifest's when None), start decoding.
        An early reservation needs `final` (the manifest of what was written and the first token): its
        pages are the first ones of the reservation, laid out at the commit. Any failure frees the
        reservation, except pages an aborted NCCL receive may still write, which stay quarantined."""
        reservation = self.reservations.get(reservation_id)
        placement = None  # an early reservation's first token and layout
        if reservation.early:
            try:
                layout = self._early_layout(reservation, final)
            except BaseException:
                self.abort(reservation.id)
                raise
            assert final is not None
            reservation.manifest = final.manifest  # what was written: its first pages
            placement = (final.first_token_id, layout)
        expected = reservation.manifest.checksum if checksum is None else checksum
        reservation.begin_receive(direct=True)
        started = time.perf_counter()
        engine = self.ready_engine()
        page_ids = reservation.page_ids[: reservation.manifest.num_pages].to(engine.pool.kv.device)
        received = verified = started
        try:
            if reservation.transport == "nccl":
                pair = await self.direct.nccl_pair(reservation.nccl_pair_id)
                await run_to_end(
                    pair.recv_pages, engine.pool.kv, page_ids, self.settings.nccl_timeout_seconds
                )
            received = time.perf_counter()
            if self.settings.verify_direct_writes and page_ids.numel():
                found = await run_to_end(pool_checksum, engine.pool.kv, page_ids)
                if found != expected:
                    raise TransferIntegrityError(
                        f"checksum mismatch: sum64 of the {reservation.transport} pages in the pool is "
                        f"{found:#018x}, the sender says {expected:#018x}"
                    )
            reservation.received = reservation.manifest.byte_count
            verified = time.perf_counter()
            await self._commit(reservation, None, placement)
        except TransferTimeoutError as e:
            if e.drained:
                self.abort(reservation.id)
            else:
                self._quarantine(reservation)
            raise
        except BaseException:
            self.abort(reservation.id)
            raise
        done = time.perf_counter()
        log.info(
            "committed %s (%d bytes over %s): receive %.1f ms, sum64 %.1f ms, commit %.1f ms",
            reservation.id, reservation.received, reservation.transport, 1e3 * (received - started),
            1e3 * (verified - received), 1e3 * (done - verified),
        )  # fmt: skip
        return decode_pb2.CommitKVResponse(
            bytes_received=reservation.received, transfer_seconds=done - started
        )

    def _early_layout(self, reservation: Reservation, final: EarlyFinal | None) -> KVLayout:
        """The layout an early reservation's commit brings, checked against this model and the pages
        reserved."""
        assert self.spec is not None
        require(final is not None, "manifest", "CommitKV of an early reservation needs the final manifest")
        assert final is not None
        layout = check_manifest(final.manifest, self.spec)
        require(
            final.manifest.checksum_algorithm == DEVICE_CHECKSUM_ALGORITHM,
            "manifest.checksum_algorithm",
            f"must be {DEVICE_CHECKSUM_ALGORITHM!r} for the {reservation.transport} transport",
        )
        require(
            layout.num_pages <= reservation.page_ids.numel(),
            "manifest.num_pages",
            f"is {layout.num_pages} but the early reservation holds {reservation.page_ids.numel()} pages",
        )
        return layout

    def _quarantine(self, reservation: Reservation) -> None:
        """Forget the reservation but keep its pages held forever: an aborted NCCL receive that did not
        drain may still write them."""
        self.reservations.pop(reservation.id)
        stream = self._outputs.pop(reservation.id, None)
        if stream is not None:
            stream.close("abort")
        self.quarantined_pages += reservation.reserved_pages
        log.error(
            "reservation %s: the aborted nccl receive did not drain; its %d pages stay out of use",
            reservation.id, reservation.reserved_pages,
        )  # fmt: skip

    async def _commit(
        self,
        reservation: Reservation,
        pages: torch.Tensor | None,
        placement: tuple[int, KVLayout] | None = None,
    ) -> None:
        """Write `pages` (grpc; None: a direct transport already wrote them), lay an early reservation's
        pages out (`placement`: its first token and layout) and start decoding."""
        rid = reservation.id

        def commit(engine: LLMEngine) -> None:
            if rid not in engine.requests:  # aborted (lease, cancel) while the bytes were checked
                raise ReservationNotFoundError(f"reservation_id: {rid} was aborted", field="reservation_id")
            if placement is not None:
                first_token, layout = placement
                freed = engine.place_import(rid, first_token, layout)
                self._streams[rid].set_first(first_token)
                kv = engine.requests[rid].kv
                assert kv is not None
                reservation.reserved_pages = kv.num_pages_held + kv.reserved
                log.info("laid out early reservation %s: %d pages written, %d unused freed", rid,
                         layout.num_pages, freed)  # fmt: skip
            if pages is not None:
                device = engine.pool.kv.device
                engine.pool.kv[reservation.page_ids.to(device)] = pages.to(device)
            seq = engine.commit_import(rid)
            if seq.is_finished:  # the first token was the last one allowed
                self._publish(engine, seq)

        await self.worker.call(commit)
        reservation.mark_committed()

    # ---- decode, abort ------------------------------------------------------------------------
    async def decode(self, reservation_id: str) -> AsyncIterator[tuple[TokenEvent, Reservation]]:
        reservation = self.reservations.get(reservation_id)
        if reservation.state != ReservationState.COMMITTED:
            raise FailedPreconditionError(
                f"reservation_id: {reservation_id} is {reservation.state.value}; Decode needs committed pages",
                field="reservation_id",
            )
        reservation.state = ReservationState.DECODING  # the stream owns it now: no lease
        stream = self._outputs[reservation_id]
        finished = False
        try:
            async for event in stream.events():
                finished = event.finish_reason is not None
                yield event, reservation
        finally:
            if finished:
                self.reservations.pop(reservation_id)
                self._outputs.pop(reservation_id, None)
            else:
                self.abort(reservation_id)

    def abort(self, reservation_id: str) -> bool:
        """Free a reservation in any state (idempotent)."""
        found = self.reservations.pop(reservation_id) is not None
        stream = self._outputs.pop(reservation_id, None)
        if found or stream is not None:
            self.worker.submit(lambda e: self._abort_on_engine(e, reservation_id))
        return found

    def _abort_on_engine(self, engine: LLMEngine, rid: str) -> None:
        if engine.abort(rid) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._signal_freed)
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.close("abort")

    async def _sweep_leases(self) -> None:
        period = min(0.5, self.settings.lease_seconds / 4)
        while True:
            await asyncio.sleep(period)
            for reservation in self.reservations.pop_expired():
                log.warning(
                    "lease of reservation %s (%s) expired while %s: freeing its pages",
                    reservation.id, reservation.request_id, reservation.state.value,
                )  # fmt: skip
                self._outputs.pop(reservation.id, None)
                self.worker.submit(lambda e, rid=reservation.id: self._abort_on_engine(e, rid))

    # ---- engine thread hooks ------------------------------------------------------------------
    def _after_step(self, engine: LLMEngine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._publish(engine, seq)
        if self._loop is not None and any(seq.is_finished for seq in seqs):
            self._loop.call_soon_threadsafe(self._signal_freed)

    def _step_failed(self, engine: LLMEngine, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.close("abort")
        self._streams.clear()

    def _publish(self, engine: LLMEngine, seq: Sequence) -> None:
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        if seq.is_finished:
            del self._streams[seq.request_id]
            stream.publish(seq, engine.output(seq))
        else:
            stream.publish(seq, None)


def _warm_up(engine: LLMEngine) -> None:
    """Every decode CUDA graph captured, then one short generation through the whole stack, before
    reporting SERVING."""
    if engine.runner.graphs is not None:
        seconds = engine.runner.graphs.capture_all()
        log.info("captured %d decode CUDA graphs in %.1f s", len(engine.runner.graphs.buckets), seconds)
    prompt = list(range(1, 9))
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=2), request_id="warm-up")
    while not seq.is_finished:
        engine.step()
    engine.pool.assert_no_leaks()
