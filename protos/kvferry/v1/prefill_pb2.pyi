from kvferry.v1 import common_pb2 as _common_pb2
from kvferry.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "messages", "prompt_token_ids", "sampling", "compression", "question", "decode_address", "transport", "cache_context", "context")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    messages: _common_pb2.ChatMessages
    prompt_token_ids: _common_pb2.TokenIds
    sampling: _common_pb2.SamplingParams
    compression: _common_pb2.CompressionParams
    question: str
    decode_address: str
    transport: str
    cache_context: bool
    context: _common_pb2.Context
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.ChatMessages, _Mapping]] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., compression: _Optional[_Union[_common_pb2.CompressionParams, _Mapping]] = ..., question: _Optional[str] = ..., decode_address: _Optional[str] = ..., transport: _Optional[str] = ..., cache_context: _Optional[bool] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_text", "finish_reason", "kv_handle", "stats")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_text: str
    finish_reason: _common_pb2.FinishReason
    kv_handle: _kv_pb2.KVHandle
    stats: PrefillStats
    def __init__(self, first_token_id: _Optional[int] = ..., first_text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., kv_handle: _Optional[_Union[_kv_pb2.KVHandle, _Mapping]] = ..., stats: _Optional[_Union[PrefillStats, _Mapping]] = ...) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("prompt_tokens", "kept_tokens", "full_tokens", "retention", "kept_tokens_per_layer", "kv_pages", "kv_bytes", "kv_bytes_full", "kv_bytes_shipped", "manifest_bytes", "queue_seconds", "prefill_seconds", "scoring_seconds", "transfer_seconds", "transport", "compression_method", "handoff_seconds", "context_cache", "context_tokens", "context_kept_tokens", "prefill_tokens_computed", "context_handle", "chosen_retention", "context_nll", "protected_tokens", "protected_share")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FULL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FULL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SHIPPED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_METHOD_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_RETENTION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_NLL_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    kept_tokens: int
    full_tokens: int
    retention: float
    kept_tokens_per_layer: _containers.RepeatedScalarFieldContainer[int]
    kv_pages: int
    kv_bytes: int
    kv_bytes_full: int
    kv_bytes_shipped: int
    manifest_bytes: int
    queue_seconds: float
    prefill_seconds: float
    scoring_seconds: float
    transfer_seconds: float
    transport: str
    compression_method: str
    handoff_seconds: float
    context_cache: str
    context_tokens: int
    context_kept_tokens: int
    prefill_tokens_computed: int
    context_handle: str
    chosen_retention: float
    context_nll: float
    protected_tokens: int
    protected_share: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., kept_tokens: _Optional[int] = ..., full_tokens: _Optional[int] = ..., retention: _Optional[float] = ..., kept_tokens_per_layer: _Optional[_Iterable[int]] = ..., kv_pages: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_bytes_full: _Optional[int] = ..., kv_bytes_shipped: _Optional[int] = ..., manifest_bytes: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., scoring_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., transport: _Optional[str] = ..., compression_method: _Optional[str] = ..., handoff_seconds: _Optional[float] = ..., context_cache: _Optional[str] = ..., context_tokens: _Optional[int] = ..., context_kept_tokens: _Optional[int] = ..., prefill_tokens_computed: _Optional[int] = ..., context_handle: _Optional[str] = ..., chosen_retention: _Optional[float] = ..., context_nll: _Optional[float] = ..., protected_tokens: _Optional[int] = ..., protected_share: _Optional[float] = ...) -> None: ...

class PrefillInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillInfoResponse(_message.Message):
    __slots__ = ("model", "pool", "queue_depth", "context_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    pool: _common_pb2.PoolInfo
    queue_depth: int
    context_cache: _common_pb2.ContextCacheInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., pool: _Optional[_Union[_common_pb2.PoolInfo, _Mapping]] = ..., queue_depth: _Optional[int] = ..., context_cache: _Optional[_Union[_common_pb2.ContextCacheInfo, _Mapping]] = ...) -> None: ...
