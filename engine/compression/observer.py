"""Compression of one request inside chunked prefill: the observer the prefill batch calls, and the
step that turns its scores into a compacted, head-sparse cache once the prompt is done."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from kvferry.engine.compression.base import PromptShape, Scorer, make_scorer
from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.select import compress_kv

if TYPE_CHECKING:
    from kvferry.engine.sequence import Sequence


class CompressionObserver:
    """Kept in `Sequence.scorer_state` from the first prefill chunk until compression."""

    def __init__(self, params: CompressionParams, scorer: Scorer) -> None:
        self.params = params
        self.scorer = scorer
        self.seconds = 0.0  # scoring + selection + compaction, wall time (CPU: exact; GPU: launch time)

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        t0 = time.perf_counter()
        self.scorer.observe(layer, q, k_pre_rope, k, start)
        self.seconds += time.perf_counter() - t0

    def compress(self, seq: Sequence, round_to: int = 1) -> None:
        """The whole prompt (or context) is cached: select each head's tokens and compact its pages in
        place; `round_to` whole pages per head for a cached context (select_tokens)."""
        assert seq.kv is not None
        t0 = time.perf_counter()
        compress_kv(seq.kv, self.scorer.scores(), self.params, round_to)
        _cover_decode_growth(seq)
        self.seconds += time.perf_counter() - t0
        seq.stats.scoring_seconds = self.seconds


def make_observer(seq: Sequence) -> CompressionObserver | None:
    """The observer for a request about to start prefill, or None when it keeps its whole cache.
    A request with a cached context (engine/context_cache.py) compresses its context on its own and
    nothing after it: the observer covers the context's tokens, and only while this request computes
    the context (not on a cache hit)."""
    params, n = seq.compression, seq.num_prompt_tokens
    if seq.context_len:
        if not seq.context_pending:
            return None
        params, n = seq.context_params, seq.context_len
    if not isinstance(params, CompressionParams) or not params.active:
        return None
    assert seq.kv is not None, "pages are assigned at admission, before the first prefill chunk"
    shape = PromptShape(seq.kv.num_layers, seq.kv.num_kv_heads, n)
    return CompressionObserver(params, make_scorer(params, shape, seq.kv))


def _cover_decode_growth(seq: Sequence) -> None:
    """A compacted head may end mid-page differently than before, so its decode growth can need one
    page more than what admission reserved; top the reservation up from the pages just freed."""
    kv = seq.kv
    assert kv is not None
    need = kv.pages_needed_to_grow(max(seq.max_new_tokens - 1, 0))
    extra = min(need - kv.reserved, kv.pool.num_available)
    if extra > 0:
        kv.reserve(extra)
