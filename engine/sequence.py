"""A request's state inside the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvferry.engine.page_table import SequenceKV
from kvferry.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no pages yet
    PREFILL = "prefill"  # admitted, prompt being processed chunk by chunk
    DECODE = "decode"  # producing tokens
    HELD = "held"  # prefill done, KV kept for a handoff to a decode node (prefill service)
    RECEIVING = "receiving"  # pages reserved, KV arriving from a prefill node (decode service)
    FINISHED = "finished"


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    kept_tokens_per_layer: list[int] = field(default_factory=list)  # summed over the layer's kv heads
    kept_tokens: int = 0  # over all layers and heads
    full_tokens: int = 0  # prompt_tokens * layers * kv_heads: what an uncompressed cache keeps
    kv_pages: int = 0
    kv_bytes: int = 0  # pages held after prefill (and compression) * page bytes
    kv_bytes_full: int = 0  # the same prompt without compression
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    scoring_seconds: float = 0.0  # compression scoring + selection inside prefill
    # the budget's ratio: the request's retention, keep_tokens / prompt_tokens, or what "auto" chose from
    # context_nll (1.0: not compressed); `retention` below is what was kept, protected tokens included.
    # With a cached context, these describe the context (what was compressed), on a hit as on a miss.
    chosen_retention: float = 1.0
    context_nll: float | None = None  # retention="auto": the prompt's mean next-token NLL, nats
    # prompt tokens compression had to keep (sink, recent, spans, chat regions, question); 0 uncompressed
    protected_tokens: int = 0
    # A cached context (engine/context_cache.py): "hit" (its compressed pages came from the cache),
    # "miss" (this request computed them), "off" (no cached context)
    context_cache: str = "off"
    context_tokens: int = 0  # prompt tokens the cached context covers (whole pages of its start)
    context_kept_tokens: int = 0  # of them, kept over all layers and heads (as kept_tokens counts)
    prefill_tokens_computed: int = 0  # prompt tokens this request ran through the model

    @property
    def retention(self) -> float:
        return self.kept_tokens / self.full_tokens if self.full_tokens else 1.0

    @property
    def protected_share(self) -> float:
        return self.protected_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Sequence:
    def __init__(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        compression: Any = None,
        request_id: str | None = None,
        hold_kv: bool = False,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.compression = compression
        self.hold_kv = hold_kv  # after the first token, keep the KV for export instead of decoding
        self.status = SequenceStatus.WAITING
        self.num_prefilled = 0
        self.kv: SequenceKV | None = None
        self.finish_reason: str | None = None
        self.stats = RequestStats(prompt_tokens=len(prompt_token_ids))
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling.seed)
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.prefill_start: float | None = None
        self.scorer_state: Any = None  # per-request compression state during prefill
        # A cached context (engine/context_cache.py), set by the engine: the prompt's first
        # `context_len` tokens (whole pages; 0 = none) are compressed on their own with
        # `context_params` and shared through the cache under `context_handle`.
        self.context_len = 0
        self.context_params: Any = None
        self.context_handle: str | None = None  # None: too large to cache, computed privately
        self.context_pending = False  # this request computes its context (a miss) and has not yet
        self.context_entry: Any = None  # the cached context this request holds a pin on
        self.context_waited_on: str | None = None  # the request computing its context it waited for
        # The cache key of the context even when it could never be cached (context_handle None): what
        # the services' PutContext registers. None without a context.
        self.context_key: str | None = None
        self.context_only = False  # a PutContext: the request ends once its context is cached
        # A decode node's import of a context it did not hold: the context's kept tokens per head
        # [L, H] at the front of `kv`, published into the cache at the commit (context_pending).
        self.context_import_lens: torch.Tensor | None = None
        # Set from any thread (LLMEngine.request_cancel): a prefill chunk of this request stops at its
        # next layer boundary instead of running the chunk to its end.
        self.cancel_requested = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def cache_tokens_needed(self) -> int:
        """Tokens every head must hold at most: the prompt plus every output token but the last."""
        return self.num_prompt_tokens + self.max_new_tokens - 1

    @property
    def prefill_end(self) -> int:
        """Where the current prefill phase ends: the context's end while this request computes its
        context (it is compressed there, before the rest), else the prompt's end."""
        return self.context_len if self.context_pending else self.num_prompt_tokens
