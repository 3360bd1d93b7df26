"""Prompt and chat encoding with the model's own tokenizer and chat template."""

from __future__ import annotations

from typing import Any

from kvferry.engine.errors import InvalidArgumentError, require

Message = dict[str, str]


def encode_prompt(tokenizer: Any | None, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        require(prompt != "", "prompt", "must not be empty")
        if tokenizer is None:
            raise InvalidArgumentError("prompt: this model has no tokenizer; pass token ids", field="prompt")
        ids = list(tokenizer(prompt).input_ids)
    else:
        ids = [int(t) for t in prompt]
    require(len(ids) > 0, "prompt", "must not be empty")
    return ids


def encode_continuation(tokenizer: Any | None, prompt: str | list[int]) -> list[int]:
    """encode_prompt for text that follows other text (a prompt after its context): no BOS or other
    special tokens in front."""
    if isinstance(prompt, str) and tokenizer is not None:
        require(prompt != "", "prompt", "must not be empty")
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)
    return encode_prompt(tokenizer, prompt)


def encode_chat(tokenizer: Any | None, messages: list[Message]) -> list[int]:
    """ChatML-style messages -> token ids. A final assistant message is continued (an answer prefix)."""
    require(len(messages) > 0, "messages", "must hold at least one message")
    for m in messages:
        require(
            isinstance(m, dict) and "role" in m and "content" in m, "messages", "each needs role and content"
        )
    if tokenizer is None:
        raise InvalidArgumentError("messages: this model has no tokenizer", field="messages")
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
