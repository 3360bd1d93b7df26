"""The prefill node's engine side: a request runs until its first token, then its kept pages are
copied out and released at once (hold_kv), so the pool only holds requests still in prefill.

A request on a cached context copies out only its own pages: the context's stay in the pool, shared
through the engine's context cache, and its entry is pinned for the handoff (`HeldContext`), which
gathers them only for a decode node that lacks them and lets the pin go when it ends. PutContext is a
context-only request (`put_context`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvferry.engine.compression import CompressionParams
from kvferry.engine.config import EngineConfig
from kvferry.engine.context_cache import CachedContext
from kvferry.engine.errors import UnavailableError
from kvferry.engine.kv_handoff import KVLayout
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.sequence import RequestStats, Sequence, SequenceStatus
from kvferry.serving.detokenizer import IncrementalDetokenizer
from kvferry.serving.engine_worker import EngineWorker
from kvferry.v1 import kv_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class HeldContext:
    """A request's cached context during its handoff: the entry pinned on the engine until `let_go`,
    so its pages stay in the pool unchanged for as long as they may have to be shipped."""

    entry: CachedContext
    worker: EngineWorker
    released: bool = field(default=False, init=False)

    def ref(self) -> kv_pb2.ContextRef:
        """What ReserveKV names the context by."""
        e = self.entry
        return kv_pb2.ContextRef(
            handle=e.handle, num_tokens=e.num_tokens, head_lens=e.head_lens.flatten().tolist(),
            num_pages=e.num_pages,
        )  # fmt: skip

    async def pages_before(self, own: torch.Tensor) -> torch.Tensor:
        """The context's pages followed by `own` [N, 2, P, D], in travel order: one copy of the
        context, gathered on the engine thread. [C + N, 2, P, D]"""
        assert not self.released

        def gather(engine: LLMEngine) -> torch.Tensor:
            kv = engine.pool.kv
            ids = self.entry.page_ids().to(kv.device)
            out = torch.empty((ids.numel() + own.shape[0], *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
            torch.index_select(kv, 0, ids, out=out[: ids.numel()])
            out[ids.numel() :] = own.to(kv.device)
            return out

        return await self.worker.call(gather)

    async def let_go(self) -> None:
        """Unpin the entry (idempotent; shielded: a cancelled caller still lets go)."""
        if not self.released:
            self.released = True
            await asyncio.shield(self.worker.call(lambda e: e.unpin_context(self.entry)))

    def let_go_soon(self) -> None:
        """`let_go` without waiting (a caller that is gone)."""
        if not self.released:
            self.released = True
            self.worker.submit(lambda e: e.unpin_context(self.entry))


@dataclass
class PrefillOutcome:
    first_token: int
    first_text: str
    finish_reason: str | None  # set when the first token already ended the request (nothing to ship)
    layout: KVLayout | None  # kept tokens per (layer, head); after the context when `context` is set
    pages: torch.Tensor | None  # [N, 2, page_size, head_dim] copies of those pages, travel order
    stats: RequestStats
    queue_seconds: float
    context: HeldContext | None = None  # the cached context the KV starts with; its owner lets it go
    context_handle: str | None = None  # the context's cache key (stats)


@dataclass
class PutOutcome:
    handle: str
    cached_tokens: int  # the context's whole pages
    kept_tokens: int
    cached: bool  # the cache holds it now
    hit: bool  # it was cached already
    seconds: float


Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class PrefillEngine:
    def __init__(self, engine_config: EngineConfig) -> None:
        self.worker = EngineWorker(
            lambda: LLMEngine(engine_config), self._after_step, self._step_failed, name="prefill-engine"
        )
        self._waiters: dict[str, Waiter] = {}  # engine thread only
        self._puts: dict[str, Waiter] = {}  # engine thread only: PutContext requests
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
        context_len: int = 0,
        cache_context: bool = False,
    ) -> PrefillOutcome:
        """Prefill (and compress) one prompt; cancelling frees its pages. `last_chunk_starts` runs on
        this event loop once the request is prefilling and one chunk is left (never for a prompt that
        fits one chunk). `context_len`, `cache_context`: its context (LLMEngine.make_sequence); the
        outcome's `context` is then its owner's to let go."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PrefillOutcome] = loop.create_future()

        def add(engine: LLMEngine) -> None:
            engine.add_request(
                prompt, sampling, compression, request_id, hold_kv=True, context_len=context_len,
                cache_context=cache_context,
            )  # fmt: skip
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

    async def put_context(self, token_ids: list[int], compression: object, request_id: str) -> PutOutcome:
        """Compute and cache a context (LLMEngine.add_context); cancelling frees its pages."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PutOutcome] = loop.create_future()

        def add(engine: LLMEngine) -> None:
            seq = engine.add_context(token_ids, compression, request_id)
            if seq.is_finished:  # cached already, or never could be
                _resolve((loop, future), _put_outcome(engine, seq))
            else:
                self._puts[request_id] = (loop, future)

        try:
            await self.worker.call(add)
            return await future
        except asyncio.CancelledError:
            self.worker.submit(lambda e: self._drop(e, request_id))
            raise

    def _drop(self, engine: LLMEngine, request_id: str) -> None:
        self._waiters.pop(request_id, None)
        self._puts.pop(request_id, None)
        self._near_end.pop(request_id, None)
        engine.abort(request_id)

    # ---- engine thread hooks ------------------------------------------------------------------
    def _after_step(self, engine: LLMEngine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            waiter = self._waiters.pop(seq.request_id, None)
            if waiter is not None:
                _resolve(waiter, _outcome(engine, seq, self.worker))
            put = self._puts.pop(seq.request_id, None)
            if put is not None:
                _resolve(put, _put_outcome(engine, seq))
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
        for waiter in [*self._waiters.values(), *self._puts.values()]:
            _resolve(waiter, error)
        self._waiters.clear()
        self._puts.clear()
        self._near_end.clear()


def _outcome(engine: LLMEngine, seq: Sequence, worker: EngineWorker) -> PrefillOutcome:
    """Runs on the engine thread right after the first token: copy the kept pages out and release them
    (a cached context's stay, pinned for the handoff)."""
    first = seq.output_token_ids[0]
    detokenizer = IncrementalDetokenizer(engine.tokenizer, seq.sampling.stop)
    first_text = detokenizer.add([first])
    queue_seconds = (seq.prefill_start or seq.arrival_time) - seq.arrival_time
    if seq.status != SequenceStatus.HELD:  # finished by its first token: its pages are already free
        first_text += detokenizer.finish(engine.output(seq).text)
        return PrefillOutcome(
            first, first_text, seq.finish_reason, None, None, seq.stats, queue_seconds,
            context_handle=seq.context_key,
        )  # fmt: skip
    layout, page_ids, entry = engine.held_kv_after_context(seq.request_id)
    pages = engine.pool.kv[page_ids.to(engine.pool.kv.device)]  # a gather: a copy, not a view
    engine.release(seq.request_id)
    held = None if entry is None else HeldContext(entry, worker)
    return PrefillOutcome(
        first, first_text, None, layout, pages, seq.stats, queue_seconds, held, seq.context_key
    )


def _put_outcome(engine: LLMEngine, seq: Sequence) -> PutOutcome:
    handle = seq.context_key
    assert handle is not None
    cached = seq.context_handle is not None and engine.context_cache.lookup(handle) is not None
    return PutOutcome(
        handle, seq.context_len, seq.stats.context_kept_tokens if cached else 0, cached,
        seq.stats.context_cache == "hit", time.perf_counter() - seq.arrival_time,
    )  # fmt: skip


def _resolve(waiter: Waiter, result: object) -> None:
    """Settle the caller's future from the engine thread. A context pin the result carries is let go
    when the caller is gone (cancelled), since nobody else will own it."""
    loop, future = waiter

    def settle() -> None:
        if future.done():
            if isinstance(result, PrefillOutcome) and result.context is not None:
                result.context.let_go_soon()
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    loop.call_soon_threadsafe(settle)


def _warm_up(engine: LLMEngine) -> None:
    """One short request through prefill, hold and release before reporting SERVING. On CUDA also a
    compressed one of full chunks and a ragged one, as long as a leverage block (the longest prompts'
    kernel variants: its split count, the dense path's merge), so that no user request compiles
    them (benchmarks/cold_lengths.py: seconds on the first long prompt)."""
    _run_warm_up(engine, list(range(1, 9)), None)
    if engine.device.type == "cuda":
        half_pool = (
            engine.pool.num_pages * engine.pool.page_size // (2 * engine.num_layers * engine.num_kv_heads)
        )
        longest = max(engine.scheduler.prefill_chunk + 37, CompressionParams().leverage_block - 3)
        length = min(longest, engine.max_model_len - 5, half_pool)
        vocab = int(engine.loaded.config.vocab_size)
        prompt = [1 + t % (vocab - 1) for t in range(length)]
        compactor = {"method": "compactor", "retention": 0.5}
        _run_warm_up(engine, prompt, compactor)
        # A question over a compressed cached context takes the prefill kernel's per-head-prefix
        # variant: a miss and a hit compile it, and the cache is emptied (and its counters) after.
        for question in ([5, 6, 7], [8, 9]):
            _run_warm_up(engine, prompt + question, compactor, context_len=len(prompt))
        cache = engine.context_cache
        cache.clear()
        cache.hits = cache.misses = cache.spills = cache.restores = cache.evictions = 0
    engine.pool.assert_no_leaks()


def _run_warm_up(
    engine: LLMEngine, prompt: list[int], compression: dict | None, context_len: int = 0
) -> None:
    seq = engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_new_tokens=2),
        compression,
        request_id="warm-up",
        hold_kv=True,
        context_len=context_len,
        cache_context=context_len > 0,
    )
    while seq.status not in (SequenceStatus.HELD, SequenceStatus.FINISHED):
        engine.step()
    if seq.status == SequenceStatus.HELD:
        engine.release(seq.request_id)
