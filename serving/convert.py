"""Proto messages <-> engine objects, for the prefill and decode services."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvferry.engine.compression import CompressionParams
from kvferry.engine.errors import InvalidArgumentError, require
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.tokenizer import Message, chat_protected_spans, encode_chat, encode_prompt
from kvferry.v1 import common_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SAMPLING_OPTIONALS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
_COMPRESSION_OPTIONALS = ("retention", "budget", "head_floor", "sink", "recent")
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


def encode_input(
    tokenizer: Any | None, request: Any, max_tokens: int | None = None
) -> tuple[list[int], list[Message] | None]:
    """The prompt token ids of a request with an `input` oneof, and its messages when it is a chat. With
    `max_tokens` (max_model_len), an input that cannot fit is refused before it is tokenized or copied."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("prompt: set one of prompt, messages, prompt_token_ids", field="prompt")
    if which == "prompt":
        return encode_prompt(tokenizer, request.prompt, max_tokens), None
    if which == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        return encode_chat(tokenizer, messages, max_tokens), messages
    count = len(request.prompt_token_ids.ids)
    require(count > 0, "prompt_token_ids", "must not be empty")
    require(
        max_tokens is None or count < max_tokens,
        "prompt",  # as the engine names it
        f"has {count:,} tokens but max_model_len is {max_tokens}; shorten it (one position must stay for output)",
    )
    return list(request.prompt_token_ids.ids), None


@contextmanager
def compression_fields() -> Iterator[None]:
    """Errors of CompressionParams checks, re-raised with their field named `compression.<field>`."""
    try:
        yield
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"compression.{e}", field=f"compression.{e.field}") from None


def compression_from_proto(
    msg: pb.CompressionParams, tokenizer: Any | None = None, messages: list[Message] | None = None
) -> CompressionParams:
    """engine.CompressionParams of a request; error fields are named `compression.<field>`."""
    values: dict[str, Any] = {
        name: getattr(msg, name) for name in _COMPRESSION_OPTIONALS if msg.HasField(name)
    }
    if msg.method:
        values["method"] = msg.method
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
    with compression_fields():
        params = CompressionParams(**values)
    if messages is not None and (params.protect_system_prompt or params.protect_last_user_turn):
        spans = chat_protected_spans(
            tokenizer, messages, params.protect_system_prompt, params.protect_last_user_turn
        )
        params = params.with_spans(spans)
    return params


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
    )
