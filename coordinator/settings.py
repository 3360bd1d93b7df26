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

    def __post_init__(self) -> None:
        if not self.prefill_addresses:
            raise ValueError("prefill_addresses: name at least one prefill service")
        if not self.decode_addresses:
            raise ValueError("decode_addresses: name at least one decode service")
        if self.decode_retries < 0:
            raise ValueError(f"decode_retries: must be >= 0, got {self.decode_retries}")
        if self.max_active_requests < 0:
            raise ValueError(f"max_active_requests: must be >= 0, got {self.max_active_requests}")
        self.compression_policy()  # its checks at start-up (the method is checked by the prefill nodes)
