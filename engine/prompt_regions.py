"""A request's input as token ids, and the regions of it that compression must keep as token spans.

Regions: the system message and the last user turn (chat prompts: `protect_system_prompt`,
`protect_last_user_turn`), the trailing question (`protect_question`: the last sentences of the last
user turn, or of a plain prompt, that fit in `question_tokens` tokens), and a `question` given beside
the input, which is appended to it (after a text or token-id prompt, or as the last part of the last
user message) and always kept. The usual layout puts the document and the question in one user
message, where `protect_last_user_turn` keeps the document too: it warns when it keeps most of the
prompt, and the stats report the protected share (`RequestStats.protected_tokens`).

A region that starts inside a text becomes a span by encoding the input with and without the text
from the region's first character on: the first token where the two encodings differ starts the
span (a token merging across that character is kept with the region). Spans run to the end of the
prompt, so the template's end of turn and generation prompt are kept with them. The offline API
(LLM.generate, generate_chat) and the prefill service both encode through `encode_request`, so both
keep the same tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvferry.engine.compression.params import CompressionParams, as_compression_params
from kvferry.engine.errors import InvalidArgumentError, require
from kvferry.engine.tokenizer import (
    Message,
    chat_context_len,
    chat_message_spans,
    encode_chat,
    encode_continuation,
    encode_prompt,
)

log = logging.getLogger(__name__)

QUESTION_SEPARATOR = "\n\n"  # between the input and an appended `question`
LAST_TURN_WARN_SHARE = 0.5  # protect_last_user_turn keeping more of the prompt than this is warned about
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+|\n+")  # what ends a sentence (a line ends one too)
_PARAGRAPH = re.compile(r"\n\s*\n")
_CHAT_ONLY = ("protect_system_prompt", "protect_last_user_turn")


@dataclass
class EncodedRequest:
    ids: list[int]  # the prompt's token ids, context and question included
    compression: CompressionParams | None  # the request's, its regions added to protected_spans
    context_len: int = 0  # tokens of a cached context at the start of `ids` (0: none asked for)


def encode_request(
    tokenizer: Any | None,
    prompt: str | list[int] | None = None,
    messages: list[Message] | None = None,
    question: str | None = None,
    compression: Any = None,
    context: str | list[int] | None = None,
    chat_context: bool = False,
    max_tokens: int | None = None,
) -> EncodedRequest:
    """The prompt's token ids (a `question` appended) and its compression params with every region it
    asks to keep added to `protected_spans`. Exactly one of prompt and messages. `context` (plain
    prompts) goes in front of the prompt; `chat_context`: a chat's context, everything before its last
    user turn, is measured (both for the context cache). `max_tokens` (max_model_len) refuses a text
    too long for it before it is tokenized."""
    params = as_compression_params(compression)
    if question is not None:
        require(isinstance(question, str) and question.strip() != "", "question", "must be non-empty text")
    if messages is not None:
        return _encode_chat(tokenizer, messages, question, params, chat_context, max_tokens)
    assert prompt is not None
    return _encode_plain(tokenizer, prompt, question, params, context, max_tokens)


def _encode_plain(
    tokenizer: Any | None,
    prompt: str | list[int],
    question: str | None,
    params: CompressionParams | None,
    context: str | list[int] | None,
    max_tokens: int | None,
) -> EncodedRequest:
    for name in _CHAT_ONLY:
        require(
            params is None or not getattr(params, name),
            name,
            "needs a chat prompt (messages); for a plain prompt pass the question as `question`, or use "
            "protect_question or protected_spans",
        )
    head = [] if context is None else encode_prompt(tokenizer, context, max_tokens)
    spans: list[tuple[int, int]] = []
    if isinstance(prompt, str):
        text = prompt if question is None else prompt + QUESTION_SEPARATOR + question
        body = (
            encode_continuation(tokenizer, text, max_tokens)
            if head
            else encode_prompt(tokenizer, text, max_tokens)
        )

        def encode(start: str) -> list[int]:  # as `body` was encoded: no BOS after a context
            return list(tokenizer(start, add_special_tokens=not head).input_ids)  # type: ignore[misc]

        if question is not None:
            spans.append((_region_start(encode, text, len(text) - len(question), body), len(body)))
        if params is not None and params.protect_question:
            start = _question_start(tokenizer, text, params.question_tokens)
            spans.append((_region_start(encode, text, start, body), len(body)))
    else:
        body = encode_prompt(tokenizer, prompt, max_tokens)
        require(
            params is None or not params.protect_question,
            "protect_question",
            "needs a text prompt or messages (it finds the question's sentences in the text); for token "
            "ids use protected_spans",
        )
        if question is not None:
            if tokenizer is None:
                raise InvalidArgumentError("question: this model has no tokenizer", field="question")
            body = body + list(tokenizer(QUESTION_SEPARATOR + question, add_special_tokens=False).input_ids)
            spans.append((len(prompt), len(body)))
    shift = len(head)
    spans = [(a + shift, b + shift) for a, b in spans]
    return EncodedRequest(head + body, _with_spans(params, spans), len(head))


def _encode_chat(
    tokenizer: Any | None,
    messages: list[Message],
    question: str | None,
    params: CompressionParams | None,
    chat_context: bool,
    max_tokens: int | None,
) -> EncodedRequest:
    messages = list(messages)
    if question is not None:
        messages = _with_question(messages, question)
    ids = encode_chat(tokenizer, messages, max_tokens)  # checks the messages and that there is a tokenizer
    context_len = chat_context_len(tokenizer, messages) if chat_context else 0
    if params is None:
        return EncodedRequest(ids, None, context_len)
    spans: list[tuple[int, int]] = []
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if params.protect_system_prompt or params.protect_last_user_turn:
        turns = chat_message_spans(tokenizer, messages)
        if params.protect_system_prompt and messages[0]["role"] == "system":
            spans.append(turns[0])
        if params.protect_last_user_turn and users:
            start = turns[users[-1]][0]
            spans.append((start, len(ids)))
            _warn_if_most(len(ids) - start, len(ids))
    if users and (question is not None or params.protect_question):
        last = users[-1]
        content = messages[last]["content"]

        def encode(head: str) -> list[int]:
            return encode_chat(
                tokenizer, [*messages[:last], {**messages[last], "content": head}, *messages[last + 1 :]]
            )

        if question is not None:
            spans.append((_region_start(encode, content, len(content) - len(question), ids), len(ids)))
        if params.protect_question:
            start = _question_start(tokenizer, content, params.question_tokens)
            spans.append((_region_start(encode, content, start, ids), len(ids)))
    return EncodedRequest(ids, _with_spans(params, spans), context_len)


def _with_question(messages: list[Message], question: str) -> list[Message]:
    """The question as the last part of the last user message (a new user message if there is none)."""
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return [*messages, {"role": "user", "content": question}]
    last = users[-1]
    turn = messages[last]
    require(isinstance(turn.get("content"), str), "messages", "each needs role and content")
    content = turn["content"] + QUESTION_SEPARATOR + question if turn["content"] else question
    return [*messages[:last], {**turn, "content": content}, *messages[last + 1 :]]


def _region_start(encode: Callable[[str], list[int]], text: str, cut: int, ids: list[int]) -> int:
    """The token where text[cut:] starts in `ids` (= encode(text)): where encode(text[:cut]) stops agreeing."""
    head = encode(text[:cut])
    k = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        k += 1
    return min(k, len(ids) - 1)


def _question_start(tokenizer: Any, text: str, max_tokens: int) -> int:
    """Character offset of the trailing question of `text`: its last sentences, whole, that fit in
    `max_tokens` tokens together, never reaching back across a blank line once one sentence is taken;
    a last sentence longer than that is cut to its last words that fit."""
    body = text.rstrip()
    if not body:
        return 0

    def tokens(start: int) -> int:
        return len(tokenizer(body[start:], add_special_tokens=False).input_ids)

    starts = [0, *(m.end() for m in _SENTENCE_END.finditer(body))]
    starts = sorted({s for s in starts if s < len(body)})
    paragraph = max((m.end() for m in _PARAGRAPH.finditer(body)), default=0)
    taken: int | None = None
    for start in reversed(starts):
        if tokens(start) > max_tokens or (taken is not None and start < paragraph <= taken):
            break
        taken = start
    if taken is not None:
        return taken
    # the last sentence alone is too long: its last words that fit (a word is at least one token)
    last = starts[-1]
    words = [last + m.start() for m in re.finditer(r"\S+", body[last:])][-max_tokens:]
    lo, hi = 0, len(words) - 1  # the first word index whose tail fits; the last word alone may not
    while lo < hi:
        mid = (lo + hi) // 2
        if tokens(words[mid]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return words[lo]


def _warn_if_most(protected: int, total: int) -> None:
    share = protected / total
    if share > LAST_TURN_WARN_SHARE:
        log.warning(
            "protect_last_user_turn keeps %d of the prompt's %d tokens (%.0f%%): the last user turn holds "
            "most of the prompt (a document?), so compression can remove little of it; pass the question "
            "as `question` or use protect_question to keep just the question",
            protected, total, 100 * share,
        )  # fmt: skip


def _with_spans(params: CompressionParams | None, spans: list[tuple[int, int]]) -> CompressionParams | None:
    return params if params is None or not spans else params.with_spans(spans)
