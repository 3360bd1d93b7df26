from kvferry.v1 import common_pb2 as _common_pb2
from kvferry.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveKVRequest(_message.Message):
    __slots__ = ("request_id", "manifest", "sampling", "prompt_token_ids", "first_token_id", "transport", "nccl_pair_id", "early", "context")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NCCL_PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest: _kv_pb2.KVManifest
    sampling: _common_pb2.SamplingParams
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    transport: str
    nccl_pair_id: str
    early: bool
    context: _kv_pb2.ContextRef
    def __init__(self, request_id: _Optional[str] = ..., manifest: _Optional[_Union[_kv_pb2.KVManifest, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., transport: _Optional[str] = ..., nccl_pair_id: _Optional[str] = ..., early: _Optional[bool] = ..., context: _Optional[_Union[_kv_pb2.ContextRef, _Mapping]] = ...) -> None: ...

class ReserveKVResponse(_message.Message):
    __slots__ = ("reservation_id", "lease_seconds", "num_pages", "reserved_pages", "max_chunk_bytes", "page_runs", "node_id", "context_cached")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_RUNS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_seconds: float
    num_pages: int
    reserved_pages: int
    max_chunk_bytes: int
    page_runs: _containers.RepeatedScalarFieldContainer[int]
    node_id: str
    context_cached: bool
    def __init__(self, reservation_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., num_pages: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., page_runs: _Optional[_Iterable[int]] = ..., node_id: _Optional[str] = ..., context_cached: _Optional[bool] = ...) -> None: ...

class ExportKVRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportKVResponse(_message.Message):
    __slots__ = ("node_id", "host_id", "device_type", "device_uuid", "transports", "pool_export")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    POOL_EXPORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host_id: str
    device_type: str
    device_uuid: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    pool_export: bytes
    def __init__(self, node_id: _Optional[str] = ..., host_id: _Optional[str] = ..., device_type: _Optional[str] = ..., device_uuid: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., pool_export: _Optional[bytes] = ...) -> None: ...

class OpenNcclRequest(_message.Message):
    __slots__ = ("prefill_host_id", "prefill_device_uuid")
    PREFILL_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    prefill_host_id: str
    prefill_device_uuid: str
    def __init__(self, prefill_host_id: _Optional[str] = ..., prefill_device_uuid: _Optional[str] = ...) -> None: ...

class OpenNcclResponse(_message.Message):
    __slots__ = ("pair_id", "store_host", "store_port", "chunk_bytes", "timeout_seconds")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    store_host: str
    store_port: int
    chunk_bytes: int
    timeout_seconds: float
    def __init__(self, pair_id: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class CommitKVRequest(_message.Message):
    __slots__ = ("reservation_id", "checksum", "manifest", "first_token_id")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    checksum: int
    manifest: _kv_pb2.KVManifest
    first_token_id: int
    def __init__(self, reservation_id: _Optional[str] = ..., checksum: _Optional[int] = ..., manifest: _Optional[_Union[_kv_pb2.KVManifest, _Mapping]] = ..., first_token_id: _Optional[int] = ...) -> None: ...

class CommitKVResponse(_message.Message):
    __slots__ = ("bytes_received", "transfer_seconds")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    transfer_seconds: float
    def __init__(self, bytes_received: _Optional[int] = ..., transfer_seconds: _Optional[float] = ...) -> None: ...

class PushKVRequest(_message.Message):
    __slots__ = ("reservation_id", "offset", "data", "checksum")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    offset: int
    data: bytes
    checksum: int
    def __init__(self, reservation_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("bytes_received", "transfer_seconds")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    transfer_seconds: float
    def __init__(self, bytes_received: _Optional[int] = ..., transfer_seconds: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "stats")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    stats: DecodeStats
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stats: _Optional[_Union[DecodeStats, _Mapping]] = ...) -> None: ...

class DecodeStats(_message.Message):
    __slots__ = ("output_tokens", "decode_seconds", "kv_bytes_received", "kv_pages", "transfer_seconds", "context_cache")
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    output_tokens: int
    decode_seconds: float
    kv_bytes_received: int
    kv_pages: int
    transfer_seconds: float
    context_cache: str
    def __init__(self, output_tokens: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., kv_bytes_received: _Optional[int] = ..., kv_pages: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., context_cache: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DecodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeInfoResponse(_message.Message):
    __slots__ = ("model", "pool", "running", "reservations", "lease_seconds", "context_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    pool: _common_pb2.PoolInfo
    running: int
    reservations: int
    lease_seconds: float
    context_cache: _common_pb2.ContextCacheInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., pool: _Optional[_Union[_common_pb2.PoolInfo, _Mapping]] = ..., running: _Optional[int] = ..., reservations: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., context_cache: _Optional[_Union[_common_pb2.ContextCacheInfo, _Mapping]] = ...) -> None: ...
