"""LLMEngine: requests in, one scheduled step at a time, tokens out. Shared by the offline API and
both services."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from kvferry.engine.compression import SCORERS, CompressionParams, as_compression_params, make_observer
from kvferry.engine.compression.budget import max_kept_pages
from kvferry.engine.compression.calibration import ModelCalibration
from kvferry.engine.config import EngineConfig
from kvferry.engine.context_cache import (
    DEFAULT_DEVICE_SHARE,
    CachedContext,
    ContextCache,
    ContextCacheState,
    context_handle,
)
from kvferry.engine.cuda_graphs import make_decode_graph_runner
from kvferry.engine.errors import InvalidArgumentError, require
from kvferry.engine.forward_batch import PrefillCancelled
from kvferry.engine.kv_handoff import ContextRef, KVLayout
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.layers.fused_projections import use_fused_projections
from kvferry.engine.layers.layer_kernels import use_layer_kernels
from kvferry.engine.loader import LoadedModel, load_model
from kvferry.engine.model_runner import ModelRunner
from kvferry.engine.outputs import RequestOutput
from kvferry.engine.page_table import SequenceKV
from kvferry.engine.sampler import sample
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.scheduler import DecodeStep, PrefillStep, Scheduler
from kvferry.engine.sequence import Sequence, SequenceStatus
from kvferry.engine.tokenizer import eos_token_ids

CPU_DEFAULT_KV_BYTES = 2 << 30


class ContextInFlight(Exception):
    """reserve_import: another import is receiving the same context right now (`request_id`). Its
    commit caches the context, so the caller waits for that import to end and asks again."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"context arriving with request {request_id}")
        self.request_id = request_id


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.device = config.torch_device()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this (engine) thread's current GPU: streams, graphs
        self.dtype = config.torch_dtype()
        self.loaded = loaded or load_model(config.model, self.dtype, self.device, config.load_format)
        self.model = self.loaded.model
        use_layer_kernels(self.model, config.layer_kernels and self.device.type == "cuda")
        use_fused_projections(self.model, config.fused_projections)
        if self.device.type == "cuda":  # the separate weights fusion replaced: back to the driver
            torch.cuda.empty_cache()  # before the KV pool is sized from free memory
        self.tokenizer = self.loaded.tokenizer
        mc = self.loaded.config
        self.num_layers = mc.num_hidden_layers
        self.num_kv_heads = mc.num_key_value_heads
        self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.max_model_len = config.max_model_len or int(getattr(mc, "max_position_embeddings", 8192))
        self.pool = KVPool.from_memory_budget(
            config.kv_cache_bytes or self._default_kv_bytes(),
            config.page_size,
            self.head_dim,
            self.dtype,
            self.device,
        )
        pool_bytes = self.pool.num_pages * self.pool.bytes_per_page
        cache_bytes = config.context_cache_bytes
        if cache_bytes is None:
            cache_bytes = int(pool_bytes * DEFAULT_DEVICE_SHARE)
        host_bytes = config.context_cache_host_bytes
        self.context_cache = ContextCache(
            self.pool, cache_bytes, cache_bytes if host_bytes is None else host_bytes
        )
        self.scheduler = Scheduler(
            self.pool,
            self.num_layers,
            self.num_kv_heads,
            config.max_num_seqs,
            config.prefill_chunk_tokens(),
            self.context_cache,
            config.max_prefill_bypass,
        )
        graphs = make_decode_graph_runner(
            config, self.model, self.pool, self.num_layers, self.num_kv_heads, self.max_model_len
        )
        self.runner = ModelRunner(
            self.model, self.pool, self.device, graphs, dense_prefill=config.prefill_attention == "auto"
        )
        self.eos_ids = eos_token_ids(self.tokenizer, mc)
        self.requests: dict[str, Sequence] = {}
        # retention="auto": this model's shipped fits (the conservative default where there are none)
        self.calibration = ModelCalibration.for_weights(self.loaded.weights_key)

    def _default_kv_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return CPU_DEFAULT_KV_BYTES

    # ---- requests -------------------------------------------------------------------------
    def make_sequence(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        compression: Any = None,
        request_id: str | None = None,
        hold_kv: bool = False,
        context_len: int = 0,
        cache_context: bool | None = None,
        context_only: bool = False,
    ) -> Sequence:
        """Validate a request against this engine's limits and build its Sequence (not queued).

        `context_len`: the prompt's first tokens that are its context (0: none). With `cache_context`
        (None: the engine's default) the context is compressed on its own and shared through the
        context cache (engine/context_cache.py); `compression` then applies to the context only.
        `context_only`: the whole prompt is a context to cache, nothing is sampled (`add_context`)."""
        sampling.validate()
        n = len(prompt_token_ids)
        require(n > 0, "prompt", "must not be empty")
        require(
            n < self.max_model_len,
            "prompt",
            f"has {n} tokens but max_model_len is {self.max_model_len}; shorten it (one position must stay for output)",
        )
        vocab = self.loaded.config.vocab_size
        require(
            min(prompt_token_ids) >= 0 and max(prompt_token_ids) < vocab,
            "prompt",
            f"token ids must be in [0, {vocab})",
        )
        if request_id is not None and request_id in self.requests:
            raise InvalidArgumentError(f"request_id: {request_id!r} is already running", field="request_id")
        compression = as_compression_params(compression)
        if compression is not None:
            compression.check_prompt(n, self.max_model_len)
        max_new = sampling.max_new_tokens_for(n, self.max_model_len)
        seq = Sequence(prompt_token_ids, sampling, max_new, compression, request_id, hold_kv)
        seq.context_only = context_only
        if self.config.cache_context if cache_context is None else cache_context:
            self._set_context(seq, context_len)
        if compression is not None and not seq.context_len:
            seq.compression = compression.for_prompt(n)  # keep_tokens -> its share of this prompt
        seq.stats.prefill_tokens_computed = n
        return seq

    def _set_context(self, seq: Sequence, context_len: int) -> None:
        """Give a cache_context request its cached context: the first whole pages of its context, the
        compression settings that apply to them, and its cache handle (None: it could never fit)."""
        n = seq.num_prompt_tokens
        if seq.context_only:
            require(0 < context_len <= n, "context", "must not be empty")
        else:
            require(
                0 <= context_len < n, "context", f"must leave at least one prompt token after it ({n} in all)"
            )
        if context_len == 0:  # nothing to cache: the request runs as without the cache ("off")
            return
        params = seq.compression
        if params is not None and params.active and not SCORERS[params.method].query_agnostic:
            agnostic = sorted(m for m, cls in SCORERS.items() if cls.query_agnostic)
            raise InvalidArgumentError(
                f"compression.method: {params.method!r} scores the prompt from its last queries (the question), "
                f"so a context it compressed cannot serve other questions; with cache_context use one of {agnostic}",
                field="compression.method",
            )
        page_size = self.pool.page_size
        aligned = context_len // page_size * page_size  # the tokens after it join the rest of the prompt
        if aligned == 0:
            return
        seq.context_len = aligned
        seq.stats.context_tokens = aligned
        if params is not None and params.active:
            spans = [(a, min(b, aligned)) for a, b in params.protected_spans if a < aligned]
            params = replace(params, protected_spans=spans).for_prompt(aligned)  # keep_tokens of the context
        seq.context_params = params
        bound = None if params is None else params.largest(aligned)  # auto: chosen once the context is read
        worst = max_kept_pages(bound, aligned, self.num_layers, self.num_kv_heads, page_size)
        seq.context_key = context_handle(
            self.loaded.fingerprint,
            str(self.dtype).removeprefix("torch."),
            page_size,
            seq.prompt_token_ids[:aligned],
            params if isinstance(params, CompressionParams) else None,
        )
        if self.context_cache.can_hold(worst):
            seq.context_handle = seq.context_key

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        compression: Any = None,
        request_id: str | None = None,
        hold_kv: bool = False,
        context_len: int = 0,
        cache_context: bool | None = None,
    ) -> Sequence:
        """Queue a request. With hold_kv (prefill service) it stops after the first token and keeps
        its KV pages until `release(request_id)`, unless that token already finished it. `context_len`
        and `cache_context`: see make_sequence."""
        seq = self.make_sequence(
            prompt_token_ids, sampling, compression, request_id, hold_kv, context_len, cache_context
        )
        self.scheduler.add(seq)
        self.requests[seq.request_id] = seq
        return seq

    def add_context(
        self, token_ids: list[int], compression: Any = None, request_id: str | None = None
    ) -> Sequence:
        """Queue a context-only request (the services' PutContext): its whole pages are prefilled,
        compressed on their own and offered to the context cache, and it ends there (finish reason
        "context", no token sampled; the cache holds the pages). It ends at once, without running,
        when the context is cached already (`stats.context_cache` "hit") or never could be
        (`context_handle` None: larger than the cache budget). `context_key` is its handle either way."""
        seq = self.make_sequence(
            token_ids,
            SamplingParams(max_new_tokens=1),
            compression,
            request_id,
            context_len=len(token_ids),
            cache_context=True,
            context_only=True,
        )
        page_size = self.pool.page_size
        require(
            seq.context_len > 0, "context", f"must hold at least one page ({page_size} tokens) to be cached"
        )
        entry = None if seq.context_handle is None else self.context_cache.lookup(seq.context_handle)
        if entry is not None:
            self.scheduler.end_put(seq, entry)
            return seq
        if seq.context_handle is None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "context"
            return seq
        self.scheduler.add(seq)
        self.requests[seq.request_id] = seq
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def request_cancel(self, request_id: str) -> None:
        """Thread-safe, from any thread: a prefill chunk of this request running now (or later) stops at
        its next layer boundary and the request is aborted, its pages freed; `abort` (between steps) is
        still what ends a request that is not prefilling."""
        seq = self.requests.get(request_id)
        if seq is not None:
            seq.cancel_requested = True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one scheduled step; returns the sequences that produced a token (finished ones included)."""
        work = self.scheduler.schedule()
        ended = self.scheduler.take_ended()  # puts whose context another request cached meanwhile
        for seq in ended:
            self.requests.pop(seq.request_id, None)
        if isinstance(work, PrefillStep):
            seq = work.seq
            if seq.prefill_start is None:
                seq.prefill_start = time.perf_counter()
                seq.scorer_state = make_observer(
                    seq, self.calibration
                )  # None when the request keeps its whole cache
            try:
                logits = self.runner.prefill(seq, work.num_tokens, seq.scorer_state)
            except PrefillCancelled:
                self.abort(seq.request_id)
                return ended
            if seq.context_pending and seq.num_prefilled == seq.context_len:
                self._finish_context(seq)
                if seq.context_only:  # a put whose context is whole pages ends here, logits unused
                    seq.stats.prefill_seconds = time.perf_counter() - seq.prefill_start
                    self._finish(seq, "context")
                    return [*ended, seq]
            if logits is None:
                return ended
            self.finish_prefill(seq)
            self._append(seq, sample(logits[None], [seq.sampling], [seq.generator])[0])
            if seq.hold_kv and not seq.is_finished:
                self._hold(seq)
            return [*ended, seq]
        if isinstance(work, DecodeStep):
            logits = self.runner.decode(work.seqs)
            tokens = sample(logits, [s.sampling for s in work.seqs], [s.generator for s in work.seqs])
            for seq, token in zip(work.seqs, tokens):
                self._append(seq, token)
            return [*ended, *work.seqs]
        return ended

    def _finish_context(self, seq: Sequence) -> None:
        """A request's context is prefilled: compress it alone (each head to whole pages), shrink the
        reservation to the request's own pages, and offer the pages to the context cache."""
        kv = seq.kv
        assert kv is not None
        self.runner.compress(seq, round_to=self.pool.page_size)
        need = kv.pages_needed_to_grow(seq.cache_tokens_needed() - seq.context_len)
        if kv.reserved > need:
            self.pool.unreserve(kv.reserved - need)
            kv.reserved = need
        elif kv.reserved < need:  # whole kept pages need exactly what admission reserved: never
            kv.reserve(need - kv.reserved)
        seq.stats.context_kept_tokens = int(kv.head_lens.sum())
        seq.context_pending = False
        handle = seq.context_handle
        if handle is not None:
            entry = self.context_cache.publish(handle, seq.context_len, kv)
            self.context_cache.end_computing(handle, seq.request_id)
            if entry is not None:
                self.context_cache.pin(entry)
                seq.context_entry = entry
                # what its compression chose, for the stats of the requests that hit it
                entry.chosen_retention, entry.context_nll = seq.stats.chosen_retention, seq.stats.context_nll

    def context_cache_state(self) -> ContextCacheState:
        """Entries, bytes per tier, hits, misses, spills, restores and evictions of the context cache."""
        return self.context_cache.state()

    def finish_prefill(self, seq: Sequence) -> None:
        """Prompt fully cached: record what it holds and shrink its page reservation to what decode needs."""
        assert seq.kv is not None and seq.prefill_start is not None
        self.runner.compress(seq)  # select kept tokens per head, free dropped pages (no-op if none)
        kv = seq.kv
        st = seq.stats
        st.kept_tokens_per_layer = kv.head_lens.sum(dim=1).tolist()
        st.kept_tokens = int(kv.head_lens.sum())
        st.full_tokens = seq.num_prompt_tokens * self.num_layers * self.num_kv_heads
        st.kv_pages = kv.num_pages_held
        st.kv_bytes = kv.kv_bytes()
        full_pages = -(-seq.num_prompt_tokens // self.pool.page_size) * self.num_layers * self.num_kv_heads
        st.kv_bytes_full = full_pages * self.pool.bytes_per_page
        still_needed = kv.pages_needed_to_grow(seq.max_new_tokens - 1)
        if kv.reserved > still_needed:
            self.pool.unreserve(kv.reserved - still_needed)
            kv.reserved = still_needed
        seq.status = SequenceStatus.DECODE
        st.prefill_seconds = time.perf_counter() - seq.prefill_start

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        p = seq.sampling
        reason = None
        if (
            token in p.stop_token_ids
            or (not p.ignore_eos and token in self.eos_ids)
            or p.stop
            and self._stop_string_index(seq) is not None
        ):
            reason = "stop"
        elif len(seq.output_token_ids) >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.stats.output_tokens = len(seq.output_token_ids)
        if seq.first_token_time is not None:
            seq.stats.decode_seconds = time.perf_counter() - seq.first_token_time
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)

    # ---- KV handoff (prefill side: hold, export, release; decode side: reserve, fill, commit) ----
    def _hold(self, seq: Sequence) -> None:
        assert seq.kv is not None
        self.scheduler.detach(seq)
        seq.kv.release_reservation()  # held KV never grows here
        seq.status = SequenceStatus.HELD

    def held_kv(self, request_id: str) -> tuple[KVLayout, torch.Tensor]:
        """Layout and page ids [N] ((layer, head, page) order) of a held request."""
        seq = self._get(request_id, SequenceStatus.HELD)
        assert seq.kv is not None
        return KVLayout(seq.kv.head_lens.clone(), self.pool.page_size), seq.kv.ordered_page_ids()

    def held_kv_after_context(self, request_id: str) -> tuple[KVLayout, torch.Tensor, CachedContext | None]:
        """`held_kv` with a cached context kept apart: the layout and pages [N] ((layer, head, page)
        order) of the request's own tokens after its context, and the context's entry, pinned once more
        for the caller (a handoff), which must `unpin_context` it once its pages need not be read any
        more. A request without a cached context (none, or computed privately): `held_kv` and None."""
        seq = self._get(request_id, SequenceStatus.HELD)
        kv = seq.kv
        entry = seq.context_entry
        assert kv is not None
        if entry is None or entry.dropped:
            return (*self.held_kv(request_id), None)
        self.context_cache.pin(entry)
        own = KVLayout(kv.head_lens - entry.head_lens, self.pool.page_size)
        return own, kv.ordered_page_ids(start=entry.pages_per_head), entry

    def unpin_context(self, entry: CachedContext) -> None:
        """Drop a pin `held_kv_after_context` gave its caller."""
        self.context_cache.unpin(entry)

    def release(self, request_id: str) -> None:
        """Free a held request's pages after its KV was shipped (or the handoff failed)."""
        seq = self._get(request_id, SequenceStatus.HELD)
        self.requests.pop(request_id, None)
        self.scheduler.finish(seq, "handoff")

    def reserve_import(
        self,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        layout: KVLayout,
        request_id: str,
        context: ContextRef | None = None,
        wait_if_arriving: bool = False,
    ) -> torch.Tensor:
        """Set pages aside for an incoming KV (status RECEIVING) and return their ids [N] in the
        order the pages travel. Reserves the decode growth too, so the request can never run out
        of pages later. Raises ResourceExhaustedError when the pool cannot hold it now.

        With `context` the KV starts with that cached context and `layout` holds the request's own
        tokens after it. A context this engine's cache holds is shared: only the request's own pages
        are set aside and returned (`stats.context_cache` "hit"). One it does not hold travels too: its
        pages come first in the returned ids, and `commit_import` offers them to the cache ("miss").
        `wait_if_arriving`: raise ContextInFlight instead of a miss while another import is receiving
        the same context (the waiter rule of engine/context_cache.py, across imports)."""
        if context is not None:
            return self._reserve_import_after_context(
                prompt_token_ids, first_token, sampling, layout, request_id, context, wait_if_arriving
            )
        seq = self.make_sequence(prompt_token_ids, sampling, None, request_id)
        L, H = self.num_layers, self.num_kv_heads
        lens = self._checked_lens(layout, len(prompt_token_ids), first_token)
        seq.output_token_ids = [first_token]
        seq.kv = SequenceKV(self.pool, L, H, seq.cache_tokens_needed() + 1)
        seq.kv.reserve(self.import_pages_needed(len(prompt_token_ids), sampling, layout=layout))
        page_ids = seq.kv.grow_to(lens)  # a fresh sequence: every page, in travel order
        seq.status = SequenceStatus.RECEIVING
        self.requests[request_id] = seq
        return page_ids

    def _reserve_import_after_context(
        self,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        layout: KVLayout,
        request_id: str,
        context: ContextRef,
        wait_if_arriving: bool,
    ) -> torch.Tensor:
        seq = self.make_sequence(prompt_token_ids, sampling, None, request_id)
        n = len(prompt_token_ids)
        context_lens = self._checked_context(context, n)
        own = self._checked_lens(layout, n - context.num_tokens, first_token)
        cache, handle = self.context_cache, context.handle
        entry = cache.lookup(handle)
        if entry is None and wait_if_arriving and cache.computing(handle) not in (None, request_id):
            raise ContextInFlight(cache.computing(handle))  # type: ignore[arg-type]
        require(
            entry is None or bool(torch.equal(entry.head_lens, context_lens)),
            "context.head_lens",
            "differ from those of the context this node caches under the same handle",
        )
        seq.output_token_ids = [first_token]
        seq.context_len = context.num_tokens
        seq.context_handle = seq.context_key = handle
        seq.stats.context_tokens = context.num_tokens
        seq.stats.context_kept_tokens = int(context_lens.sum())
        own_pages = self.import_pages_needed(n, sampling, layout=KVLayout(own, self.pool.page_size))
        kv = seq.kv = SequenceKV(self.pool, self.num_layers, self.num_kv_heads, seq.cache_tokens_needed() + 1)
        if entry is not None:  # shared: the request's own pages only (and the entry's, back from the host)
            need = own_pages + (0 if entry.on_device else entry.num_pages)
            cache.reclaim(need, keep=entry)
            self.pool.check_room(need)
            if not entry.on_device:
                cache.restore(entry)
            kv.reserve(own_pages)
            cache.pin(entry)
            seq.context_entry = entry
            try:
                kv.attach_shared(entry.page_table, entry.head_lens, entry.page_ids())  # type: ignore[arg-type]
                page_ids = kv.grow_to(context_lens + own)
            except BaseException:
                self.scheduler.finish(seq, "abort")  # its pages, reservation and pin
                raise
            seq.stats.context_cache = "hit"
            cache.hits += 1
        else:  # received: the context's pages, then the request's own
            need = own_pages + context.num_pages
            cache.reclaim(need)
            kv.reserve(need)
            page_ids = torch.cat([kv.grow_to(context_lens), kv.grow_to(context_lens + own)])
            seq.context_import_lens = context_lens
            seq.context_pending = True  # the claim below ends with the commit or the request
            if cache.computing(handle) is None:
                cache.begin_computing(handle, request_id)
            seq.stats.context_cache = "miss"
            cache.misses += 1
        seq.status = SequenceStatus.RECEIVING
        self.requests[request_id] = seq
        return page_ids

    def _checked_context(self, context: ContextRef, prompt_len: int) -> torch.Tensor:
        """An imported context's kept tokens per head [L, H], after checking them against this model
        and the prompt (whole pages of at most the context's tokens, and a prompt token after it)."""
        L, H, page_size = self.num_layers, self.num_kv_heads, self.pool.page_size
        lens = context.head_lens.to(torch.int64)
        require(len(context.handle) > 0, "context.handle", "must name the cached context")
        require(tuple(lens.shape) == (L, H), "context.head_lens", f"must be [{L}, {H}] for this model")
        require(context.page_size == page_size, "context.page_size", f"must be {page_size}")
        require(
            context.num_tokens % page_size == 0 and 0 < context.num_tokens < prompt_len,
            "context.num_tokens",
            f"must be whole pages of the prompt with at least one prompt token after them, got "
            f"{context.num_tokens} of {prompt_len}",
        )
        require(
            bool((lens % page_size == 0).all() and (lens >= 0).all())
            and int(lens.max()) <= context.num_tokens,
            "context.head_lens",
            "each head keeps whole pages of at most the context's tokens",
        )
        return lens

    def import_pages_needed(
        self,
        prompt_len: int,
        sampling: SamplingParams,
        layout: KVLayout | None = None,
        max_pages: int | None = None,
    ) -> int:
        """Pages an imported KV reserves: every page it can ever hold, its kept tokens (`layout`, or at
        most `max_pages` for an early import) plus the max_new_tokens - 1 it will cache. Cheap enough
        for a caller to check the pool's room before asking the engine thread."""
        growth = max(sampling.max_new_tokens_for(prompt_len, self.max_model_len) - 1, 0)
        page_size = self.pool.page_size
        if layout is not None:
            lens = layout.head_lens.to(torch.int64)
            return int(((lens + growth + page_size - 1) // page_size).sum())
        assert max_pages is not None
        # Each head's growth takes at most ceil(growth / page_size) pages beyond its kept ones.
        return max_pages + self.num_layers * self.num_kv_heads * -(-growth // page_size)

    def reserve_import_early(
        self, prompt_token_ids: list[int], sampling: SamplingParams, max_pages: int, request_id: str
    ) -> torch.Tensor:
        """An early `reserve_import`, made while the prefill still runs: the kept KV's layout is not
        known, only that it takes at most `max_pages` pages. Allocates those pages (the sender writes its
        pages into the first ones, in travel order) and reserves the decode growth of any layout that
        fits them; `place_import` lays the pages out and frees what is unused. Returns their ids [max_pages]."""
        seq = self.make_sequence(prompt_token_ids, sampling, None, request_id)
        L, H, page_size = self.num_layers, self.num_kv_heads, self.pool.page_size
        full = L * H * -(-len(prompt_token_ids) // page_size)
        require(
            0 < max_pages <= full,
            "manifest.num_pages",
            f"an early reservation takes 1 to {full} pages (the whole prompt's KV), got {max_pages}",
        )
        seq.kv = SequenceKV(self.pool, L, H, seq.cache_tokens_needed() + 1)
        seq.kv.reserve(self.import_pages_needed(len(prompt_token_ids), sampling, max_pages=max_pages))
        page_ids = seq.kv.stage(max_pages)
        seq.status = SequenceStatus.RECEIVING
        self.requests[request_id] = seq
        return page_ids

    def place_import(self, request_id: str, first_token: int, layout: KVLayout) -> int:
        """Lay out the pages of an early reservation once the prefill node says what they hold: the
        first `layout.num_pages` staged pages take the heads in travel order, the rest go back to the
        pool, and the growth reservation shrinks to what this layout needs. Returns the pages freed."""
        seq = self._get(request_id, SequenceStatus.RECEIVING)
        kv = seq.kv
        assert kv is not None
        lens = self._checked_lens(layout, len(seq.prompt_token_ids), first_token)
        require(
            layout.num_pages <= kv.staged.numel(),
            "manifest.num_pages",
            f"is {layout.num_pages} but the early reservation holds {kv.staged.numel()} pages",
        )
        seq.output_token_ids = [first_token]
        freed = kv.adopt_staged(lens)
        need = kv.pages_needed_to_grow(seq.max_new_tokens - 1)
        if kv.reserved > need:
            self.pool.unreserve(kv.reserved - need)
            kv.reserved = need
        elif kv.reserved < need:  # cannot happen: the early reservation covers any layout's growth
            kv.reserve(need - kv.reserved)
        return freed

    def _checked_lens(self, layout: KVLayout, prompt_len: int, first_token: int) -> torch.Tensor:
        L, H = self.num_layers, self.num_kv_heads
        lens = layout.head_lens.to(torch.int64)
        require(tuple(lens.shape) == (L, H), "manifest.head_lens", f"must be [{L}, {H}] for this model")
        require(
            layout.page_size == self.pool.page_size, "manifest.page_size", f"must be {self.pool.page_size}"
        )
        require(
            bool((lens >= 0).all()) and int(lens.max()) <= prompt_len,
            "manifest.head_lens",
            "each head keeps between 0 and prompt-length tokens",
        )
        require(
            0 <= first_token < self.loaded.config.vocab_size,
            "first_token",
            "must be a token id of this model",
        )
        return lens

    def commit_import(self, request_id: str) -> Sequence:
        """The pages of a RECEIVING request are all written: start decoding it. A context that came
        with them is offered to the context cache (which becomes one more holder of its pages)."""
        seq = self._get(request_id, SequenceStatus.RECEIVING)
        if seq.context_pending:
            self._publish_import(seq)
        seq.status = SequenceStatus.DECODE
        seq.first_token_time = time.perf_counter()
        if len(seq.output_token_ids) >= seq.max_new_tokens:
            self._finish(seq, "length")
        else:
            self.scheduler.attach(seq)
        return seq

    def _publish_import(self, seq: Sequence) -> None:
        """Cache the context a committed import received (the request keeps it alone when the cache
        cannot take it now) and end its claim, so the imports waiting for it share it."""
        assert seq.kv is not None and seq.context_handle is not None and seq.context_import_lens is not None
        cache = self.context_cache
        entry = cache.publish(seq.context_handle, seq.context_len, seq.kv, seq.context_import_lens)
        cache.end_computing(seq.context_handle, seq.request_id)
        seq.context_pending = False
        if entry is not None:
            cache.pin(entry)
            seq.context_entry = entry

    def _get(self, request_id: str, status: SequenceStatus) -> Sequence:
        seq = self.requests.get(request_id)
        if seq is None or seq.status != status:
            raise InvalidArgumentError(
                f"request_id: no {status.value} request {request_id!r}", field="request_id"
            )
        return seq

    # ---- text -----------------------------------------------------------------------------
    def decode_text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _stop_string_index(self, seq: Sequence) -> int | None:
        text = self.decode_text(seq.output_token_ids)
        hits = [i for i in (text.find(s) for s in seq.sampling.stop) if i >= 0]
        return min(hits) if hits else None

    def output(self, seq: Sequence) -> RequestOutput:
        text = self.decode_text(seq.output_token_ids)
        if seq.sampling.stop:
            cut = self._stop_string_index(seq)
            if cut is not None:
                text = text[:cut]
        return RequestOutput(
            seq.request_id,
            seq.prompt_token_ids,
            text,
            list(seq.output_token_ids),
            seq.finish_reason,
            seq.stats,
        )
