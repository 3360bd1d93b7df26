"""Settings of a coordinator process."""

from __future__ import annotations

from dataclasses import dataclass

from kvferry.serving.settings import CompressionPolicySettings, ServerSettings, setting


@dataclass
class CoordinatorSettings(ServerSettings, CompressionPolicySettings):
    """kvferry coordinator: routes client requests through prefill and decode services."""

    port: int = setting(50051, "port to bind (0 picks a free one and logs it)")
    prefill_addresses: list[str] = setting(["127.0.0.1:50052"], "prefill services, comma-separated host:port")
    decode_addresses: list[str] = setting(["127.0.0.1:50053"], "decode services, comma-separated host:port")
    info_timeout_seconds: float = setting(2.0, "how long a node may take to answer Info before it is skipped")
    decode_retries: int = setting(
        1,
        "times a request whose decode node fails mid-stream is continued on another decode node "
        "(prompt + tokens streamed so far; token-id prompts only)",
    )
    http_port: int | None = setting(
        None,
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics) on this port of the same host (0 picks a free one; default: off)",
    )
    served_model_name: str | None = setting(
        None, "the model id of the HTTP API (default: the prefill nodes' model file or folder name)"
    )
    max_active_requests: int = setting(
        256, "Generate calls served at once; more are refused with RESOURCE_EXHAUSTED (0: no limit)"
    )
    context_routes: int = setting(
        100_000,
        "cached contexts whose prefill and decode nodes the coordinator remembers, to send later requests on "
        "them there (least recently used forgotten first)",
    )
    context_prefill_slack: int = setting(
        8,
        "a request on a cached context stays with the prefill node holding it while that node's queue is at "
        "most this many requests longer than the shortest one",
    )
    context_decode_share: float = setting(
        0.25,
        "... and with the decode node holding it while that node has at least this share of the most "
        "available pages of any decode node",
    )

    def __post_init__(self) -> None:
        if not self.prefill_addresses:
            raise ValueError("prefill_addresses: name at least one prefill service")
        if not self.decode_addresses:
            raise ValueError("decode_addresses: name at least one decode service")
        if self.decode_retries < 0:
            raise ValueError(f"decode_retries: must be >= 0, got {self.decode_retries}")
        if self.max_active_requests < 0:
            raise ValueError(f"max_active_requests: must be >= 0, got {self.max_active_requests}")
        if self.context_routes < 0:
            raise ValueError(f"context_routes: must be >= 0, got {self.context_routes}")
        if self.context_prefill_slack < 0:
            raise ValueError(f"context_prefill_slack: must be >= 0, got {self.context_prefill_slack}")
        if not 0 <= self.context_decode_share <= 1:
            raise ValueError(f"context_decode_share: must be in [0, 1], got {self.context_decode_share}")
        self.compression_policy()  # its checks at start-up (the method is checked by the prefill nodes)
