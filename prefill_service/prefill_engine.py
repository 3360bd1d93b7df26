"""The prefill node's engine side: a request runs until its first token, then its kept pages are
copied out and released at once (hold_kv), so the pool only holds requests still in prefill."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvferry.engine.config import EngineConfig
from kvferry.engine.errors import UnavailableError
from kvferry.engine.kv_handoff import KVLayout
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.sequence import RequestStats, Sequence, SequenceStatus
from kvferry.serving.detokenizer import IncrementalDetokenizer
from kvferry.serving.engine_worker import EngineWorker

log = logging.getLogger(__name__)


@dataclass
class PrefillOutcome:
    first_token: int
    first_text: str
    finish_reason: str | None  # set when the first token already ended the request (nothing to ship)
    layout: KVLayout | None  # kept tokens per (layer, head)
    pages: torch.Tensor | None  # [N, 2, page_size, head_dim] copies of the kept pages, travel order
    stats: RequestStats
    queue_seconds: float


Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[PrefillOutcome]"]


class PrefillEngine:
    def __init__(self, engine_config: EngineConfig) -> None:
        self.worker = EngineWorker(
            lambda: LLMEngine(engine_config), self._after_step, self._step_failed, name="prefill-engine"
        )
        self._waiters: dict[str, Waiter] = {}  # engine thread only
        # engine thread only: callbacks for when a request's last prefill chunk starts
        self._near_end: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = {}
        self._ready = False

    async def start(self) -> None:
        self.worker.start()
        await self.worker.wait_loaded()
        await self.worker.call(_warm_up)
        self._ready = True

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop, 10.0)

    def ready_engine(self) -> LLMEngine:
        if not self._ready or self.worker.engine is None:
            raise UnavailableError("the prefill service is still loading its model")
        return self.worker.engine

    async def prefill(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        compression: object,
        request_id: str,
        last_chunk_starts: Callable[[], None] | None = None,
    ) -> PrefillOutcome:
        """Prefill (and compress) one prompt; cancelling frees its pages. `last_chunk_starts` runs on
        this event loop once the request is prefilling and one chunk is left (never for a prompt that
        fits one chunk)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PrefillOutcome] = loop.create_future()

        def add(engine: LLMEngine) -> None:
            engine.add_request(prompt, sampling, compression, request_id, hold_kv=True)
            self._waiters[request_id] = (loop, future)
            if last_chunk_starts is not None:
                self._near_end[request_id] = (loop, last_chunk_starts)

        try:
            await self.worker.call(add)
            return await future
        except asyncio.CancelledError:
            engine = self.worker.engine
            if engine is not None:  # a chunk running now stops at its next layer, not at its end
                engine.request_cancel(request_id)
            self.worker.submit(lambda e: self._drop(e, request_id))
            raise

    def _drop(self, engine: LLMEngine, request_id: str) -> None:
        self._waiters.pop(request_id, None)
        self._near_end.pop(request_id, None)
        engine.abort(request_id)

    # ---- engine thread hooks ------------------------------------------------------------------
    def _after_step(self, engine: LLMEngine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            waiter = self._waiters.pop(seq.request_id, None)
            if waiter is not None:
                _resolve(waiter, _outcome(engine, seq))
        if self._near_end:
            self._signal_last_chunks(engine)

    def _signal_last_chunks(self, engine: LLMEngine) -> None:
        chunk = engine.scheduler.prefill_chunk
        for request_id, (loop, callback) in list(self._near_end.items()):
            seq = engine.requests.get(request_id)
            if seq is None or seq.status not in (SequenceStatus.WAITING, SequenceStatus.PREFILL):
                del self._near_end[request_id]  # prefilled in one chunk, finished or aborted
            elif seq.status == SequenceStatus.PREFILL and seq.num_prompt_tokens - seq.num_prefilled <= chunk:
                del self._near_end[request_id]
                loop.call_soon_threadsafe(callback)

    def _step_failed(self, engine: LLMEngine, error: BaseException) -> None:
        for waiter in self._waiters.values():
            _resolve(waiter, error)
        self._waiters.clear()
        self._near_end.clear()


def _outcome(engine: LLMEngine, seq: Sequence) -> PrefillOutcome:
    """Runs on the engine thread right after the first token: copy the kept pages out and release them."""
    first = seq.output_token_ids[0]
    detokenizer = IncrementalDetokenizer(engine.tokenizer, seq.sampling.stop)
    first_text = detokenizer.add([first])
    queue_seconds = (seq.prefill_start or seq.arrival_time) - seq.arrival_time
    if seq.status != SequenceStatus.HELD:  # finished by its first token: its pages are already free
        first_text += detokenizer.finish(engine.output(seq).text)
        return PrefillOutcome(first, first_text, seq.finish_reason, None, None, seq.stats, queue_seconds)
    layout, page_ids = engine.held_kv(seq.request_id)
    pages = engine.pool.kv[page_ids.to(engine.pool.kv.device)]  # a gather: a copy, not a view
    engine.release(seq.request_id)
    return PrefillOutcome(first, first_text, None, layout, pages, seq.stats, queue_seconds)


def _resolve(waiter: Waiter, result: PrefillOutcome | BaseException) -> None:
    loop, future = waiter

    def settle() -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    loop.call_soon_threadsafe(settle)


def _warm_up(engine: LLMEngine) -> None:
    """One short request through prefill, hold and release before reporting SERVING. On CUDA also a
    compressed one over a full chunk and a ragged one: the first long compressed request on the H100
    waited ~16 s (2026-11-23), most likely for kernel variants that short prompts never compile."""
    _run_warm_up(engine, list(range(1, 9)), None)
    if engine.device.type == "cuda":
        half_pool = (
            engine.pool.num_pages * engine.pool.page_size // (2 * engine.num_layers * engine.num_kv_heads)
        )
        length = min(engine.scheduler.prefill_chunk + 37, engine.max_model_len - 2, half_pool)
        vocab = int(engine.loaded.config.vocab_size)
        _run_warm_up(
            engine, [1 + t % (vocab - 1) for t in range(length)], {"method": "compactor", "retention": 0.5}
        )
    engine.pool.assert_no_leaks()


def _run_warm_up(engine: LLMEngine, prompt: list[int], compression: dict | None) -> None:
    seq = engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_new_tokens=2),
        compression,
        request_id="warm-up",
        hold_kv=True,
    )
    while seq.status not in (SequenceStatus.HELD, SequenceStatus.FINISHED):
        engine.step()
    if seq.status == SequenceStatus.HELD:
        engine.release(seq.request_id)
