"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvferry.engine.errors import require

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy; top_k == 0 means no top-k cut.

    `max_new_tokens` must fit the room max_model_len leaves after the prompt (`max_new_tokens_for`
    refuses more, before any KV page is reserved: a request for 10^9 tokens would otherwise reserve
    pages for the whole context); None (the default) means DEFAULT_MAX_NEW_TOKENS, or the room left when
    that is less."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0 (0 is greedy), got {self.temperature}",
        )
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables top-k), got {self.top_k}")
        require(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            f"must be >= 1, got {self.max_new_tokens}",
        )
        require(all(s != "" for s in self.stop), "stop", "stop strings must not be empty")

    def max_new_tokens_for(self, prompt_len: int, max_model_len: int) -> int:
        """The tokens a request of `prompt_len` tokens may generate under `max_model_len` positions."""
        room = max_model_len - prompt_len
        if self.max_new_tokens is None:
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        require(
            self.max_new_tokens <= room,
            "max_new_tokens",
            f"is {self.max_new_tokens} but a prompt of {prompt_len} tokens leaves room for {room} "
            f"(max_model_len {max_model_len}); ask for at most {room}",
        )
        return self.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
