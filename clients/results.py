"""What the clients return: plain dataclasses over the coordinator's messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvferry.v1 import common_pb2, coordinator_pb2

FINISH_REASON_NAMES = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class StreamChunk:
    """New tokens and their text; the last chunk has finish_reason and stats."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort"
    stats: coordinator_pb2.GenerateStats | None = None

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.GenerateResponse) -> StreamChunk:
        return cls(
            list(msg.token_ids),
            msg.text,
            FINISH_REASON_NAMES[msg.finish_reason],
            msg.stats if msg.HasField("stats") else None,
        )


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: coordinator_pb2.GenerateStats | None = None

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.GenerateUnaryResponse) -> GenerateResult:
        return cls(msg.text, list(msg.token_ids), FINISH_REASON_NAMES[msg.finish_reason], msg.stats)
