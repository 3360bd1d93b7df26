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
from kvferry.engine.prompt_regions import encode_request
from kvferry.engine.tokenizer import Message, encode_prompt
from kvferry.serving.convert import compression_fields, compression_from_proto, encode_request_proto
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
    tokenizer: Any | None,
    request: prefill_pb2.PrefillRequest,
    put: PutContext | None,
    default_cache: bool,
    max_tokens: int | None = None,
) -> PreparedRequest:
    """The prompt, compression and context of a Prefill call (tokenizing: off the event loop); `put`:
    the put context it names (put_of); `max_tokens` (max_model_len) bounds the input before it is
    tokenized (serving.convert.encode_request_proto)."""
    if put is not None:
        return _after_put(tokenizer, request, put, max_tokens)
    source = request.context.WhichOneof("source") if request.HasField("context") else None
    params = _compression(request)
    cache = _cache_context(request, params, default_cache)
    if source is None:
        encoded = encode_request_proto(
            tokenizer,
            request,
            max_tokens,
            params,
            chat_context=cache and request.WhichOneof("input") == "messages",
        )
    else:
        head = request.context.text if source == "text" else list(request.context.token_ids.ids)
        encoded = encode_request_proto(tokenizer, request, max_tokens, params, context=head)
    return PreparedRequest(encoded.ids, encoded.compression, encoded.context_len, cache)


def _after_put(
    tokenizer: Any | None, request: prefill_pb2.PrefillRequest, put: PutContext, max_tokens: int | None
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
        encoded = encode_request_proto(tokenizer, request, max_tokens, put.compression, context=head)
    else:
        require(
            which == "messages",
            "prompt",
            "this context was put as a conversation: send the turns after it as messages",
        )
        whole = prefill_pb2.PrefillRequest()
        whole.CopyFrom(request)
        turns = list(request.messages.messages)
        del whole.messages.messages[:]
        whole.messages.messages.extend([common_pb2.ChatMessage(**m) for m in put.messages])
        whole.messages.messages.extend(turns)
        encoded = encode_request_proto(tokenizer, whole, max_tokens, put.compression, chat_context=True)
        require(
            encoded.ids[: len(head)] == head and encoded.context_len == len(head),
            "messages",
            "the chat template renders the put conversation differently when these turns follow it",
        )
    cache = request.cache_context if request.HasField("cache_context") else True
    return PreparedRequest(encoded.ids, encoded.compression, len(head), cache)


def prepare_put(
    tokenizer: Any | None, request: common_pb2.PutContextRequest, max_tokens: int | None = None
) -> tuple[list[int], tuple[Message, ...] | None, CompressionParams | None, CompressionParams | None]:
    """A PutContext's token ids, conversation (None: text or token ids), compression as requests with
    its handle give it (their regions are added to it then), and compression of the put itself (the
    conversation's regions added)."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgumentError("text: set one of text, messages, token_ids", field="text")
    params = _compression(request)
    messages: tuple[Message, ...] | None = None
    if which == "messages":
        messages = tuple({"role": m.role, "content": m.content} for m in request.messages.messages)
        require(len(messages) > 0, "messages", "must hold at least one message")
        # the put conversation is what comes before a later question: measured with one after it
        with compression_fields():
            encoded = encode_request(
                tokenizer, messages=[*messages, _PROBE_TURN], compression=params, chat_context=True,
                max_tokens=max_tokens,
            )  # fmt: skip
        ids = encoded.ids[: encoded.context_len]
        require(len(ids) > 0, "messages", "render to no tokens before a question")
        return ids, messages, params, encoded.compression
    if which == "text":
        ids = encode_prompt(tokenizer, request.text, max_tokens)
    else:
        ids = [int(t) for t in request.token_ids.ids]
        require(len(ids) > 0, "token_ids", "must not be empty")
    require(
        max_tokens is None or len(ids) < max_tokens,
        which,
        f"has {len(ids):,} tokens but max_model_len is {max_tokens}; a context must leave room for a question",
    )
    return ids, None, params, params


def _compression(request: Any) -> CompressionParams | None:
    if not request.HasField("compression"):
        return None
    return compression_from_proto(request.compression)


def _cache_context(
    request: prefill_pb2.PrefillRequest, compression: CompressionParams | None, default: bool
) -> bool:
    """The request's cache_context, else the node's default for a method that may compress a context
    on its own (a query-aware one runs uncached rather than being refused)."""
    if request.HasField("cache_context"):
        return request.cache_context
    agnostic = compression is None or not compression.active or SCORERS[compression.method].query_agnostic
    return default and agnostic
