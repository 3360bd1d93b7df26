from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "stop_token_ids", "stop", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class TokenSpan(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class CompressionParams(_message.Message):
    __slots__ = ("method", "retention", "budget", "head_floor", "sink", "recent", "protected_spans", "protect_system_prompt", "protect_last_user_turn", "knobs", "auto_retention", "quality_target", "keep_tokens", "protect_question", "question_tokens")
    class KnobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    HEAD_FLOOR_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_SPANS_FIELD_NUMBER: _ClassVar[int]
    PROTECT_SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROTECT_LAST_USER_TURN_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    AUTO_RETENTION_FIELD_NUMBER: _ClassVar[int]
    QUALITY_TARGET_FIELD_NUMBER: _ClassVar[int]
    KEEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROTECT_QUESTION_FIELD_NUMBER: _ClassVar[int]
    QUESTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    method: str
    retention: float
    budget: str
    head_floor: float
    sink: int
    recent: int
    protected_spans: _containers.RepeatedCompositeFieldContainer[TokenSpan]
    protect_system_prompt: bool
    protect_last_user_turn: bool
    knobs: _containers.ScalarMap[str, float]
    auto_retention: bool
    quality_target: float
    keep_tokens: int
    protect_question: bool
    question_tokens: int
    def __init__(self, method: _Optional[str] = ..., retention: _Optional[float] = ..., budget: _Optional[str] = ..., head_floor: _Optional[float] = ..., sink: _Optional[int] = ..., recent: _Optional[int] = ..., protected_spans: _Optional[_Iterable[_Union[TokenSpan, _Mapping]]] = ..., protect_system_prompt: _Optional[bool] = ..., protect_last_user_turn: _Optional[bool] = ..., knobs: _Optional[_Mapping[str, float]] = ..., auto_retention: _Optional[bool] = ..., quality_target: _Optional[float] = ..., keep_tokens: _Optional[int] = ..., protect_question: _Optional[bool] = ..., question_tokens: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("fingerprint", "source", "dtype", "num_layers", "num_kv_heads", "head_dim", "max_model_len", "vocab_size")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    source: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    vocab_size: int
    def __init__(self, fingerprint: _Optional[str] = ..., source: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("page_size", "bytes_per_page", "total_pages", "free_pages", "used_pages", "reserved_pages", "available_pages", "cached_pages")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_PAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_PAGES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    bytes_per_page: int
    total_pages: int
    free_pages: int
    used_pages: int
    reserved_pages: int
    available_pages: int
    cached_pages: int
    def __init__(self, page_size: _Optional[int] = ..., bytes_per_page: _Optional[int] = ..., total_pages: _Optional[int] = ..., free_pages: _Optional[int] = ..., used_pages: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., available_pages: _Optional[int] = ..., cached_pages: _Optional[int] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("text", "token_ids", "handle")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    handle: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., handle: _Optional[str] = ...) -> None: ...

class ContextCacheInfo(_message.Message):
    __slots__ = ("device_entries", "host_entries", "device_bytes", "device_budget_bytes", "host_bytes", "host_budget_bytes", "pinned_entries", "computing", "hits", "misses", "spills", "restores", "evictions", "put_contexts", "cache_context_default")
    DEVICE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HOST_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMPUTING_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    SPILLS_FIELD_NUMBER: _ClassVar[int]
    RESTORES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PUT_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTEXT_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    device_entries: int
    host_entries: int
    device_bytes: int
    device_budget_bytes: int
    host_bytes: int
    host_budget_bytes: int
    pinned_entries: int
    computing: int
    hits: int
    misses: int
    spills: int
    restores: int
    evictions: int
    put_contexts: int
    cache_context_default: bool
    def __init__(self, device_entries: _Optional[int] = ..., host_entries: _Optional[int] = ..., device_bytes: _Optional[int] = ..., device_budget_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., host_budget_bytes: _Optional[int] = ..., pinned_entries: _Optional[int] = ..., computing: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., spills: _Optional[int] = ..., restores: _Optional[int] = ..., evictions: _Optional[int] = ..., put_contexts: _Optional[int] = ..., cache_context_default: _Optional[bool] = ...) -> None: ...

class PutContextRequest(_message.Message):
    __slots__ = ("request_id", "text", "messages", "token_ids", "compression")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    messages: ChatMessages
    token_ids: TokenIds
    compression: CompressionParams
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., compression: _Optional[_Union[CompressionParams, _Mapping]] = ...) -> None: ...

class PutContextResponse(_message.Message):
    __slots__ = ("handle", "context_tokens", "cached_tokens", "kept_tokens", "cached", "hit", "prefill_node", "seconds")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    HIT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    context_tokens: int
    cached_tokens: int
    kept_tokens: int
    cached: bool
    hit: bool
    prefill_node: str
    seconds: float
    def __init__(self, handle: _Optional[str] = ..., context_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., kept_tokens: _Optional[int] = ..., cached: _Optional[bool] = ..., hit: _Optional[bool] = ..., prefill_node: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class DropContextRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class DropContextResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
