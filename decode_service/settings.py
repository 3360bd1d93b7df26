"""Settings of a decode service process."""

from __future__ import annotations

from dataclasses import dataclass

from kvferry.kvtransfer.selection import parse_transports
from kvferry.serving.settings import EngineSettings, ServerSettings, setting


@dataclass
class DecodeSettings(ServerSettings, EngineSettings):
    """kvferry decode service: takes KV pages from prefill services and streams the generated tokens."""

    port: int = setting(50053, "port to bind (0 picks a free one and logs it)")
    lease_seconds: float = setting(
        30.0, "a reservation whose pages, or whose Decode call, do not come within this many seconds is freed"
    )
    reserve_hold_seconds: float = setting(
        1.0,
        "a ReserveKV that finds the pool full waits this long for running requests to free pages before it "
        "answers RESOURCE_EXHAUSTED (retryable), so waiting prefill nodes poll rarely and get pages at once",
    )
    max_chunk_bytes: int = setting(4 << 20, "largest PushKV chunk accepted, in bytes")
    transports: str = setting(
        "auto",
        "transports served (auto: all this node's device can: grpc + cuda_ipc + nccl on a GPU, grpc + shm on "
        "a CPU; or a comma list such as grpc,nccl)",
    )
    nccl_store_host: str = setting(
        "127.0.0.1", "address of this node's NCCL rendezvous store as prefill nodes reach it (nccl)"
    )
    nccl_timeout_seconds: float = setting(
        30.0, "nccl: seconds either end waits for the other before failing a transfer and aborting the pair"
    )
    verify_direct_writes: bool = setting(
        True, "check the sum64 of pages written by cuda_ipc / shm / nccl before decoding them"
    )
    max_transfer_bytes: int = setting(
        0, "largest KV transfer (manifest byte_count) ReserveKV accepts (0: whatever the pool can hold)"
    )

    def __post_init__(self) -> None:
        parse_transports(self.transports)
        self.engine_config()  # the engine's own checks at start-up (a bad value names its flag)
        if self.nccl_timeout_seconds <= 0:
            raise ValueError(f"nccl_timeout_seconds: must be > 0, got {self.nccl_timeout_seconds}")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds: must be > 0, got {self.lease_seconds}")
        if self.reserve_hold_seconds < 0:
            raise ValueError(f"reserve_hold_seconds: must be >= 0, got {self.reserve_hold_seconds}")
        if self.max_transfer_bytes < 0:
            raise ValueError(f"max_transfer_bytes: must be >= 0, got {self.max_transfer_bytes}")
        if self.max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes: must be >= 1, got {self.max_chunk_bytes}")
