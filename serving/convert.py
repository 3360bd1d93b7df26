"""Proto messages <-> engine objects, for the prefill and decode services."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kvferry.engine.compression import CompressionParams
from kvferry.engine.context_cache import ContextCacheState
from kvferry.engine.errors import InvalidArgumentError, NotFoundError, require
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.prompt_regions import EncodedRequest, encode_request
from kvferry.engine.retention import AUTO
from kvferry.engine.sampling_params import SamplingParams
from kvferry.v1 import common_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SAMPLING_OPTIONALS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
_COMPRESSION_OPTIONALS = (
    "retention",
    "budget",
    "head_floor",
    "sink",
    "recent",
    "quality_target",
    "keep_tokens",
    "question_tokens",
)
_COMPRESSION_FIELDS = {f.name: f for f in dataclasses.fields(CompressionParams)}
_KNOBS = {
    "leverage_weight",
    "sketch_size",
    "leverage_block",
    "attention_block",
    "window",
    "pool_kernel",
    "seed",
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    values: dict[str, Any] = {name: getattr(msg, name) for name in _SAMPLING_OPTIONALS if msg.HasField(name)}
    return SamplingParams(
        **values, stop_token_ids=list(msg.stop_token_ids), stop=list(msg.stop), ignore_eos=msg.ignore_eos
    )


def encode_request_proto(
    tokenizer: Any | None,
    request: Any,
    max_tokens: int | None = None,
    params: CompressionParams | None = None,
    context: str | list[int] | None = None,
    chat_context: bool = False,
) -> EncodedRequest:
    """The prompt token ids of a request with an `input` oneof (its `question` appended) and its
    compression params, the regions it asks to keep as spans (engine.prompt_regions: as the offline
    API encodes the same input). With `max_tokens` (max_model_len), an input that cannot fit is refused
    before it is tokenized or copied, and compression settings that do not fit the prompt are refused
    here, so their errors name `compression.<field>` (the engine checks again). `params`: the
    compression to use instead of the request's (a put context's); `context` (plain prompts: text or
    token ids in front of the input) and `chat_context` (measure a chat's turns before its last user
    turn) give the cached context's length (EncodedRequest.context_len)."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("prompt: set one of prompt, messages, prompt_token_ids", field="prompt")
    if params is None and request.HasField("compression"):
        params = compression_from_proto(request.compression)
    question = request.question if request.HasField("question") else None
    with compression_fields():
        if which == "prompt":
            encoded = encode_request(
                tokenizer, prompt=request.prompt, question=question, compression=params, context=context,
                max_tokens=max_tokens,
            )  # fmt: skip
        elif which == "messages":
            require(
                context is None,
                "context",
                "a conversation's context is its turns before the last user turn: send messages without "
                "a context",
            )
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            encoded = encode_request(
                tokenizer, messages=messages, question=question, compression=params,
                chat_context=chat_context, max_tokens=max_tokens,
            )  # fmt: skip
        else:
            count = len(request.prompt_token_ids.ids)
            require(count > 0, "prompt_token_ids", "must not be empty")
            require(
                max_tokens is None or count < max_tokens,
                "prompt",  # as the engine names it
                f"has {count:,} tokens but max_model_len is {max_tokens}; shorten it (one position must "
                "stay for output)",
            )
            ids = list(request.prompt_token_ids.ids)
            encoded = encode_request(
                tokenizer, prompt=ids, question=question, compression=params, context=context,
                max_tokens=max_tokens,
            )  # fmt: skip
        if encoded.compression is not None and max_tokens is not None:
            encoded.compression.check_prompt(len(encoded.ids), max_tokens)
    return encoded


@contextmanager
def compression_fields() -> Iterator[None]:
    """Errors of CompressionParams checks, re-raised with their field named `compression.<field>`
    (errors of other fields pass unchanged)."""
    try:
        yield
    except InvalidArgumentError as e:
        if e.field not in _COMPRESSION_FIELDS:
            raise
        raise InvalidArgumentError(f"compression.{e}", field=f"compression.{e.field}") from None


def compression_from_proto(msg: pb.CompressionParams) -> CompressionParams:
    """engine.CompressionParams of a request; error fields are named `compression.<field>`."""
    values: dict[str, Any] = {
        name: getattr(msg, name) for name in _COMPRESSION_OPTIONALS if msg.HasField(name)
    }
    if msg.method:
        values["method"] = msg.method
    if msg.auto_retention:
        require(
            not msg.HasField("retention"),
            "compression.retention",
            "set either a retention or auto_retention, not both",
        )
        values["retention"] = AUTO
    for name, value in msg.knobs.items():
        require(name in _KNOBS, "compression.knobs", f"unknown knob {name!r}; known: {sorted(_KNOBS)}")
        if isinstance(_COMPRESSION_FIELDS[name].default, int):
            require(
                float(value).is_integer(), f"compression.knobs.{name}", f"must be a whole number, got {value}"
            )
            value = int(value)
        values[name] = value
    values["protected_spans"] = [(s.start, s.end) for s in msg.protected_spans]
    values["protect_system_prompt"] = msg.protect_system_prompt
    values["protect_last_user_turn"] = msg.protect_last_user_turn
    values["protect_question"] = msg.protect_question
    with compression_fields():
        return CompressionParams(**values)


def dtype_name(engine: LLMEngine) -> str:
    return str(engine.dtype).removeprefix("torch.")


def model_info(engine: LLMEngine) -> pb.ModelInfo:
    return pb.ModelInfo(
        fingerprint=engine.loaded.fingerprint,
        source=engine.loaded.source,
        dtype=dtype_name(engine),
        num_layers=engine.num_layers,
        num_kv_heads=engine.num_kv_heads,
        head_dim=engine.head_dim,
        max_model_len=engine.max_model_len,
        vocab_size=engine.loaded.config.vocab_size,
    )


def pool_info(pool: KVPool) -> pb.PoolInfo:
    return pb.PoolInfo(
        page_size=pool.page_size,
        bytes_per_page=pool.bytes_per_page,
        total_pages=pool.num_pages,
        free_pages=pool.num_free,
        used_pages=pool.num_used,
        reserved_pages=pool.num_reserved,
        available_pages=max(pool.num_available, 0),
        cached_pages=pool.num_cached,
    )


def context_cache_info(state: ContextCacheState, **extra: Any) -> pb.ContextCacheInfo:
    """A node's context cache (`extra`: the prefill node's put_contexts and cache_context_default)."""
    return pb.ContextCacheInfo(**dataclasses.asdict(state), **extra)


def drop_context(handle: str) -> Callable[[LLMEngine], bool]:
    """An engine command: remove `handle` from the context cache; whether it was there."""

    def drop(engine: LLMEngine) -> bool:
        try:
            engine.context_cache.drop(handle)
        except NotFoundError:
            return False
        return True

    return drop
