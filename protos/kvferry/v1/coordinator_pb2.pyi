from kvferry.v1 import common_pb2 as _common_pb2
from kvferry.v1 import decode_pb2 as _decode_pb2
from kvferry.v1 import prefill_pb2 as _prefill_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "messages", "prompt_token_ids", "sampling", "compression", "cache_context", "context", "question")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    messages: _common_pb2.ChatMessages
    prompt_token_ids: _common_pb2.TokenIds
    sampling: _common_pb2.SamplingParams
    compression: _common_pb2.CompressionParams
    cache_context: bool
    context: _common_pb2.Context
    question: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.ChatMessages, _Mapping]] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., compression: _Optional[_Union[_common_pb2.CompressionParams, _Mapping]] = ..., cache_context: _Optional[bool] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., question: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "stats")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    stats: GenerateStats
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...

class GenerateUnaryRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "messages", "prompt_token_ids", "sampling", "compression", "cache_context", "context", "question")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    messages: _common_pb2.ChatMessages
    prompt_token_ids: _common_pb2.TokenIds
    sampling: _common_pb2.SamplingParams
    compression: _common_pb2.CompressionParams
    cache_context: bool
    context: _common_pb2.Context
    question: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_common_pb2.ChatMessages, _Mapping]] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., compression: _Optional[_Union[_common_pb2.CompressionParams, _Mapping]] = ..., cache_context: _Optional[bool] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., question: _Optional[str] = ...) -> None: ...

class GenerateUnaryResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    stats: GenerateStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("request_id", "prefill_node", "decode_node", "prefill", "decode", "ttft_seconds", "total_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_node: str
    decode_node: str
    prefill: _prefill_pb2.PrefillStats
    decode: _decode_pb2.DecodeStats
    ttft_seconds: float
    total_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., prefill_node: _Optional[str] = ..., decode_node: _Optional[str] = ..., prefill: _Optional[_Union[_prefill_pb2.PrefillStats, _Mapping]] = ..., decode: _Optional[_Union[_decode_pb2.DecodeStats, _Mapping]] = ..., ttft_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("address", "reachable", "error", "model", "pool", "load", "context_cache")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CACHE_FIELD_NUMBER: _ClassVar[int]
    address: str
    reachable: bool
    error: str
    model: _common_pb2.ModelInfo
    pool: _common_pb2.PoolInfo
    load: int
    context_cache: _common_pb2.ContextCacheInfo
    def __init__(self, address: _Optional[str] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., pool: _Optional[_Union[_common_pb2.PoolInfo, _Mapping]] = ..., load: _Optional[int] = ..., context_cache: _Optional[_Union[_common_pb2.ContextCacheInfo, _Mapping]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("prefill_nodes", "decode_nodes")
    PREFILL_NODES_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODES_FIELD_NUMBER: _ClassVar[int]
    prefill_nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    decode_nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, prefill_nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., decode_nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("requests_total", "requests_active", "requests_failed", "requests_cancelled", "prompt_tokens_total", "output_tokens_total", "kv_bytes_shipped_total", "kv_bytes_full_total", "ttft_seconds_sum", "uptime_seconds", "context_hits_total", "context_misses_total", "decode_context_hits_total", "decode_context_misses_total")
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SHIPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FULL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_SUM_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_MISSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONTEXT_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONTEXT_MISSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    requests_total: int
    requests_active: int
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    output_tokens_total: int
    kv_bytes_shipped_total: int
    kv_bytes_full_total: int
    ttft_seconds_sum: float
    uptime_seconds: float
    context_hits_total: int
    context_misses_total: int
    decode_context_hits_total: int
    decode_context_misses_total: int
    def __init__(self, requests_total: _Optional[int] = ..., requests_active: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., output_tokens_total: _Optional[int] = ..., kv_bytes_shipped_total: _Optional[int] = ..., kv_bytes_full_total: _Optional[int] = ..., ttft_seconds_sum: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., context_hits_total: _Optional[int] = ..., context_misses_total: _Optional[int] = ..., decode_context_hits_total: _Optional[int] = ..., decode_context_misses_total: _Optional[int] = ...) -> None: ...
