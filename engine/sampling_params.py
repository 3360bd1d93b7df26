"""Per-request sampling settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvferry.engine.errors import require


@dataclass
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy; top_k == 0 means no top-k cut."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
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
        require(self.temperature >= 0, "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables top-k), got {self.top_k}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(all(s != "" for s in self.stop), "stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
