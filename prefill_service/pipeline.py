"""One Prefill call end to end: encode, prefill + compress, reserve on the decode node, ship, answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvferry.engine.compression import CompressionParams
from kvferry.engine.compression.budget import max_kept_pages
from kvferry.engine.errors import ResourceExhaustedError, require
from kvferry.engine.sampling_params import SamplingParams
from kvferry.kvtransfer import ModelSpec
from kvferry.prefill_service.contexts import (
    PreparedRequest,
    PutContext,
    PutContexts,
    prepare,
    prepare_put,
    put_of,
)
from kvferry.prefill_service.early_reservation import EarlyReservation
from kvferry.prefill_service.handoff import KVHandoff
from kvferry.prefill_service.handoff_request import HandoffRequest
from kvferry.prefill_service.prefill_engine import PrefillEngine, PrefillOutcome
from kvferry.serving import request_context
from kvferry.serving.compression_policy import CompressionPolicy
from kvferry.serving.convert import FINISH_REASONS, drop_context, sampling_from_proto
from kvferry.serving.deadline import Deadline
from kvferry.serving.metrics import LATENCY_BUCKETS, RATIO_BUCKETS, new_registry
from kvferry.v1 import common_pb2, prefill_pb2

log = logging.getLogger(__name__)


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "kvferry_prefill_rejected_total",
            "Prefill calls refused because max_pending_requests were pending",
            registry=registry,
        )
        self.queue = Histogram(
            "kvferry_prefill_queue_seconds", "arrival to first prefill chunk", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.prefill = Histogram(
            "kvferry_prefill_seconds", "chunked prefill + scoring, per request", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.retention = Histogram(
            "kvferry_retention_ratio", "fraction of the prompt KV kept per request", buckets=RATIO_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.shipped = Counter(
            "kvferry_kv_bytes_shipped_total", "KV bytes sent to decode nodes", registry=registry
        )
        self.chosen_retention = Histogram(
            "kvferry_chosen_retention_ratio",
            "the retention each compressed request's budget was set to, by how it was asked for: auto "
            "(chosen from the context by calibration), ratio, or tokens (keep_tokens / prompt length)",
            ["mode"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.full = Counter(
            "kvferry_kv_bytes_uncompressed_total",
            "KV bytes the shipped prompts take uncompressed",
            registry=registry,
        )
        self.transfer = Histogram(
            "kvferry_kv_transfer_seconds", "ReserveKV to commit, per request", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.early = Counter(
            "kvferry_kv_early_reservations_total",
            "KV handoffs into a decode reservation made while the prefill ran (direct transports)",
            registry=registry,
        )
        self.by_transport = Counter(
            "kvferry_kv_transfers_total", "KV transfers committed, by transport", ["transport"],
            registry=registry,
        )  # fmt: skip
        self.context_shipped = Counter(
            "kvferry_context_pages_shipped_total",
            "KV handoffs of requests on a cached context, by whether the decode node held the context "
            "(only the request's own pages shipped) or its pages were shipped too",
            ["decode_cache"],
            registry=registry,
        )
        self.puts = Counter(
            "kvferry_context_puts_total",
            "PutContext calls by outcome: computed (and cached), hit (cached already), uncached",
            ["outcome"],
            registry=registry,
        )


class PrefillPipeline:
    def __init__(
        self,
        engine: PrefillEngine,
        handoff: KVHandoff,
        max_pending: int = 0,
        metrics: CollectorRegistry | None = None,
        early_reserve: bool = True,
        cache_context: bool = False,
        max_put_context_tokens: int = 4_000_000,
        policy: CompressionPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy or CompressionPolicy()
        self.handoff = handoff
        self.cache_context = cache_context  # the default of requests that leave cache_context unset
        self.puts = PutContexts(max_put_context_tokens)
        self.early_reserve = early_reserve  # ReserveKV when the last prefill chunk starts (direct transports)
        self.in_flight = 0  # accepted and not answered: the queue depth the coordinator balances on
        self.max_pending = max_pending  # 0: unbounded
        self.metrics = PrefillMetrics(metrics or new_registry())

    async def run(
        self, request: prefill_pb2.PrefillRequest, timeout: float | None
    ) -> prefill_pb2.PrefillResponse:
        engine = self.engine.ready_engine()
        deadline = Deadline(timeout)
        require(bool(request.decode_address), "decode_address", "must name the decode service (host:port)")
        request_context.bind(request.request_id)
        with self._pending():
            sampling = sampling_from_proto(request.sampling)
            transport = self.handoff.links.check_name(
                request.transport
            )  # an unknown one fails before prefill
            self.policy.apply(request)  # the operator's compression for a request that asks for none
            put = put_of(request, self.puts)  # on the loop: the registry is the loop's
            # tokenize (chat template included; a text too long for max_model_len refused first) and
            # the compression params with their regions: off the loop
            prepared = await asyncio.to_thread(
                prepare, engine.tokenizer, request, put, self.cache_context, engine.max_model_len
            )
            handoff = HandoffRequest(
                request.request_id or uuid.uuid4().hex, request.decode_address, prepared.prompt,
                request.sampling, ModelSpec.of_engine(engine), transport, deadline,
            )  # fmt: skip
            early = None
            # A request on a cached context reserves after prefill: whether its context's pages travel
            # is known only then (the decode node's answer), and a hit's prefill is short anyway.
            if self.early_reserve and not (prepared.cache_context and prepared.context_len):
                spec = handoff.spec
                params = prepared.compression
                bound = None if params is None else params.largest(len(prepared.prompt))  # auto: unknown yet
                max_pages = max_kept_pages(
                    bound, len(prepared.prompt), spec.num_layers, spec.num_kv_heads, spec.page_size
                )
                early = self.handoff.early(handoff, max_pages)
            try:
                return await self._prefill_and_ship(handoff, sampling, prepared, early)
            finally:
                if early is not None:
                    await early.discard()

    async def _prefill_and_ship(
        self,
        handoff: HandoffRequest,
        sampling: SamplingParams,
        prepared: PreparedRequest,
        early: EarlyReservation | None,
    ) -> prefill_pb2.PrefillResponse:
        outcome = await self.engine.prefill(
            handoff.prompt, sampling, prepared.compression, handoff.request_id,
            None if early is None else early.start, prepared.context_len, prepared.cache_context,
        )  # fmt: skip
        try:  # from here this call owns the outcome's context pin
            return await self._ship(handoff, outcome, prepared.compression, early)
        finally:
            if outcome.context is not None:
                await outcome.context.let_go()

    async def _ship(
        self,
        handoff: HandoffRequest,
        outcome: PrefillOutcome,
        compression: CompressionParams | None,
        early: EarlyReservation | None,
    ) -> prefill_pb2.PrefillResponse:
        response = prefill_pb2.PrefillResponse(
            first_token_id=outcome.first_token, first_text=outcome.first_text
        )
        _fill_stats(response.stats, outcome, compression)
        m = self.metrics
        m.queue.observe(outcome.queue_seconds)
        m.prefill.observe(outcome.stats.prefill_seconds)
        if outcome.stats.full_tokens:
            m.retention.observe(outcome.stats.retention)
        if _compressed(compression, outcome.stats.prompt_tokens):
            m.chosen_retention.labels(mode=_budget_mode(compression)).observe(outcome.stats.chosen_retention)  # type: ignore[arg-type]
        if outcome.finish_reason is not None:
            response.finish_reason = FINISH_REASONS[outcome.finish_reason]
            return response
        shipped = await self.handoff.ship(handoff, outcome, early)
        response.kv_handle.CopyFrom(shipped.handle)
        response.stats.kv_bytes_shipped = shipped.transfer.bytes_sent
        response.stats.manifest_bytes = shipped.manifest_bytes
        response.stats.transfer_seconds = shipped.seconds
        response.stats.transport = shipped.transport
        response.stats.handoff_seconds = shipped.handoff_seconds
        m.shipped.inc(shipped.transfer.bytes_sent)
        m.full.inc(outcome.stats.kv_bytes_full)
        m.transfer.observe(shipped.seconds)
        m.by_transport.labels(transport=shipped.transport).inc()
        if shipped.reserved_early:
            m.early.inc()
        if outcome.context is not None:
            m.context_shipped.labels(decode_cache="miss" if shipped.context_shipped else "hit").inc()
        log.info(
            "prefilled %d prompt tokens in %.3f s (kept %.0f%%); shipped %d bytes to %s in %.3f s",
            outcome.stats.prompt_tokens, outcome.stats.prefill_seconds, 100 * outcome.stats.retention,
            shipped.transfer.bytes_sent, handoff.decode_address, shipped.seconds,
        )  # fmt: skip
        return response

    @contextlib.contextmanager
    def _pending(self) -> Iterator[None]:
        """One call counted in `in_flight` while it runs; beyond max_pending_requests, retryable
        RESOURCE_EXHAUSTED."""
        if self.max_pending and self.in_flight >= self.max_pending:
            self.metrics.rejected.inc()
            raise ResourceExhaustedError(
                f"{self.in_flight} requests are pending on this prefill node (max_pending_requests); retry later"
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def put_context(self, request: common_pb2.PutContextRequest) -> common_pb2.PutContextResponse:
        """Compute and cache a context, and remember it under its handle (a cancelled call frees what
        it computed)."""
        engine = self.engine.ready_engine()
        request_context.bind(request.request_id)
        with self._pending():
            self.policy.apply(request)  # a put without compression settings gets the operator's
            ids, messages, params, compression = await asyncio.to_thread(
                prepare_put, engine.tokenizer, request, engine.max_model_len
            )
            put = await self.engine.put_context(ids, compression, request.request_id or uuid.uuid4().hex)
        token_ids = np.asarray(ids, dtype=np.int32)
        self.puts.add(put.handle, PutContext(token_ids, messages, params))
        outcome = "hit" if put.hit else "computed" if put.cached else "uncached"
        self.metrics.puts.labels(outcome=outcome).inc()
        log.info("put context %s: %d tokens, %s in %.3f s", put.handle[:12], len(ids), outcome, put.seconds)
        return common_pb2.PutContextResponse(
            handle=put.handle, context_tokens=len(ids), cached_tokens=put.cached_tokens,
            kept_tokens=put.kept_tokens, cached=put.cached, hit=put.hit, seconds=put.seconds,
        )  # fmt: skip

    async def drop_context(self, request: common_pb2.DropContextRequest) -> common_pb2.DropContextResponse:
        """Forget a put context and drop it from the cache; whether this node knew it."""
        self.engine.ready_engine()
        known = self.puts.drop(request.handle)
        cached = await self.engine.worker.call(drop_context(request.handle))
        return common_pb2.DropContextResponse(found=known or cached)


def _fill_stats(
    stats: prefill_pb2.PrefillStats, outcome: PrefillOutcome, compression: CompressionParams | None
) -> None:
    s = outcome.stats
    stats.prompt_tokens = s.prompt_tokens
    stats.kept_tokens = s.kept_tokens
    stats.full_tokens = s.full_tokens
    stats.retention = s.retention
    stats.kept_tokens_per_layer.extend(s.kept_tokens_per_layer)
    stats.kv_pages = s.kv_pages
    stats.kv_bytes = s.kv_bytes
    stats.kv_bytes_full = s.kv_bytes_full
    stats.queue_seconds = outcome.queue_seconds
    stats.prefill_seconds = s.prefill_seconds
    stats.scoring_seconds = s.scoring_seconds
    stats.compression_method = compression.method if _compressed(compression, s.prompt_tokens) else "none"  # type: ignore[union-attr]
    stats.chosen_retention = s.chosen_retention
    if s.context_nll is not None:
        stats.context_nll = s.context_nll
    stats.protected_tokens = s.protected_tokens
    stats.protected_share = s.protected_share
    stats.context_cache = s.context_cache
    stats.context_tokens = s.context_tokens
    stats.context_kept_tokens = s.context_kept_tokens
    stats.prefill_tokens_computed = s.prefill_tokens_computed
    if s.context_cache != "off" and outcome.context_handle is not None:
        stats.context_handle = outcome.context_handle


def _compressed(compression: CompressionParams | None, prompt_tokens: int) -> bool:
    """Whether the request's KV was compressed (keep_tokens of a prompt no longer keeps it whole)."""
    return compression is not None and compression.for_prompt(prompt_tokens).active


def _budget_mode(compression: CompressionParams) -> str:
    """How a request asked for its budget (the params still say: the engine resolves its own copy)."""
    if compression.auto:
        return "auto"
    return "tokens" if compression.keep_tokens is not None else "ratio"
