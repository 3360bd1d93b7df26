"""Prompt and chat encoding with the model's own tokenizer and chat template.

With `max_tokens` (the engine's max_model_len), a text too long for that many tokens is refused before
it is tokenized: tokenizing a 10 MB prompt takes seconds of CPU and gigabytes that the allocator keeps.
The bound is `max_tokens` times the longest token's text in UTF-8 bytes (`max_token_bytes`; 81 for
SmolLM2), an upper bound for tokenizers that encode every input byte (byte-level BPE, SentencePiece). A
tokenizer whose normalizer deletes characters could let a longer text through to the token-count check,
which refuses it after tokenizing.
"""

from __future__ import annotations

import weakref
from typing import Any

from kvferry.engine.errors import InvalidArgumentError, require

Message = dict[str, str]
CHAT_ROLES = ("system", "user", "assistant", "tool")
_MAX_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text one token stands for: the longest entry of the vocabulary (special
    and added tokens included). A byte-level BPE token string writes each byte as one character of a
    256-character alphabet, so its length is its byte count; any other token string is measured in
    UTF-8, which is at least the text it covers (SentencePiece's '▁' stands for a one-byte space).
    Computed once per tokenizer (~0.1 s for 49K entries)."""
    cached = _MAX_TOKEN_BYTES.get(tokenizer)
    if cached is None:
        from tokenizers.pre_tokenizers import ByteLevel

        byte_chars = set(ByteLevel.alphabet())
        cached = max(
            len(token) if byte_chars.issuperset(token) else len(token.encode("utf-8", "surrogatepass"))
            for token in tokenizer.get_vocab()
        )
        _MAX_TOKEN_BYTES[tokenizer] = cached
    return cached


def check_text_length(tokenizer: Any, num_bytes: int, max_tokens: int | None, field: str) -> None:
    """Refuse a text of `num_bytes` UTF-8 bytes that cannot fit `max_tokens` tokens, before tokenizing."""
    if max_tokens is None:
        return
    limit = max_tokens * max_token_bytes(tokenizer)
    require(
        num_bytes <= limit,
        field,
        f"is {num_bytes:,} bytes, more than {max_tokens:,} tokens (max_model_len) of this model can hold "
        f"({limit:,} bytes at most); shorten it",
    )


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def encode_prompt(tokenizer: Any | None, prompt: str | list[int], max_tokens: int | None = None) -> list[int]:
    if isinstance(prompt, str):
        require(prompt != "", "prompt", "must not be empty")
        if tokenizer is None:
            raise InvalidArgumentError("prompt: this model has no tokenizer; pass token ids", field="prompt")
        check_text_length(tokenizer, _utf8_length(prompt), max_tokens, "prompt")
        ids = list(tokenizer(prompt).input_ids)
    else:
        ids = [int(t) for t in prompt]
    require(len(ids) > 0, "prompt", "must not be empty")
    return ids


def encode_continuation(
    tokenizer: Any | None, prompt: str | list[int], max_tokens: int | None = None
) -> list[int]:
    """encode_prompt for text that follows other text (a prompt after its context): no BOS or other
    special tokens in front."""
    if isinstance(prompt, str) and tokenizer is not None:
        require(prompt != "", "prompt", "must not be empty")
        check_text_length(tokenizer, _utf8_length(prompt), max_tokens, "prompt")
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return encode_prompt(tokenizer, prompt, max_tokens)


def encode_chat(tokenizer: Any | None, messages: list[Message], max_tokens: int | None = None) -> list[int]:
    """ChatML-style messages -> token ids. A final assistant message is continued (an answer prefix).
    Roles are CHAT_ROLES; `max_tokens` refuses contents too long for it before the template runs."""
    require(len(messages) > 0, "messages", "must hold at least one message")
    for i, m in enumerate(messages):
        require(
            isinstance(m, dict) and "role" in m and "content" in m, "messages", "each needs role and content"
        )
        require(
            m["role"] in CHAT_ROLES,
            f"messages[{i}].role",
            f"unknown role {str(m['role'])[:40]!r}; use one of {', '.join(CHAT_ROLES)}",
        )
    if tokenizer is None:
        raise InvalidArgumentError("messages: this model has no tokenizer", field="messages")
    contents = sum(_utf8_length(str(m["content"])) for m in messages)
    check_text_length(tokenizer, contents, max_tokens, "messages")
    prefix = messages[-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=not prefix, continue_final_message=prefix, tokenize=True
    )
    if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def chat_message_spans(tokenizer: Any, messages: list[Message]) -> list[tuple[int, int]]:
    """[start, end) token range of each message inside encode_chat(messages); template tokens around a
    message (its role header, end marker, a default system prompt) belong to it, and the generation
    prompt belongs to the last message. Assumes the template renders each conversation prefix as a
    prefix of the whole (true of ChatML and Llama 3 templates)."""
    total = len(encode_chat(tokenizer, messages))
    ends = []
    for i in range(1, len(messages)):
        ids = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=False, tokenize=True)
        ends.append(len(ids if isinstance(ids, list) else ids["input_ids"]))
    ends.append(total)
    return list(zip([0, *ends[:-1]], ends))


def chat_context_len(tokenizer: Any, messages: list[Message]) -> int:
    """Tokens of encode_chat(messages) before its last user turn: the conversation's context (0
    without a user turn)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return 0
    return chat_message_spans(tokenizer, messages)[users[-1]][0]


def eos_token_ids(tokenizer: Any | None, config: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
