"""Context-calibrated retention and token budgets: the curve and its inverse, the NLL signal measured
during chunked prefill, fit files, and what `retention="auto"` and `keep_tokens` do in the engine.
The real-model check (an easy context gets a lower retention than a hard one) is at the end (slow)."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import TinyModel, greedy, random_prompt

from kvferry.engine import LLM, CompressionParams, InvalidArgumentError
from kvferry.engine.compression import calibration
from kvferry.engine.compression.calibration import (
    DEFAULT_CALIBRATION,
    Calibration,
    ContextNLL,
    ModelCalibration,
    fit_calibration,
    retention_curve,
    retention_for_quality,
    sample_stride,
    save_fit,
)
from kvferry.engine.loader import load_model

pytestmark = pytest.mark.usefixtures("single_thread")
PAGE = 4


# ---- the curve ----------------------------------------------------------------------------------
def _paper_curve(r: float, b: float) -> float:
    return (math.exp(b * (r - 1)) - math.exp(-b)) / (1 - math.exp(-b))


@pytest.mark.parametrize("b", [-30.0, -6.0, -0.5, 1e-12, 0.7, 5.0, 40.0])
def test_curve_matches_the_papers_form_and_its_inverse(b: float) -> None:
    grid = [i / 20 for i in range(21)]
    values = [retention_curve(r, b) for r in grid]
    assert values[0] == pytest.approx(0.0, abs=1e-12) and values[-1] == pytest.approx(1.0)
    assert all(a <= c + 1e-12 for a, c in zip(values, values[1:]))  # quality never drops with more kept
    if abs(b) > 1e-6:
        for r in grid[1:-1]:
            assert retention_curve(r, b) == pytest.approx(_paper_curve(r, b), rel=1e-9, abs=1e-12)
    for tau in (0.5, 0.9, 0.95, 0.99):
        r = retention_for_quality(tau, b)
        assert 0.0 <= r <= 1.0
        assert retention_curve(r, b) == pytest.approx(tau, abs=1e-9)


def test_inverse_is_finite_for_extreme_curves() -> None:
    assert retention_for_quality(0.95, 0.0) == 0.95
    assert retention_for_quality(1.0, -5.0) == 1.0
    assert 0.0 < retention_for_quality(0.95, -800.0) < 0.01  # e^{-b} would overflow
    assert retention_for_quality(0.95, 800.0) == pytest.approx(1.0, abs=1e-3)


def test_choice_rises_with_the_context_nll_and_is_clamped() -> None:
    choices = [DEFAULT_CALIBRATION.choose(nll, 0.95) for nll in (0.1, 1.0, 2.0, 3.0, 4.0, 8.0)]
    assert choices == sorted(choices)
    assert choices[0] == DEFAULT_CALIBRATION.min_retention and choices[-1] > 0.99
    # a higher target keeps more
    assert DEFAULT_CALIBRATION.choose(2.0, 0.99) > DEFAULT_CALIBRATION.choose(2.0, 0.9)
    assert DEFAULT_CALIBRATION.choose(None, 0.95) == DEFAULT_CALIBRATION.max_retention  # nothing measured
    pinned = Calibration(5.0, -30.0, min_retention=0.3, max_retention=0.6)
    assert {pinned.choose(nll, 0.95) for nll in (0.0, 10.0)} == {0.3, 0.6}
    with pytest.raises(InvalidArgumentError) as err:
        DEFAULT_CALIBRATION.choose(2.0, 1.5)
    assert err.value.field == "quality_target"


def test_fit_recovers_the_curve_and_leans_toward_keeping() -> None:
    truth = Calibration(alpha=3.0, beta=-8.0)
    rng = random.Random(0)
    nll = [rng.uniform(0.5, 4.0) for _ in range(60) for _ in range(4)]
    retention = [r for _ in range(60) for r in (0.1, 0.25, 0.5, 0.75)]
    quality = [truth.expected_quality(r, x) for x, r in zip(nll, retention)]
    fit = fit_calibration(nll, retention, quality)
    assert (fit.alpha, fit.beta) == pytest.approx((3.0, -8.0), abs=0.05)
    # with noise, punishing over-prediction harder predicts less quality: auto then keeps more
    noisy = [min(1.0, max(0.0, q + rng.gauss(0, 0.1))) for q in quality]
    even = fit_calibration(nll, retention, noisy, over_prediction_weight=1.0)
    cautious = fit_calibration(nll, retention, noisy, over_prediction_weight=8.0)
    assert cautious.choose(2.0, 0.95) > even.choose(2.0, 0.95)


# ---- fit files ----------------------------------------------------------------------------------
def test_fits_are_found_by_the_weights_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit = Calibration(2.0, -6.0, min_retention=0.2, max_retention=0.9)
    save_fit(tmp_path / "model-a.json", "key-a", "model A", "compactor", fit, {"samples": 12})
    save_fit(tmp_path / "model-a.json", "key-a", "model A", "snapkv", Calibration(1.0, -1.0))
    save_fit(tmp_path / "model-b.json", "key-b", "model B", "compactor", Calibration(9.0, 9.0))
    (tmp_path / "broken.json").write_text("{not json")
    data = json.loads((tmp_path / "model-a.json").read_text())
    assert data["weights_key"] == "key-a" and set(data["methods"]) == {"compactor", "snapkv"}
    assert data["methods"]["compactor"]["details"] == {"samples": 12}
    with caplog.at_level(logging.WARNING):
        fits = ModelCalibration.for_weights("key-a", tmp_path)
    assert "broken.json" in caplog.text
    got = fits.for_method("compactor")
    assert (got.alpha, got.beta, got.min_retention, got.max_retention) == (2.0, -6.0, 0.2, 0.9)
    assert got.source == "model-a.json" and fits.model == "model A"
    assert fits.for_method("streaming") is DEFAULT_CALIBRATION  # no fit for this method
    assert fits.for_method("compactor", question_kept=False) == got  # no @context entry: the method's
    save_fit(tmp_path / "model-a.json", "key-a", "model A", "compactor@context", Calibration(3.0, -7.0))
    context = ModelCalibration.for_weights("key-a", tmp_path).for_method("compactor", question_kept=False)
    assert (context.alpha, context.beta) == (3.0, -7.0)
    assert ModelCalibration.for_weights("key-z", tmp_path).for_method("compactor") is DEFAULT_CALIBRATION
    assert ModelCalibration.for_weights(None, tmp_path).fits == {}  # dummy weights: never a fit


def test_the_engine_uses_the_fit_of_its_weights(tiny_model: Callable[[str], TinyModel]) -> None:
    tiny = tiny_model("llama")
    assert tiny.loaded.weights_key is not None
    engine = tiny.engine(page_size=PAGE)
    shipped = ModelCalibration.for_weights(tiny.loaded.weights_key)
    assert engine.calibration == shipped
    assert load_model(str(tiny.path), torch.float32, "cpu", "dummy").weights_key is None  # never a fit


# ---- the signal ---------------------------------------------------------------------------------
def test_sample_stride_keeps_the_sample_count_in_bounds() -> None:
    assert sample_stride(2) == sample_stride(129) == 1
    assert sample_stride(8192) == calibration.SAMPLE_STRIDE
    for n in (2, 50, 300, 1000, 2048, 5000, 40_000, 200_000):
        count = len(ContextNLL(list(range(n)), torch.device("cpu")).positions)
        assert min(n - 1, calibration.MIN_SAMPLES // 2) <= count <= calibration.MAX_SAMPLES


def test_samples_do_not_alias_with_periodic_text() -> None:
    """Records of exactly `stride` tokens must not put every sample on the same token of a record."""
    probe = ContextNLL([0] * 4096, torch.device("cpu"))
    phases = {p % probe.stride for p in probe.positions}
    assert len(phases) == probe.stride
    again = ContextNLL([0] * 4096, torch.device("cpu"))
    assert again.positions == probe.positions  # seeded: every process samples the same positions


def test_signal_is_the_mean_nll_at_its_positions_whatever_the_chunks(
    tiny_model: Callable[[str], TinyModel],
) -> None:
    tiny = tiny_model("llama")
    prompt = random_prompt(300, tiny.vocab_size, seed=11)
    logits = tiny.reference_logits(prompt)  # transformers, every position
    positions = ContextNLL(prompt, torch.device("cpu")).positions
    want = torch.nn.functional.cross_entropy(
        logits[positions], torch.tensor(prompt)[[p + 1 for p in positions]]
    )
    auto = CompressionParams(retention="auto", sink=2, recent=4)
    got = []
    for chunk in (300, 64, 37):
        engine = tiny.engine(page_size=PAGE, prefill_chunk=chunk, max_model_len=512)
        seq = engine.add_request(prompt, greedy(2), auto)
        while engine.has_unfinished():
            engine.step()
        engine.pool.assert_no_leaks()
        got.append(seq.stats.context_nll)
    assert got[0] == pytest.approx(float(want), rel=1e-4)
    assert got[1] == pytest.approx(got[0], rel=1e-5) and got[2] == pytest.approx(got[0], rel=1e-5)


# ---- auto and keep_tokens in the engine -----------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_model: Callable[[str], TinyModel]) -> LLM:
    tiny = tiny_model("llama")
    return LLM(
        str(tiny.path), device="cpu", dtype="float32", page_size=PAGE, prefill_chunk=64, max_model_len=512
    )


def test_auto_compresses_as_the_ratio_it_chooses(llm: LLM, tiny_model: Callable[[str], TinyModel]) -> None:
    """With the calibration pinned to 0.4, auto keeps exactly what retention=0.4 keeps, token for token."""
    vocab = tiny_model("llama").vocab_size
    batch = [random_prompt(n, vocab, seed=n) for n in (90, 260)]
    shipped = llm.engine.calibration
    llm.engine.calibration = ModelCalibration({"compactor": Calibration(0.0, 0.0, 0.4, 0.4, "test")})
    try:
        auto = llm.generate(batch, greedy(8), compression={"retention": "auto", "sink": 2, "recent": 4})
    finally:
        llm.engine.calibration = shipped
    fixed = llm.generate(batch, greedy(8), compression={"retention": 0.4, "sink": 2, "recent": 4})
    for a, f in zip(auto, fixed):
        assert a.token_ids == f.token_ids
        assert a.stats.kept_tokens == f.stats.kept_tokens < a.stats.full_tokens
        assert a.stats.chosen_retention == f.stats.chosen_retention == 0.4
        assert a.stats.context_nll is not None and a.stats.context_nll > 0 and f.stats.context_nll is None
        assert a.stats.protected_tokens == f.stats.protected_tokens == 6
    llm.engine.pool.assert_no_leaks()


def test_auto_takes_the_context_curve_when_the_question_is_not_kept(
    llm: LLM, tiny_model: Callable[[str], TinyModel]
) -> None:
    """A protected span reaching the prompt's end (the question kept) uses the method's curve; a prompt
    whose end is not protected, or a cached context, uses `<method>@context`."""
    vocab = tiny_model("llama").vocab_size
    prompt, tail = random_prompt(200, vocab, seed=4), random_prompt(12, vocab, seed=5)
    shipped = llm.engine.calibration
    llm.engine.calibration = ModelCalibration(
        {
            "compactor": Calibration(0.0, 0.0, 0.6, 0.6, "test"),
            "compactor@context": Calibration(0.0, 0.0, 0.3, 0.3, "test"),
        }
    )
    auto = {"retention": "auto", "sink": 2, "recent": 4}
    try:
        kept, unkept, middle = llm.generate(
            [prompt] * 3, greedy(2),
            compression=[{**auto, "protected_spans": [(180, 200)]}, auto, {**auto, "protected_spans": [(50, 60)]}],
        )  # fmt: skip
        (cached,) = llm.generate([tail], greedy(2), compression=auto, context=[prompt], cache_context=True)
    finally:
        llm.engine.calibration = shipped
    assert kept.stats.chosen_retention == 0.6
    assert unkept.stats.chosen_retention == middle.stats.chosen_retention == 0.3
    assert cached.stats.chosen_retention == 0.3 and cached.stats.context_cache == "miss"
    llm.engine.context_cache.clear()
    llm.engine.pool.assert_no_leaks()


def test_auto_reports_the_default_curves_choice(llm: LLM, tiny_model: Callable[[str], TinyModel]) -> None:
    prompt = random_prompt(200, tiny_model("llama").vocab_size, seed=3)
    for target in (0.05, 0.95):
        (out,) = llm.generate(
            prompt, greedy(4), compression=CompressionParams(retention="auto", quality_target=target)
        )
        s = out.stats
        assert s.chosen_retention == DEFAULT_CALIBRATION.choose(s.context_nll, target)
        kept_per_head = s.kept_tokens / (s.full_tokens / s.prompt_tokens)
        assert kept_per_head == max(round(s.chosen_retention * 200), s.protected_tokens)


def test_keep_tokens_keeps_that_many_per_head(llm: LLM, tiny_model: Callable[[str], TinyModel]) -> None:
    vocab = tiny_model("llama").vocab_size
    heads = llm.engine.num_layers * llm.engine.num_kv_heads
    short, long = random_prompt(40, vocab, seed=1), random_prompt(300, vocab, seed=2)
    outs = llm.generate([short, long], greedy(4), compression={"keep_tokens": 64, "sink": 2, "recent": 4})
    assert outs[0].stats.kept_tokens == outs[0].stats.full_tokens and outs[0].stats.chosen_retention == 1.0
    assert outs[1].stats.kept_tokens == heads * 64
    assert outs[1].stats.chosen_retention == pytest.approx(64 / 300)
    llm.engine.pool.assert_no_leaks()


def test_auto_and_keep_tokens_on_a_cached_context(tiny_model: Callable[[str], TinyModel]) -> None:
    """With a cached context the budget is the context's: auto reads the context's NLL alone (a hit
    reports what the miss chose), keep_tokens counts the context's tokens."""
    tiny = tiny_model("llama")
    engine = tiny.engine(page_size=PAGE, prefill_chunk=64, max_model_len=512)
    context = random_prompt(240, tiny.vocab_size, seed=21)
    questions = [random_prompt(n, tiny.vocab_size, seed=n) for n in (30, 12)]

    def ask(question: list[int], compression: dict) -> object:
        seq = engine.add_request(
            context + question, greedy(2), compression, context_len=240, cache_context=True
        )
        while engine.has_unfinished():
            engine.step()
        return seq.stats

    auto = {"method": "compactor", "retention": "auto", "quality_target": 0.05, "sink": 2, "recent": 4}
    miss, hit = (ask(q, auto) for q in questions)
    assert (miss.context_cache, hit.context_cache) == ("miss", "hit")
    positions = ContextNLL(context, torch.device("cpu")).positions
    logits = tiny.reference_logits(context)
    want = torch.nn.functional.cross_entropy(
        logits[positions], torch.tensor(context)[[p + 1 for p in positions]]
    )
    assert miss.context_nll == pytest.approx(float(want), rel=1e-4)  # the context's, not the question's
    assert (hit.chosen_retention, hit.context_nll) == (miss.chosen_retention, miss.context_nll)
    assert miss.chosen_retention == DEFAULT_CALIBRATION.choose(miss.context_nll, 0.05) < 1.0
    kept = ask(questions[0], {"method": "compactor", "keep_tokens": 32, "sink": 2, "recent": 4})
    heads = engine.num_layers * engine.num_kv_heads
    assert kept.chosen_retention == pytest.approx(32 / 240) and kept.context_kept_tokens == heads * 32
    engine.context_cache.clear()
    engine.pool.assert_no_leaks()


