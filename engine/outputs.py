from __future__ import annotations

from dataclasses import dataclass

from kvferry.engine.sequence import RequestStats


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop token or stop string), "length", "abort"
    stats: RequestStats
