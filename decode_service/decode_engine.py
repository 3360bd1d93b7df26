"""The decode node's engine side: the engine thread, the receiver that takes KV into its pool
(kv_receiver.py), and the tokens of committed requests out to their Decode streams.

Every engine call goes through the engine thread (serving.engine_worker); the receiver's records live
on the event loop, and the engine thread looks them up after each step to publish tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from kvferry.decode_service.direct_receiver import DirectReceiver
from kvferry.decode_service.kv_receiver import IncomingRequest, KVReceiver
from kvferry.decode_service.settings import DecodeSettings
from kvferry.decode_service.token_stream import TokenEvent
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.sequence import Sequence
from kvferry.kvtransfer import ModelSpec, ReservationTable
from kvferry.serving.engine_worker import EngineWorker

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
        self.direct = DirectReceiver(settings)
        self.receiver = KVReceiver(settings, self.worker, self.direct)

    @property
    def reservations(self) -> ReservationTable[IncomingRequest]:
        """One record per request, from ReserveKV until its Decode stream ends."""
        return self.receiver.records

    @property
    def spec(self) -> ModelSpec | None:
        return self.receiver.spec

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.worker.start()
        engine = await self.worker.wait_loaded()
        await self.worker.call(lambda e: self.direct.share_pool(e.pool))
        await self.worker.call(_warm_up)
        self.receiver.start(ModelSpec.of_engine(engine))

    async def stop(self) -> None:
        self.receiver.stop()
        await asyncio.to_thread(self.worker.stop, 10.0)
        await self.direct.close()

    def ready_engine(self) -> LLMEngine:
        """The engine once loaded and warmed; UNAVAILABLE before."""
        return self.receiver.ready_engine()

    # ---- decode -------------------------------------------------------------------------------
    async def decode(self, reservation_id: str) -> AsyncIterator[tuple[TokenEvent, IncomingRequest]]:
        """The tokens of a committed request; a stream that ends before its last token frees it."""
        record = self.receiver.start_decoding(reservation_id)
        finished = False
        try:
            async for event in record.stream.events():
                finished = event.finish_reason is not None
                yield event, record
        finally:
            if finished:
                self.receiver.ended(reservation_id)
            else:
                self.receiver.abort(reservation_id)

    # ---- engine thread hooks ------------------------------------------------------------------
    def _after_step(self, engine: LLMEngine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            record = self.receiver.records.find(seq.request_id)
            if record is not None:
                record.publish(engine, seq)
        if any(seq.is_finished for seq in seqs):
            self.receiver.pages_returned()

    def _step_failed(self, engine: LLMEngine, error: BaseException) -> None:
        for record in self.receiver.records.snapshot():  # the worker aborts every request next
            record.stream.close("abort")


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
