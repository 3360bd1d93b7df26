"""Protecting the question in the usual layout (document and question in one user message): a
`question` beside the input, `protect_question` (the trailing sentences, bounded), the warning when
`protect_last_user_turn` keeps most of the prompt, and the same behaviour from generate and
generate_chat. A tiny random Llama with SmolLM2's real tokenizer and chat template (conftest.chat_llm)."""

from __future__ import annotations

import logging

import pytest
from builders import greedy, long_document

from kvferry.engine import LLM, CompressionParams, InvalidArgumentError
from kvferry.engine.prompt_regions import QUESTION_SEPARATOR, encode_request

pytestmark = pytest.mark.usefixtures("single_thread")
DOCUMENT = long_document(30, "The access code of the north gate is 5093.", seed=3)
QUESTION = "What is the access code of the north gate?"


def encode(tokenizer: object, **request: object) -> tuple[list[int], CompressionParams]:
    encoded = encode_request(tokenizer, **request)  # type: ignore[arg-type]
    return encoded.ids, encoded.compression  # type: ignore[return-value]


def protected_text(llm: LLM, ids: list[int], params: CompressionParams) -> list[str]:
    return [llm.tokenizer.decode(ids[a:b]) for a, b in params.protected_spans]


def test_question_is_appended_and_kept(chat_llm: LLM) -> None:
    tok = chat_llm.tokenizer
    params = CompressionParams(retention=0.1)
    chat_ids, chat_params = encode(
        tok, messages=[{"role": "user", "content": DOCUMENT}], question=QUESTION, compression=params
    )
    joined = [{"role": "user", "content": DOCUMENT + QUESTION_SEPARATOR + QUESTION}]
    assert chat_ids == encode(tok, messages=joined)[0]  # the same prompt as writing it out
    (span,) = chat_params.protected_spans
    assert tok.decode(chat_ids[span[0] : span[1]]).lstrip().startswith(QUESTION)
    assert span[1] == len(chat_ids) and span[1] - span[0] < 30  # the question and the generation prompt
    text_ids, text_params = encode(tok, prompt=DOCUMENT, question=QUESTION, compression=params)
    assert text_ids == encode(tok, prompt=DOCUMENT + QUESTION_SEPARATOR + QUESTION)[0]
    assert protected_text(chat_llm, text_ids, text_params)[0].strip() == QUESTION
    # token ids: the question's own tokens after them
    ids_ids, ids_params = encode(tok, prompt=[7, 8, 9], question=QUESTION, compression=params)
    assert ids_ids[:3] == [7, 8, 9] and ids_params.protected_spans == [(3, len(ids_ids))]
    assert tok.decode(ids_ids[3:]).strip() == QUESTION


def test_question_survives_any_retention(chat_llm: LLM) -> None:
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": DOCUMENT}]
    params = CompressionParams(retention=0.01, sink=0, recent=0)
    (out,) = chat_llm.generate_chat([chat], greedy(3), compression=params, question=QUESTION)
    ids, encoded = encode(chat_llm.tokenizer, messages=chat, question=QUESTION, compression=params)
    (span,) = encoded.protected_spans
    assert out.prompt_token_ids == ids
    assert out.stats.protected_tokens == span[1] - span[0]
    heads = chat_llm.engine.num_layers * chat_llm.engine.num_kv_heads
    assert out.stats.kept_tokens == heads * (span[1] - span[0])  # only the question: 1% is less
    assert out.stats.protected_share < 0.05
    # generate and generate_chat treat `question` alike: one per request, or one for all
    a, b = chat_llm.generate(
        [DOCUMENT, "Short notes."], greedy(2), compression=params, question=[QUESTION, None]
    )
    assert a.stats.protected_tokens > 0 and b.stats.protected_tokens == 0
    chat_llm.engine.pool.assert_no_leaks()


