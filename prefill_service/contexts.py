"""A Prefill call's context for the cache of compressed contexts, and the contexts put ahead of time.

A request's context (engine/context_cache.py) is one of: an explicit `context` (text or token ids) in
front of its input; a `context.handle` from PutContext (the context as it was put, which this node
remembers); or, for a conversation, its turns before the last user turn. `prepare` turns a
PrefillRequest into the prompt's token ids, its compression, the context's length and whether to cache
it: the request's `cache_context` when it says, else this node's default (`--cache-context`), which
leaves requests a query-aware method compresses uncached instead of refusing them.

`PutContexts` remembers put contexts (their token ids, conversation and compression), least recently
used first out beyond `max_put_context_tokens`; a forgotten or dropped handle is NOT_FOUND. The pages
themselves live in the engine's context cache, which may spill or evict them: a request with the
handle then computes the context again, from what is remembered here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvferry.engine.compression import SCORERS, CompressionParams
from kvferry.engine.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, require
from kvferry.engine.tokenizer import (
    Message,
    chat_context_len,
    encode_chat,
    encode_continuation,
    encode_prompt,
)
from kvferry.serving.convert import compression_from_proto, encode_input
from kvferry.v1 import common_pb2, prefill_pb2

_PROBE_TURN: Message = {"role": "user", "content": "?"}  # a question after a put conversation, to measure it


@dataclass(frozen=True)
class PreparedRequest:
    prompt: list[int]
    compression: CompressionParams | None
    context_len: int  # prompt tokens of the context at its start (0: none)
    cache_context: bool


@dataclass(frozen=True)
class PutContext:
    """What a handle stands for: the context's token ids, its conversation (a chat put: requests then
    send the turns after it) and its compression."""

    token_ids: np.ndarray  # [n] int32
    messages: tuple[Message, ...] | None
    compression: CompressionParams | None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)


class PutContexts:
    """Put contexts by handle, least recently used first out beyond `max_tokens` tokens in all."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._by_handle: OrderedDict[str, PutContext] = OrderedDict()
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._by_handle)

    def add(self, handle: str, context: PutContext) -> None:
        if context.num_tokens > self.max_tokens:
            raise ResourceExhaustedError(
                f"context: {context.num_tokens} tokens exceed this node's max_put_context_tokens "
                f"{self.max_tokens}",
                field="context",
                retryable=False,
            )
        self.drop(handle)
        self._by_handle[handle] = context
        self.tokens += context.num_tokens
        while self.tokens > self.max_tokens:
            _, old = self._by_handle.popitem(last=False)
            self.tokens -= old.num_tokens

    def get(self, handle: str) -> PutContext:
        context = self._by_handle.get(handle)
        if context is None:
            raise NotFoundError(
                f"context.handle: {handle!r} is not a context put on this node (never put, dropped, or "
                "forgotten for room: put it again)",
                field="context.handle",
            )
        self._by_handle.move_to_end(handle)
        return context

    def drop(self, handle: str) -> bool:
        context = self._by_handle.pop(handle, None)
        if context is not None:
            self.tokens -= context.num_tokens
        return context is not None


def put_of(request: prefill_pb2.PrefillRequest, puts: PutContexts) -> PutContext | None:
    """The put context a request names by handle (NOT_FOUND when unknown), or None."""
    if request.HasField("context") and request.context.WhichOneof("source") == "handle":
        return puts.get(request.context.handle)
    return None


