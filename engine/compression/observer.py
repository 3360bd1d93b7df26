"""Compression of one request inside chunked prefill: the observer the prefill batch calls, and the
step that turns its scores into a compacted, head-sparse cache once the prompt is done.

With `retention="auto"` the observer also measures the context's NLL on the prefill's hidden states
(calibration.ContextNLL) and, once the prompt is done, turns it into the request's retention before
anything is selected: the scorer's `params` hold the chosen ratio by the time `scores()` runs (a
scorer must read `params.retention` there, not in its constructor, where it may still be "auto").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvferry.engine.compression.base import PromptShape, Scorer, make_scorer
from kvferry.engine.compression.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    ContextNLL,
    ModelCalibration,
)
from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.protection import protected_mask
from kvferry.engine.compression.select import compress_kv

if TYPE_CHECKING:
    from kvferry.engine.sequence import Sequence


class CompressionObserver:
    """Kept in `Sequence.scorer_state` from the first prefill chunk until compression."""

    def __init__(
        self,
        params: CompressionParams,
        scorer: Scorer,
        context_nll: ContextNLL | None = None,
        calibration: Calibration = DEFAULT_CALIBRATION,
    ) -> None:
        self.params = params
        self.scorer = scorer
        self.context_nll = context_nll  # retention="auto" only
        self.calibration = calibration
        self.seconds = 0.0  # scoring + selection + compaction, wall time (CPU: exact; GPU: launch time)

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        t0 = time.perf_counter()
        self.scorer.observe(layer, q, k_pre_rope, k, start)
        self.seconds += time.perf_counter() - t0

    def observe_output(
        self, logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, start: int
    ) -> None:
        """A prefill chunk's final hidden states [T, hidden_size] (prompt positions start..start+T-1)."""
        if self.context_nll is not None:
            t0 = time.perf_counter()
            self.context_nll.observe(logits_of, hidden, start)
            self.seconds += time.perf_counter() - t0

    def compress(self, seq: Sequence, round_to: int = 1) -> None:
        """The whole prompt (or context) is cached: decide the budget (auto: from the measured context),
        select each head's tokens and compact its pages in place; `round_to` whole pages per head for a
        cached context (select_tokens)."""
        assert seq.kv is not None
        t0 = time.perf_counter()
        params = self.params
        if self.context_nll is not None:
            nll = self.context_nll.mean()
            params = params.with_retention(self.calibration.choose(nll, params.quality_target))
            seq.stats.context_nll = nll
            self.scorer.params = params
        n = self.scorer.shape.prompt_len  # the tokens compressed: the prompt, or its cached context
        seq.stats.chosen_retention = float(params.retention)  # type: ignore[arg-type]
        seq.stats.protected_tokens = int(
            protected_mask(n, params.sink, params.recent, params.protected_spans).sum()
        )
        compress_kv(seq.kv, self.scorer.scores(), params, round_to)
        _cover_decode_growth(seq)
        self.seconds += time.perf_counter() - t0
        seq.stats.scoring_seconds = self.seconds


def make_observer(seq: Sequence, calibration: ModelCalibration | None = None) -> CompressionObserver | None:
    """The observer for a request about to start prefill, or None when it keeps its whole cache.
    A request with a cached context (engine/context_cache.py) compresses its context on its own and
    nothing after it: the observer covers the context's tokens, and only while this request computes
    the context (not on a cache hit). `calibration`: the engine's model fits, which retention="auto"
    chooses by (from the NLL of the tokens it compresses)."""
    params, n = seq.compression, seq.num_prompt_tokens
    if seq.context_len:
        if not seq.context_pending:
            return None
        params, n = seq.context_params, seq.context_len
    if not isinstance(params, CompressionParams) or not params.active:
        return None
    assert seq.kv is not None, "pages are assigned at admission, before the first prefill chunk"
    shape = PromptShape(seq.kv.num_layers, seq.kv.num_kv_heads, n)
    scorer = make_scorer(params, shape, seq.kv)
    if not params.auto:
        return CompressionObserver(params, scorer)
    fits = calibration or ModelCalibration()
    nll = ContextNLL(seq.prompt_token_ids[:n], seq.kv.pool.kv.device)
    # the question is in view when a protected span reaches the end of the compressed tokens
    question_kept = not seq.context_len and any(end >= n for _, end in params.protected_spans)
    return CompressionObserver(params, scorer, nll, fits.for_method(params.method, question_kept))


def _cover_decode_growth(seq: Sequence) -> None:
    """A compacted head may end mid-page differently than before, so its decode growth can need one
    page more than what admission reserved; top the reservation up from the pages just freed."""
    kv = seq.kv
    assert kv is not None
    need = kv.pages_needed_to_grow(max(seq.max_new_tokens - 1, 0))
    extra = min(need - kv.reserved, kv.pool.num_available)
    if extra > 0:
        kv.reserve(extra)
