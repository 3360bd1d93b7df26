"""The quality benchmark's task generator (a word count stands in for tokens), its splits and
scoring, and the harness's tokenisation and question feeding on the real SmolLM2."""

from __future__ import annotations

from typing import Any

import pytest
from quality_tasks import (
    AFTER_DOCUMENT,
    FAMILIES,
    TEST_SEED_BASE,
    make_sample,
    prose_paragraphs,
    score,
    split_of,
    split_seeds,
)

REPEATED = {"most_frequent": 5}  # families whose answer is stated more than once, by design


def words(text: str) -> int:
    return len(text.split())


def document_of(s: Any) -> str:
    user = s.messages[0]["content"]
    q0, q1 = s.question_span
    return user[: s.context_end].replace(user[q0:q1], "")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [1500, 4000])
def test_sample_shape_and_facts(family: str, length: int) -> None:
    s = make_sample(family, length, seed=3, count=words)
    user, prefix = s.messages[0]["content"], s.messages[1]["content"]
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    q0, q1 = s.question_span
    assert user[q0:q1] == f"Question: {s.question}"
    if family == "question_first":
        assert q1 < s.context_end and user.endswith(AFTER_DOCUMENT)
    else:
        assert q0 == s.context_end + 2 and user.endswith(f"Question: {s.question}")
    document = document_of(s)
    for answer in s.answers:
        # stated in the context the right number of times, never given away by the question or prefix
        assert document.count(answer) == REPEATED.get(family, 1), (answer, family)
        assert answer not in s.question and answer not in prefix
    assert length * 0.85 <= words(user) <= length * 1.05
    assert s.max_new_tokens > 0
    assert len(s.answer_depths) == len(s.answers) and all(0 <= d <= 1 for d in s.answer_depths)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_per_seed(family: str) -> None:
    a, b = make_sample(family, 800, 7, words), make_sample(family, 800, 7, words)
    assert a == b
    assert make_sample(family, 800, 8, words).messages != a.messages


def test_splits_are_disjoint_and_fixed() -> None:
    tuning, test = split_seeds("tuning", 50), split_seeds("test", 50)
    assert tuning == list(range(50)) and test == list(range(TEST_SEED_BASE, TEST_SEED_BASE + 50))
    assert not set(tuning) & set(test)
    assert {split_of(s) for s in tuning} == {"tuning"} and {split_of(s) for s in test} == {"test"}
    assert make_sample("doc_qa", 800, test[0], words).split == "test"
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("train", 1)


def test_needle_depth_places_the_needle_near_its_bucket() -> None:
    for seed in range(9):
        s = make_sample("needle_depth", 3000, seed, words)
        lo, hi = {"start": (0.0, 0.15), "middle": (0.42, 0.58), "end": (0.85, 1.0)}[s.depth_bucket]
        assert lo <= s.answer_depths[0] <= hi, (seed, s.depth_bucket, s.answer_depths)
    assert {make_sample("needle_depth", 800, k, words).depth_bucket for k in range(3)} == {
        "start",
        "middle",
        "end",
    }


def test_entity_prose_is_natural_prose_from_engine_data() -> None:
    s = make_sample("entity_prose", 2500, 0, words)
    paragraphs = prose_paragraphs()
    assert len(paragraphs) >= 10
    assert sum(p in s.messages[0]["content"] for p in paragraphs) >= 5


def test_var_chain_reads_forward() -> None:
    for seed in range(5):
        s = make_sample("var_chain", 1000, seed, words)
        user = s.messages[0]["content"]
        value = s.answers[0]
        holder = user[user.index(f"= {value}.") - 10 : user.index(f"= {value}.")].split()[-1]
        assert user.index(f"VAR {holder} = {value}") < user.index(f"= VAR {holder}.")


def test_score_is_the_share_of_answers_found() -> None:
    s = make_sample("multi_value", 600, 0, words)
    one, two, three = s.answers
    assert score(s.answers, f" {one}, {two} and {three}.") == 1.0
    assert score(s.answers, f" {one}, and more") == pytest.approx(1 / 3)
    assert score(s.answers, " no idea") == 0.0


def test_unknown_family_raises() -> None:
    with pytest.raises(ValueError, match="unknown task family"):
        make_sample("nope", 500, 0, words)


@pytest.mark.parametrize("family", ["doc_qa", "question_first"])
def test_tokenize_maps_the_context_and_question_boundaries(smollm2: Any, family: str) -> None:
    from quality import tokenize

    tok = smollm2.tokenizer
    s = make_sample(family, 500, 0, lambda t: len(tok(t, add_special_tokens=False).input_ids))
    p = tokenize(tok, s)
    context = tok.decode(p.ids[: p.context_len])
    assert context.endswith(s.messages[0]["content"][s.context_end - 20 : s.context_end])
    assert tok.decode(p.ids[p.question[0] : p.question[1]]).strip() == f"Question: {s.question}"
    assert tok.decode(p.ids[p.context_len :]).endswith(s.messages[1]["content"])


def test_feeding_the_question_over_a_whole_cache_answers_like_the_full_prefill(smollm2: Any) -> None:
    """At retention 1 every cell keeps every token: the context setting, which feeds the question
    one decode step at a time after compression, must then answer exactly as the full-cache
    prefill does, and the whole setting too; run_sample ends with the pool's leak check."""
    from quality import run_sample, tokenize

    engine = smollm2.engine
    tok = engine.tokenizer
    s = make_sample("doc_qa", 450, 1, lambda t: len(tok(t, add_special_tokens=False).input_ids))
    result = run_sample(
        engine, tokenize(tok, s), {"compactor": {"method": "compactor"}}, [1.0], ["whole", "context"]
    )
    assert result["full"]["score"] == 1.0
    for key in ("whole|compactor@1.0", "context|compactor@1.0"):
        cell = result["cells"][key]
        assert cell["text"] == result["full"]["text"] and cell["first_token_agrees"] is True, key
        assert cell["kept"] == 1.0
    assert result["context_tokens"] < result["prompt_tokens"]
    assert result["signals"]["nll_mean"] > 0
