"""Keyword arguments -> the coordinator's request messages (shared by both clients)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvferry.engine.retention import check_retention
from kvferry.v1 import common_pb2, coordinator_pb2

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class ContextHandle:
    """A context put on the cluster (`put_context`): pass it as `context=` instead of the context
    itself. `ContextHandle("<hex>")` names one by its handle alone."""

    handle: str
    context_tokens: int = 0  # tokens of the context
    cached_tokens: int = 0  # of them, cached (whole pages)
    kept_tokens: int = 0  # kept over all layers and kv heads after compression
    cached: bool = False  # the prefill node keeps its pages (else each request computes it again)
    hit: bool = False  # it was cached already
    prefill_node: str = ""
    seconds: float = 0.0

    @classmethod
    def from_proto(cls, msg: common_pb2.PutContextResponse) -> ContextHandle:
        return cls(
            msg.handle, msg.context_tokens, msg.cached_tokens, msg.kept_tokens, msg.cached, msg.hit,
            msg.prefill_node, msg.seconds,
        )  # fmt: skip


Context = str | Sequence[int] | ContextHandle
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "seed",
    "stop_token_ids",
    "stop",
    "ignore_eos",
)
_COMPRESSION_FIELDS = (
    "retention",
    "budget",
    "head_floor",
    "sink",
    "recent",
    "protect_system_prompt",
    "protect_last_user_turn",
    "quality_target",
    "keep_tokens",
    "protect_question",
    "question_tokens",
)


def build_request(
    message_type: type,
    prompt: str | Sequence[int] | None,
    messages: Messages | None,
    compression: str | Mapping[str, Any] | None,
    retention: float | str | None,
    request_id: str | None,
    sampling: Mapping[str, Any],
    question: str | None = None,
    context: Context | None = None,
    cache_context: bool | None = None,
) -> Any:
    """A GenerateRequest or GenerateUnaryRequest.

    `prompt` is text or token ids; `messages` a chat ([{"role", "content"}]); exactly one of them.
    `question` is appended to it and always kept by compression. `compression` is a method name or a
    dict of CompressionParams fields (method, retention, quality_target, keep_tokens, budget, sink,
    recent, protected_spans, protect_question, knobs...); `retention` (a fraction or "auto") alone
    implies the default method. Neither: the services' compression policy. `context`: text or token
    ids in front of the prompt, or a ContextHandle from put_context; `cache_context`: cache it (None:
    the cluster's default).
    """
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt or messages")
    request = message_type(request_id=request_id or "")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.ids.extend(int(t) for t in prompt)
    else:
        request.messages.messages.extend(
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages
        )
    unknown = set(sampling) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}; known: {list(_SAMPLING_FIELDS)}")
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request.sampling, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(request.sampling, name, value)
    spec = _compression_spec(compression, retention)
    if spec is not None:
        request.compression.CopyFrom(spec)
    if context is not None:
        request.context.CopyFrom(context_message(context))
    if cache_context is not None:
        request.cache_context = cache_context
    if question is not None:
        request.question = question
    return request


def context_message(context: Context) -> common_pb2.Context:
    if isinstance(context, ContextHandle):
        return common_pb2.Context(handle=context.handle)
    if isinstance(context, str):
        return common_pb2.Context(text=context)
    return common_pb2.Context(token_ids=common_pb2.TokenIds(ids=[int(t) for t in context]))


def build_put_context(
    context: str | Sequence[int] | None,
    messages: Messages | None,
    compression: str | Mapping[str, Any] | None,
    retention: float | str | None,
    request_id: str | None,
) -> common_pb2.PutContextRequest:
    """A PutContextRequest: `context` (text or token ids) or `messages` (the conversation before the
    questions), exactly one of them."""
    if (context is None) == (messages is None):
        raise ValueError("pass exactly one of context or messages")
    request = common_pb2.PutContextRequest(request_id=request_id or "")
    if isinstance(context, str):
        request.text = context
    elif context is not None:
        request.token_ids.ids.extend(int(t) for t in context)
    else:
        request.messages.messages.extend(
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()
        )
    spec = _compression_spec(compression, retention)
    if spec is not None:
        request.compression.CopyFrom(spec)
    return request


def _compression_spec(compression: str | Mapping[str, Any] | None, retention: float | str | None) -> Any:
    if compression is None and retention is None:
        return None
    values = (
        {"method": compression} if isinstance(compression, str) or compression is None else dict(compression)
    )
    if retention is not None:
        values["retention"] = retention
    msg = common_pb2.CompressionParams(method=values.pop("method", None) or "")
    if isinstance(
        values.get("retention"), str
    ):  # "auto" travels as auto_retention; numbers the server checks
        check_retention(values.pop("retention"), "compression.retention")
        msg.auto_retention = True
    for span in values.pop("protected_spans", ()):
        msg.protected_spans.add(start=span[0], end=span[1])
    for name, value in values.pop("knobs", {}).items():
        msg.knobs[name] = value
    for name in _COMPRESSION_FIELDS:
        if values.get(name) is not None:
            setattr(msg, name, values.pop(name))
        values.pop(name, None)
    for name, value in values.items():  # method-specific settings given flat: leverage_weight=0.4 ...
        msg.knobs[name] = value
    return msg


GENERATE = coordinator_pb2.GenerateRequest
GENERATE_UNARY = coordinator_pb2.GenerateUnaryRequest