def test_protect_question_keeps_just_the_trailing_question(chat_llm: LLM) -> None:
    tok = chat_llm.tokenizer
    content = DOCUMENT + "\n\nAnswer from the document. " + QUESTION
    params = CompressionParams(protect_question=True)
    ids, found = encode(tok, messages=[{"role": "user", "content": content}], compression=params)
    (text,) = protected_text(chat_llm, ids, found)
    assert text.lstrip().startswith("Answer from the document. " + QUESTION)  # both sentences: they fit
    assert "5093" not in text  # never back across the blank line into the document
    text_ids, text_found = encode(tok, prompt=content, compression=params)
    assert (
        protected_text(chat_llm, text_ids, text_found)[0].strip() == "Answer from the document. " + QUESTION
    )
    # at most question_tokens: whole sentences while they fit, then words of the last one
    (short,) = protected_text(
        chat_llm,
        *encode(
            tok, prompt=content, compression=CompressionParams(protect_question=True, question_tokens=12)
        ),
    )
    assert short.strip() == QUESTION
    (words,) = protected_text(
        chat_llm,
        *encode(tok, prompt=content, compression=CompressionParams(protect_question=True, question_tokens=4)),
    )
    assert QUESTION.endswith(words.strip()) and 0 < len(tok(words.strip()).input_ids) <= 5


def test_last_user_turn_warns_when_it_keeps_most_of_the_prompt(
    chat_llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    one_message = [{"role": "user", "content": DOCUMENT + "\n\n" + QUESTION}]
    params = CompressionParams(retention=0.25, protect_last_user_turn=True)
    with caplog.at_level(logging.WARNING, logger="kvferry.engine.prompt_regions"):
        (out,) = chat_llm.generate_chat([one_message], greedy(2), compression=params)
    assert "protect_last_user_turn keeps" in caplog.text and "question" in caplog.text
    assert out.stats.protected_share > 0.9 and out.stats.retention > 0.9
    caplog.clear()
    two_turns = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTION}]
    with caplog.at_level(logging.WARNING, logger="kvferry.engine.prompt_regions"):
        (out,) = chat_llm.generate_chat([two_turns], greedy(2), compression=params)
    assert caplog.text == "" and out.stats.protected_share < 0.1


@pytest.mark.parametrize(
    ("prompt", "compression", "question", "field"),
    [
        ("a plain prompt", {"protect_last_user_turn": True}, None, "protect_last_user_turn"),
        ([5, 6, 7], {"protect_system_prompt": True}, None, "protect_system_prompt"),
        ([5, 6, 7], {"protect_question": True}, None, "protect_question"),
        ("a plain prompt", None, "   ", "question"),
    ],
)
def test_region_options_that_cannot_apply_are_refused(
    chat_llm: LLM, prompt: object, compression: dict | None, question: str | None, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        chat_llm.generate(prompt, greedy(2), compression=compression, question=question)  # type: ignore[arg-type]
    assert err.value.field == field and field in str(err.value)
    assert not chat_llm.engine.has_unfinished()


def test_question_needs_a_tokenizer(tiny_model) -> None:  # type: ignore[no-untyped-def]
    tiny = tiny_model("llama")  # ships no tokenizer
    with pytest.raises(InvalidArgumentError) as err:
        encode_request(None, prompt=[1, 2, 3], question=QUESTION)
    assert err.value.field == "question" and tiny.loaded.tokenizer is None


def test_question_after_a_context(chat_llm: LLM) -> None:
    """With a context in front (the context cache's form of a prompt), the question's span moves with it."""
    tok = chat_llm.tokenizer
    encoded = encode_request(tok, prompt="Which gate?", context=DOCUMENT, question=QUESTION, compression={})
    head = tok(DOCUMENT).input_ids
    assert encoded.context_len == len(head) and encoded.ids[: len(head)] == head
    (span,) = encoded.compression.protected_spans
    assert tok.decode(encoded.ids[span[0] : span[1]]).strip() == QUESTION and span[1] == len(encoded.ids)
    chat = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "Which gate?"}]
    assert encode_request(tok, messages=chat, question=QUESTION, chat_context=True).context_len > len(head)
