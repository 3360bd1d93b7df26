from protos.kvferry.v1 import common_pb2 as _common_pb2
from protos.kvferry.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveKVRequest(_message.Message):
    __slots__ = ("request_id", "manifest", "sampling", "prompt_token_ids", "first_token_id", "transport")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest: _kv_pb2.KVManifest
    sampling: _common_pb2.SamplingParams
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    transport: str
    def __init__(self, request_id: _Optional[str] = ..., manifest: _Optional[_Union[_kv_pb2.KVManifest, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., transport: _Optional[str] = ...) -> None: ...

class ReserveKVResponse(_message.Message):
    __slots__ = ("reservation_id", "lease_seconds", "num_pages", "reserved_pages", "max_chunk_bytes")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_seconds: float
    num_pages: int
    reserved_pages: int
    max_chunk_bytes: int
    def __init__(self, reservation_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., num_pages: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class PushKVRequest(_message.Message):
    __slots__ = ("reservation_id", "offset", "data")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    offset: int
    data: bytes
    def __init__(self, reservation_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("output_tokens", "decode_seconds", "kv_bytes_received", "kv_pages", "transfer_seconds")
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    output_tokens: int
    decode_seconds: float
    kv_bytes_received: int
    kv_pages: int
    transfer_seconds: float
    def __init__(self, output_tokens: _Optional[int] = ..., decode_seconds: _Optional[float] = ..., kv_bytes_received: _Optional[int] = ..., kv_pages: _Optional[int] = ..., transfer_seconds: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("model", "pool", "running", "reservations", "lease_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    pool: _common_pb2.PoolInfo
    running: int
    reservations: int
    lease_seconds: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., pool: _Optional[_Union[_common_pb2.PoolInfo, _Mapping]] = ..., running: _Optional[int] = ..., reservations: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...
