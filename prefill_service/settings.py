"""Settings of a prefill service process."""

from __future__ import annotations

from dataclasses import dataclass

from kvferry.kvtransfer.selection import AUTO, TRANSPORT_NAMES, parse_transports
from kvferry.serving.compression_policy import CompressionPolicy
from kvferry.serving.settings import CompressionPolicySettings, EngineSettings, ServerSettings, setting


def check_policy_method(policy: CompressionPolicy) -> None:
    """The policy's method is a registered one (the coordinator cannot tell: it never imports torch)."""
    from kvferry.engine.compression import SCORERS

    if policy.method is not None and policy.method not in SCORERS:
        raise ValueError(
            f"default_compression: unknown method {policy.method!r}; choose one of {sorted(SCORERS)}"
        )


@dataclass
class PrefillSettings(ServerSettings, EngineSettings, CompressionPolicySettings):
    """kvferry prefill service: prefills prompts, compresses their KV and ships it to decode services."""

    port: int = setting(50052, "port to bind (0 picks a free one and logs it)")
    transport: str = setting(
        "auto",
        "how KV pages move to decode services when a request names none: auto (cuda_ipc on one host with GPUs, "
        "shm on one host with CPUs, nccl between GPUs that cannot map each other, else grpc), grpc, cuda_ipc, "
        "shm or nccl",
    )
    transports: str = setting(
        "auto", "transports this node may use (auto: all its device can; or e.g. grpc,shm)"
    )
    chunk_bytes: int = setting(1 << 20, "bytes per PushKV message of the grpc transport")
    reserve_wait_seconds: float = setting(
        30.0, "how long a prefilled request waits for room on a full decode node before RESOURCE_EXHAUSTED"
    )
    early_reserve: bool = setting(
        True,
        "direct transports: reserve on the decode node when a request's last prefill chunk starts (for the "
        "most pages its compression budget can keep), so the handoff after prefill is the write and the commit",
    )
    max_pending_requests: int = setting(
        64,
        "Prefill calls accepted and not answered yet; more are refused with RESOURCE_EXHAUSTED (0: no limit)",
    )
    cache_context: bool = setting(
        False,
        "cache the context of requests that leave cache_context unset (an explicit context, or a chat's turns "
        "before its last user turn): compressed on its own, without the question, and reused by later "
        "requests on it. Off by default: it changes what compression keeps (the question no longer guides "
        "it), and query-aware methods (snapkv, kvcompress) then run uncached",
    )
    max_put_context_tokens: int = setting(
        4_000_000,
        "tokens of PutContext contexts this node remembers (their token ids, so requests can name them by "
        "handle); beyond it the least recently used are forgotten (their handles then give NOT_FOUND)",
    )

    def __post_init__(self) -> None:
        parse_transports(self.transports)
        self.engine_config()  # the engine's own checks at start-up (a bad value names its flag)
        check_policy_method(self.compression_policy())
        if self.transport not in (AUTO, *TRANSPORT_NAMES):
            raise ValueError(f"transport: unknown {self.transport!r}; use {AUTO} or one of {TRANSPORT_NAMES}")
        if self.reserve_wait_seconds < 0:
            raise ValueError(f"reserve_wait_seconds: must be >= 0, got {self.reserve_wait_seconds}")
        if self.max_pending_requests < 0:
            raise ValueError(f"max_pending_requests: must be >= 0, got {self.max_pending_requests}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: must be >= 1, got {self.chunk_bytes}")
        if self.max_put_context_tokens < 0:
            raise ValueError(f"max_put_context_tokens: must be >= 0, got {self.max_put_context_tokens}")