def prepare(
    tokenizer: Any | None, request: prefill_pb2.PrefillRequest, put: PutContext | None, default_cache: bool
) -> PreparedRequest:
    """The prompt, compression and context of a Prefill call (tokenizing: off the event loop); `put`:
    the put context it names (put_of)."""
    if put is not None:
        return _after_put(tokenizer, request, put)
    source = request.context.WhichOneof("source") if request.HasField("context") else None
    which = request.WhichOneof("input")
    if source is None:
        prompt, messages = encode_input(tokenizer, request)
        compression = _compression(request, tokenizer, messages)
        cache = _cache_context(request, compression, default_cache)
        context_len = chat_context_len(tokenizer, messages) if cache and messages is not None else 0
        return PreparedRequest(prompt, compression, context_len, cache)
    require(
        which != "messages",
        "context",
        "a conversation's context is its turns before the last user turn: send messages without a context",
    )
    head = encode_prompt(
        tokenizer, request.context.text if source == "text" else list(request.context.token_ids.ids)
    )
    body = _continuation(tokenizer, request)
    compression = _compression(request, tokenizer, None)
    return PreparedRequest(
        head + body, compression, len(head), _cache_context(request, compression, default_cache)
    )


def _after_put(
    tokenizer: Any | None, request: prefill_pb2.PrefillRequest, put: PutContext
) -> PreparedRequest:
    require(
        not request.HasField("compression"),
        "compression",
        "a request on a put context is compressed as the context was put: leave compression unset",
    )
    head = put.token_ids.tolist()
    which = request.WhichOneof("input")
    if put.messages is None:
        require(
            which in ("prompt", "prompt_token_ids"),
            "messages",
            "this context was put as text or token ids: send the text (or tokens) that follows it as the prompt",
        )
        prompt = head + _continuation(tokenizer, request)
    else:
        require(
            which == "messages",
            "prompt",
            "this context was put as a conversation: send the turns after it as messages",
        )
        turns = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        prompt = encode_chat(tokenizer, [*put.messages, *turns])
        require(
            prompt[: len(head)] == head,
            "messages",
            "the chat template renders the put conversation differently when these turns follow it",
        )
    cache = request.cache_context if request.HasField("cache_context") else True
    return PreparedRequest(prompt, put.compression, len(head), cache)


def prepare_put(
    tokenizer: Any | None, request: common_pb2.PutContextRequest
) -> tuple[list[int], tuple[Message, ...] | None, CompressionParams | None]:
    """A PutContext's token ids, conversation (None: text or token ids) and compression."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("text: set one of text, messages, token_ids", field="text")
    messages: tuple[Message, ...] | None = None
    probe = None
    if which == "text":
        ids = encode_prompt(tokenizer, request.text)
    elif which == "token_ids":
        ids = [int(t) for t in request.token_ids.ids]
        require(len(ids) > 0, "token_ids", "must not be empty")
    else:
        messages = tuple({"role": m.role, "content": m.content} for m in request.messages.messages)
        require(len(messages) > 0, "messages", "must hold at least one message")
        probe = [*messages, _PROBE_TURN]  # the put conversation is what comes before a later question
        ids = encode_chat(tokenizer, probe)[: chat_context_len(tokenizer, probe)]
        require(len(ids) > 0, "messages", "render to no tokens before a question")
    compression = _compression(request, tokenizer, probe)
    return ids, messages, compression


def _continuation(tokenizer: Any | None, request: prefill_pb2.PrefillRequest) -> list[int]:
    """The input after a context: text without a new BOS, or token ids."""
    which = request.WhichOneof("input")
    if which == "prompt":
        return encode_continuation(tokenizer, request.prompt)
    if which == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)
        require(len(ids) > 0, "prompt_token_ids", "must not be empty")
        return ids
    raise InvalidArgumentError("prompt: set one of prompt, prompt_token_ids after a context", field="prompt")


def _compression(
    request: Any, tokenizer: Any | None, messages: list[Message] | None
) -> CompressionParams | None:
    if not request.HasField("compression"):
        return None
    return compression_from_proto(request.compression, tokenizer, messages)


def _cache_context(
    request: prefill_pb2.PrefillRequest, compression: CompressionParams | None, default: bool
) -> bool:
    """The request's cache_context, else the node's default for a method that may compress a context
    on its own (a query-aware one runs uncached rather than being refused)."""
    if request.HasField("cache_context"):
        return request.cache_context
    agnostic = compression is None or not compression.active or SCORERS[compression.method].query_agnostic
    return default and agnostic
