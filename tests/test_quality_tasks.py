"""The quality benchmark's task generator and scorer (no model: a word count stands in for tokens)."""

from __future__ import annotations

import pytest
from quality_tasks import TASKS, make_sample, score


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", TASKS)
def test_sample_shape_and_facts(task: str) -> None:
    s = make_sample(task, 1500, seed=3, count=words)
    user, prefix = s.messages[0]["content"], s.messages[1]["content"]
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert user.endswith(f"Question: {s.question}")
    document = user[: user.rindex("\n\nQuestion:")]
    # Every expected answer is stated in the document, and not given away by the question or prefix.
    for answer in s.answers:
        assert answer in document
        assert answer not in s.question and answer not in prefix
    assert 1500 - 200 <= words(user) <= 1500 + 100
    assert s.max_new_tokens > 0


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task: str) -> None:
    a, b = make_sample(task, 800, 7, words), make_sample(task, 800, 7, words)
    assert a == b
    assert make_sample(task, 800, 8, words).messages != a.messages


def test_var_tracking_chain_reads_forward() -> None:
    for seed in range(5):
        s = make_sample("var_tracking", 1000, seed, words)
        first, second = s.answers
        user = s.messages[0]["content"]
        assert user.index(f"VAR {first} = ") < user.index(f"VAR {second} = VAR {first}")


def test_facts_sit_inside_the_document() -> None:
    """Needles are inserted at 10-90% depth: never in the first or last tenth of the filler."""
    for seed in range(5):
        s = make_sample("single_needle", 2000, seed, words)
        user = s.messages[0]["content"]
        at = user.index(s.answers[0]) / len(user)
        assert 0.05 < at < 0.95


def test_score_is_the_share_of_answers_found() -> None:
    s = make_sample("multi_value", 600, 0, words)
    one, two = s.answers
    assert score(s, f" {one} and {two}.") == 1.0
    assert score(s, f" {one}, and more") == 0.5
    assert score(s, " no idea") == 0.0


def test_unknown_task_raises() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("nope", 500, 0, words)
