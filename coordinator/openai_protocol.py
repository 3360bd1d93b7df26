"""The OpenAI API's request and response bodies, as the coordinator's HTTP front speaks them.

Requests are pydantic models (an unknown field is refused, as OpenAI does, so a misspelt kvferry option
never passes silently) that become the gRPC API's GenerateRequest through the Python clients' own
builder, so a request means the same thing on both APIs. kvferry's options travel as extra body fields,
the way vLLM takes them (`extra_body` in the openai client): `compression` (a method name or a dict of
CompressionParams fields), `retention` (a fraction or "auto"), `question` (appended to the prompt or the
last user message and always kept by compression), `top_k`, `ignore_eos`, `stop_token_ids`, `request_id`,
`timeout` (the request's deadline in seconds), and for the cache of compressed contexts
`cache_context`, `context` (text or token ids in front of the prompt) and `context_handle` (a
PutContext handle instead). Responses carry `usage` (with `prompt_tokens_details.cached_tokens` on a
request with a cached context) and, in the extra field `kvferry`, what compression kept and shipped
and what the context cache did.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvferry.clients.requests import GENERATE, ContextHandle, build_request
from kvferry.engine.errors import InvalidArgumentError
from kvferry.v1 import coordinator_pb2

MAX_UINT32 = (1 << 32) - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerateBody(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records: accepted, not used
    # OpenAI features kvferry does not have: refused unless left at their defaults
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # kvferry's own options (extra_body)
    compression: str | dict[str, Any] | None = None
    retention: Annotated[float, Field(allow_inf_nan=False)] | Literal["auto"] | None = None
    question: str | None = None
    top_k: int | None = Field(None, ge=0, le=MAX_UINT32)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    request_id: str | None = None
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)
    cache_context: bool | None = None
    context: str | list[int] | None = None
    context_handle: str | None = None

    def refuse_unsupported(self) -> None:
        for name in ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(self, name):
                raise InvalidArgumentError(f"{name}: not supported by kvferry", field=name)
        if self.context is not None and self.context_handle is not None:
            raise InvalidArgumentError(
                "context: give a context or a context_handle, not both", field="context"
            )
        if isinstance(self.context, list) and not all(0 <= t <= MAX_UINT32 for t in self.context):
            raise InvalidArgumentError("context: token ids must be in [0, 2^32)", field="context")

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def to_request(self, request_id: str, **prompt: Any) -> coordinator_pb2.GenerateRequest:
        """The gRPC API's request for this body; `prompt`: build_request's prompt= or messages=."""
        self.refuse_unsupported()
        sampling = dict(
            max_new_tokens=self.max_new_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos or None,
        )
        try:
            return build_request(
                GENERATE,
                prompt.get("prompt"),
                prompt.get("messages"),
                self.compression,
                self.retention,
                request_id,
                sampling,
                self.question,
                ContextHandle(self.context_handle) if self.context_handle is not None else self.context,
                self.cache_context,
            )
        except (TypeError, ValueError) as e:  # a compression knob protobuf cannot hold
            raise InvalidArgumentError(f"compression: {e}", field="compression") from None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: the engine refuses what it cannot use
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgumentError(
                    f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                    field=f"messages[{index}].content",
                )
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_GenerateBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)
    # accepted and not used: they change nothing a single model server does
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # tool use and structured output are not supported: refused unless left unset
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidArgumentError("tools: tool calls are not supported by kvferry", field="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidArgumentError(
                "response_format: only {'type': 'text'} is supported", field="response_format"
            )

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # the newer name wins

    def to_generate(self, request_id: str) -> coordinator_pb2.GenerateRequest:
        # "developer" is OpenAI's newer name for the system turn
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]
        return self.to_request(request_id, messages=messages)


class CompletionRequest(_GenerateBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise InvalidArgumentError(f"{name}: not supported by kvferry", field=name)

    def to_generate(self, request_id: str) -> coordinator_pb2.GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidArgumentError("prompt: one prompt per request (n=1)", field="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and (not prompt or not all(0 <= t <= MAX_UINT32 for t in prompt)):
            raise InvalidArgumentError("prompt: token ids must be a non-empty list of ids", field="prompt")
        return self.to_request(request_id, prompt=prompt)


FINISH_REASONS = {0: None, 1: "stop", 2: "length", 3: "abort"}  # common_pb2.FinishReason -> OpenAI


def usage(stats: coordinator_pb2.GenerateStats, completion_tokens: int) -> dict[str, Any]:
    p = stats.prefill
    prompt_tokens = p.prompt_tokens
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if p.context_cache != "off" and p.context_cache:  # OpenAI's and vLLM's field for reused prompt tokens
        body["prompt_tokens_details"] = {"cached_tokens": prompt_tokens - p.prefill_tokens_computed}
    return body


def kvferry_stats(stats: coordinator_pb2.GenerateStats) -> dict[str, Any]:
    """The `kvferry` extra field: what compression kept and shipped, and where the time went."""
    p = stats.prefill
    return {
        "request_id": stats.request_id,
        "compression_method": p.compression_method,
        "retention": p.retention,
        "chosen_retention": p.chosen_retention,
        **({"context_nll": p.context_nll} if p.HasField("context_nll") else {}),
        "protected_share": p.protected_share,
        "kept_tokens": p.kept_tokens,
        "full_tokens": p.full_tokens,
        "kv_bytes_shipped": p.kv_bytes_shipped,
        "kv_bytes_full": p.kv_bytes_full,
        "transport": p.transport,
        "ttft_seconds": stats.ttft_seconds,
        "total_seconds": stats.total_seconds,
        "prefill_node": stats.prefill_node,
        "decode_node": stats.decode_node,
        "context_cache": p.context_cache or "off",
        "decode_context_cache": stats.decode.context_cache or "off",
        "context_tokens": p.context_tokens,
        "context_kept_tokens": p.context_kept_tokens,
        "prefill_tokens_computed": p.prefill_tokens_computed,
        "context_handle": p.context_handle,
    }


class ResponseShape:
    """Builds the bodies of one request's answer: whole (chat.completion / text_completion) or as
    stream chunks, with the same id, creation time and model throughout."""

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def whole(
        self,
        text: str,
        finish_reason: str | None,
        stats: coordinator_pb2.GenerateStats,
        completion_tokens: int,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text}
            body = self._head("text_completion")
        choice.update(finish_reason=finish_reason, logprobs=None)
        body.update(choices=[choice], usage=usage(stats, completion_tokens), kvferry=kvferry_stats(stats))
        return body

    def chunk(
        self, text: str, finish_reason: str | None = None, first: bool = False, **extra: Any
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text}
            body = self._head("text_completion")
        choice.update(finish_reason=finish_reason, logprobs=None)
        body.update(choices=[choice], **extra)
        return body

    def usage_chunk(self, stats: coordinator_pb2.GenerateStats, completion_tokens: int) -> dict[str, Any]:
        """stream_options.include_usage: the last chunk, with no choice and the usage."""
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body.update(choices=[], usage=usage(stats, completion_tokens))
        return body