@pytest.mark.parametrize(
    ("compression", "field"),
    [
        ({"retention": "most"}, "retention"),
        ({"retention": 1.2}, "retention"),
        ({"retention": True}, "retention"),
        ({"retention": "auto", "quality_target": 0.0}, "quality_target"),
        ({"retention": "auto", "quality_target": 1.01}, "quality_target"),
        ({"keep_tokens": 0}, "keep_tokens"),
        ({"keep_tokens": -8}, "keep_tokens"),
        ({"keep_tokens": 2.5}, "keep_tokens"),
        ({"keep_tokens": 16, "retention": 0.5}, "keep_tokens"),
        ({"keep_tokens": 16, "retention": "auto"}, "keep_tokens"),
        ({"question_tokens": 0}, "question_tokens"),
    ],
)
def test_bad_budgets_are_refused_by_the_engine(llm: LLM, compression: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate([5, 6, 7], greedy(2), compression=compression)
    assert err.value.field == field and field in str(err.value)
    assert not llm.engine.has_unfinished()


# ---- the real model -------------------------------------------------------------------------------
def _filler() -> str:
    return " ".join(["The meeting is on Monday and everyone will be there on time."] * 90)


def _dense_facts(seed: int = 5) -> str:
    """Records of made-up names, codes and numbers in five forms (SmolLM2 reads them at ~2.7 nats)."""
    rng = random.Random(seed)
    syllables = [
        "ka",
        "ro",
        "vin",
        "del",
        "mu",
        "zar",
        "ith",
        "pol",
        "gre",
        "sun",
        "tav",
        "ok",
        "bel",
        "rhu",
        "qen",
    ]

    def name() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize()

    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    forms = [
        lambda: (
            f"{name()} {name()} holds permit {rng.randint(1000, 99999)}-{rng.choice(letters)}{rng.randint(10, 99)}."
        ),
        lambda: (
            f"Warehouse {name()} stores {rng.randint(11, 9999)} {rng.choice(['kg', 'litres', 'crates'])} of "
            f"{name().lower()} at bay {rng.randint(1, 480)}."
        ),
        lambda: (
            f"The {name()} line departs at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} from platform "
            f"{rng.randint(1, 31)}."
        ),
        lambda: (
            f"Code {rng.choice('QXZKVJ')}{rng.randint(100, 999)}{rng.choice('ABCDEF')} opens the {name()} vault; "
            f"the backup is {rng.randint(100000, 999999)}."
        ),
        lambda: (
            f"In {rng.randint(1602, 2011)}, {name()} of {name()} sold {rng.randint(3, 880)} shares to {name()}."
        ),
    ]
    return " ".join(rng.choice(forms)() for _ in range(90))


@pytest.mark.slow
def test_auto_keeps_less_of_an_easy_context_than_of_a_hard_one(smollm2: LLM) -> None:
    """Repetitive filler is predictable (low NLL): auto keeps less of it than of dense facts."""
    question = "What day is the meeting, and which code opens a vault?"
    chats = [[{"role": "user", "content": text}] for text in (_filler(), _dense_facts())]
    easy, hard = smollm2.generate_chat(chats, greedy(2), compression={"retention": "auto"}, question=question)
    assert easy.stats.prompt_tokens > 800 and hard.stats.prompt_tokens > 800
    assert easy.stats.context_nll < 1.0 < 2.0 < hard.stats.context_nll
    assert easy.stats.chosen_retention < hard.stats.chosen_retention
    assert easy.stats.retention < hard.stats.retention
    smollm2.engine.pool.assert_no_leaks()
