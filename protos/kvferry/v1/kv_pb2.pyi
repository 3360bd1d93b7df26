from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVManifest(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "codec", "page_size", "num_layers", "num_kv_heads", "head_dim", "head_lens", "num_pages", "byte_count", "checksum_algorithm", "checksum")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HEAD_LENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    BYTE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    codec: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    head_lens: _containers.RepeatedScalarFieldContainer[int]
    num_pages: int
    byte_count: int
    checksum_algorithm: str
    checksum: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., page_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., head_lens: _Optional[_Iterable[int]] = ..., num_pages: _Optional[int] = ..., byte_count: _Optional[int] = ..., checksum_algorithm: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class ContextRef(_message.Message):
    __slots__ = ("handle", "num_tokens", "head_lens", "num_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEAD_LENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    num_tokens: int
    head_lens: _containers.RepeatedScalarFieldContainer[int]
    num_pages: int
    def __init__(self, handle: _Optional[str] = ..., num_tokens: _Optional[int] = ..., head_lens: _Optional[_Iterable[int]] = ..., num_pages: _Optional[int] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("decode_address", "reservation_id")
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    decode_address: str
    reservation_id: str
    def __init__(self, decode_address: _Optional[str] = ..., reservation_id: _Optional[str] = ...) -> None: ...
