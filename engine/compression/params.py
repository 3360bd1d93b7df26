"""Per-request compression settings, validated on construction.

Retention is the fraction of the prompt's KV that is KEPT (1.0 = nothing removed), or "auto": the
prefill measures the context and keeps the smallest share expected to hold `quality_target` of the
full cache's quality (engine/compression/calibration.py). `keep_tokens` asks for a count of tokens
per KV head instead. Protected tokens (the first `sink`, the last `recent`, `protected_spans`, and
the chat regions) are always kept and count toward the budget; when they alone exceed it, they are
kept anyway and the stats report the real count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from kvferry.engine.compression.registry import SCORERS
from kvferry.engine.errors import InvalidArgumentError, require
from kvferry.engine.retention import (
    AUTO,
    DEFAULT_QUALITY_TARGET,
    DEFAULT_RETENTION,
    check_keep_tokens,
    check_quality_target,
    check_retention,
)

BUDGETS = ("uniform", "adaptive", "global")
BLENDS = ("fixed", "ratio")
# Upper bounds of the method knobs: each sizes scoring work or memory (snapkv's window probabilities are
# [heads, window, prompt]; a compactor attention block's are [heads, block, block]; the sketch's Gram is
# [k, k] per head; the pooling widths are kernels slid over every score); far past the defaults a request
# could take a node's memory or time for one prompt.
KNOB_MAX = {
    "sketch_size": 256,
    "leverage_block": 1 << 20,  # linear in the block (1 << 16: the whole prompt, as kvpress scores it)
    "attention_block": 1024,
    "window": 512,
    "pool_kernel": 63,
}
POOL_WIDTH_MAX = 63  # mass_smoothing, score_pool
MASS_SHARPNESS_MAX = 64.0  # past it the softmax is one-hot in float32 for any real key
SPAN_CHUNK_DEFAULTS = {"compactor": 8}  # tuned for compactor only; other methods rank single tokens


@dataclass
class CompressionParams:
    method: str = "compactor"  # a name in engine.compression.SCORERS
    # fraction of prompt KV kept, in (0, 1], or "auto"; None: 0.5, unless keep_tokens is given
    retention: float | str | None = None
    # uniform: every head of a layer keeps round(retention * n); adaptive: one top-k across the layer's
    # heads; global: one top-k across every head of every layer (kvcompress-style ranking).
    budget: str = "uniform"
    head_floor: float = 0.2  # adaptive/global: a head keeps at least this share of the uniform count
    sink: int = 4  # first tokens always kept
    recent: int = 32  # last tokens always kept
    protected_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token ranges
    protect_system_prompt: bool = False  # generate_chat: keep the system message's tokens
    protect_last_user_turn: bool = False  # generate_chat: keep the last user turn and all after it
    # compactor
    leverage_weight: float = 0.4  # λ in z(attention mass) + λ·z(leverage), with blend="fixed"
    sketch_size: int = 48  # k: columns of the Gaussian sketch of pre-RoPE keys
    # tokens per leverage block (each block centred, scored on its own); 8192: the whole of most
    # contexts (docs/benchmarks/quality.md: whole-context leverage beat 1024-token blocks)
    leverage_block: int = 8192
    attention_block: int = 128  # tokens per non-causal attention-mass block
    # snapkv / kvcompress
    window: int = 32  # observation window: the last prompt queries
    pool_kernel: int = 5  # snapkv: max-pooling width over key positions (odd)
    seed: int = 0  # random scorer
    # Levers of issue 23 (benchmarks/quality.py sweeps them; defaults chosen on its tuning split).
    # compactor: "ratio" blends with λ = 1 - retention (kvpress's CompactorPress: more leverage the
    # harder the compression); "fixed" with λ = leverage_weight
    blend: str = "ratio"
    value_norm: bool = False  # compactor: weight each token's attention mass by its value norm ‖v‖
    mass_smoothing: int = 1  # compactor: average-pool width (odd) over positions of the mass (kvpress: 3)
    # compactor: the mass's softmax logits are Q Kᵀ / sqrt(d) times this (kvpress's non-causal press
    # leaves out 1/sqrt(d): sqrt(head_dim), 8 for SmolLM2). Larger: sharper, fewer keys share the mass.
    mass_sharpness: float = 1.0
    query_weight: float = 0.0  # compactor: + μ·z(snapkv votes of the last `window` prompt queries)
    score_pool: int = 1  # any method: max-pool width (odd) of the scores: a high scorer keeps its neighbours
    # any method: keep whole chunks of this many tokens, ranked by their mean score (0: off); None: the
    # method's default, SPAN_CHUNK_DEFAULTS (compactor 8: a key stays bound to its value)
    span_chunk: int | None = None
    # ---- the budget's other forms, and the question (issue 23) ----
    quality_target: float = DEFAULT_QUALITY_TARGET  # retention="auto": share of full-cache quality kept
    keep_tokens: int | None = None  # a budget in prompt tokens per KV head (instead of retention)
    # keep the prompt's trailing question: the last sentences of the last user turn (of a plain prompt:
    # of the prompt), at most question_tokens tokens, and everything after them (the generation prompt)
    protect_question: bool = False
    question_tokens: int = 64

    def __post_init__(self) -> None:
        self.protected_spans = [_span(s) for s in self.protected_spans]
        require(
            isinstance(self.method, str) and self.method in SCORERS,
            "method",
            f"unknown compression method {self.method!r}; choose one of {sorted(SCORERS)}",
        )
        if self.keep_tokens is not None:
            self.keep_tokens = check_keep_tokens(self.keep_tokens)
            require(
                self.retention is None,
                "keep_tokens",
                f"set either retention or keep_tokens, not both (got retention={self.retention!r})",
            )
        else:
            self.retention = check_retention(DEFAULT_RETENTION if self.retention is None else self.retention)
        self.quality_target = check_quality_target(self.quality_target)
        require(
            isinstance(self.question_tokens, int) and self.question_tokens >= 1,
            "question_tokens",
            f"must be an integer >= 1, got {self.question_tokens}",
        )
        require(self.budget in BUDGETS, "budget", f"must be one of {BUDGETS}, got {self.budget!r}")
        require(0 <= self.head_floor <= 1, "head_floor", f"must be in [0, 1], got {self.head_floor}")
        for name in ("sink", "recent"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, name, f"must be an integer >= 0, got {value}")
        for name, most in KNOB_MAX.items():
            value = getattr(self, name)
            require(
                isinstance(value, int) and 1 <= value <= most,
                name,
                f"must be an integer in [1, {most}], got {value}",
            )
        require(self.pool_kernel % 2 == 1, "pool_kernel", f"must be odd, got {self.pool_kernel}")
        require(
            math.isfinite(self.leverage_weight) and self.leverage_weight >= 0,
            "leverage_weight",
            f"must be a finite number >= 0, got {self.leverage_weight}",
        )
        require(self.blend in BLENDS, "blend", f"must be one of {BLENDS}, got {self.blend!r}")
        require(isinstance(self.value_norm, bool), "value_norm", f"must be a bool, got {self.value_norm!r}")
        for name in ("mass_smoothing", "score_pool"):
            value = getattr(self, name)
            ok = isinstance(value, int) and 1 <= value <= POOL_WIDTH_MAX and value % 2 == 1
            require(ok, name, f"must be an odd integer in [1, {POOL_WIDTH_MAX}], got {value}")
        require(
            isinstance(self.mass_sharpness, (int, float)) and 0 < self.mass_sharpness <= MASS_SHARPNESS_MAX,
            "mass_sharpness",
            f"must be a number in (0, {MASS_SHARPNESS_MAX}], got {self.mass_sharpness!r}",
        )
        require(
            math.isfinite(self.query_weight) and self.query_weight >= 0,
            "query_weight",
            f"must be a finite number >= 0, got {self.query_weight}",
        )
        if self.span_chunk is None:
            self.span_chunk = SPAN_CHUNK_DEFAULTS.get(self.method, 0)
        ok = isinstance(self.span_chunk, int) and self.span_chunk >= 0
        require(ok, "span_chunk", f"must be an integer >= 0, got {self.span_chunk}")

    @property
    def blend_weight(self) -> float:
        """λ of the compactor's z(attention mass) + λ·z(leverage)."""
        return 1.0 - self.retention if self.blend == "ratio" else self.leverage_weight

    @property
    def active(self) -> bool:
        """False when the request keeps its whole prompt cache (output is exactly uncompressed)."""
        if self.method == "none":
            return False
        return self.keep_tokens is not None or self.retention == AUTO or self.retention < 1.0  # type: ignore[operator]

    @property
    def auto(self) -> bool:
        return self.retention == AUTO

    def with_spans(self, spans: list[tuple[int, int]]) -> CompressionParams:
        return replace(self, protected_spans=[*self.protected_spans, *spans])

    def check_prompt(self, prompt_len: int, max_model_len: int) -> None:
        """The checks that need the prompt: spans inside it, kept-token counts within max_model_len."""
        for name in ("sink", "recent", "span_chunk"):
            value = getattr(self, name)
            require(
                value <= max_model_len, name, f"must be at most max_model_len ({max_model_len}), got {value}"
            )
        for start, end in self.protected_spans:
            require(
                end <= prompt_len,
                "protected_spans",
                f"span [{start}, {end}) ends past the prompt's {prompt_len} tokens",
            )

    def with_retention(self, retention: float) -> CompressionParams:
        """The same settings at a fixed ratio (what `auto` and `keep_tokens` become for a prompt)."""
        return replace(self, retention=retention, keep_tokens=None)

    def for_prompt(self, n: int) -> CompressionParams:
        """These settings for an n-token prompt: keep_tokens becomes its share of n (a uniform budget
        then keeps exactly keep_tokens per head); "auto" stays until the prefill has measured the context."""
        if self.keep_tokens is None:
            return self
        return self.with_retention(min(1.0, self.keep_tokens / n))

    def largest(self, n: int) -> CompressionParams:
        """The settings under which this request keeps the most KV of an n-token prompt (what an early
        decode reservation must hold before the prefill ends): "auto" may choose to keep everything."""
        params = self.for_prompt(n)
        return params.with_retention(1.0) if params.auto else params


def _span(value: Any) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)
    require(ok, "protected_spans", f"each span is a (start, end) pair of ints, got {value!r}")
    start, end = value
    require(0 <= start < end, "protected_spans", f"each span needs 0 <= start < end, got {value!r}")
    return (start, end)


def as_compression_params(value: Any) -> CompressionParams | None:
    """What a request may pass as `compression`: None, a method name, a dict of fields, or the params."""
    if value is None or isinstance(value, CompressionParams):
        return value
    if isinstance(value, str):
        return CompressionParams(method=value)
    if isinstance(value, dict):
        try:
            return CompressionParams(**value)
        except TypeError as e:
            raise InvalidArgumentError(f"compression: {e}", field="compression") from None
    raise InvalidArgumentError(
        f"compression: expected CompressionParams, a method name or a dict, got {type(value).__name__}",
        field="compression",
    )
