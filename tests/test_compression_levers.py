"""The scorer and selection options of issue 23 (CompressionParams knobs, off by default): what each
computes, that it keeps shapes, counts and protection, and a case where it changes the selection."""

from __future__ import annotations

import pytest
import torch
from builders import cache_prompt

from kvferry.engine import CompressionParams
from kvferry.engine.compression import PromptShape, make_scorer, select_tokens
from kvferry.engine.compression.attention_scores import block_attention_mass
from kvferry.engine.compression.compactor import smooth_positions, standardize_per_layer
from kvferry.engine.compression.protection import protected_mask
from kvferry.engine.compression.spans import chunk_mean, pool_max, shape_scores
from kvferry.engine.errors import InvalidArgumentError

LAYERS, HEADS, GROUP, DIM, N = 2, 2, 2, 16, 300


def observed(params: CompressionParams, seed: int = 0, chunk: int = 128):
    """A scorer that observed a random prompt (values with varying norms) in chunks."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(LAYERS, N, HEADS * GROUP, DIM, generator=gen)
    k_pre = torch.randn(LAYERS, N, HEADS, DIM, generator=gen) * torch.linspace(0.2, 3.0, DIM) + 1.0
    k = torch.randn(LAYERS, N, HEADS, DIM, generator=gen)
    v = torch.randn(LAYERS, N, HEADS, DIM, generator=gen) * torch.exp(
        torch.randn(LAYERS, N, HEADS, 1, generator=gen)
    )
    seq_kv = cache_prompt(k, v)
    scorer = make_scorer(params, PromptShape(LAYERS, HEADS, N), seq_kv)
    for s in range(0, N, chunk):
        for layer in range(LAYERS):
            e = min(N, s + chunk)
            scorer.observe(layer, q[layer, s:e], k_pre[layer, s:e], k[layer, s:e], s)
    return scorer, v


@pytest.mark.parametrize(
    ("field", "value"),
    [("blend", "half"), ("value_norm", 1), ("mass_smoothing", 2), ("mass_smoothing", 0), ("score_pool", 4),
     ("query_weight", -0.1), ("span_chunk", -1), ("span_chunk", 2.5), ("mass_sharpness", 0),
     ("mass_sharpness", float("nan")), ("mass_sharpness", 65), ("mass_sharpness", "8")],
)  # fmt: skip
def test_bad_lever_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        CompressionParams(**{field: value})  # type: ignore[arg-type]
    assert err.value.field == field


def test_defaults_are_the_tuned_ones_and_other_methods_rank_single_tokens() -> None:
    p = CompressionParams()
    assert (p.blend, p.value_norm, p.mass_smoothing, p.query_weight, p.score_pool, p.span_chunk) == (
        "ratio", False, 1, 0.0, 1, 8,
    )  # fmt: skip
    assert p.leverage_block == 8192
    assert CompressionParams(span_chunk=0).span_chunk == 0  # an explicit 0 turns chunks off
    for method in ("snapkv", "kvcompress", "streaming", "random"):
        assert CompressionParams(method=method).span_chunk == 0
    scores = torch.randn(LAYERS, HEADS, N)
    assert shape_scores(scores, CompressionParams(method="snapkv")) is scores


def test_blend_ratio_weighs_leverage_by_the_compression() -> None:
    assert CompressionParams(retention=0.25, blend="ratio").blend_weight == pytest.approx(0.75)
    assert CompressionParams(retention=0.25, blend="fixed").blend_weight == 0.4
    ratio, _ = observed(CompressionParams(retention=0.1, blend="ratio"))
    fixed, _ = observed(CompressionParams(retention=0.1, blend="fixed", leverage_weight=0.9))
    torch.testing.assert_close(ratio.scores(), fixed.scores())
    ratio.params = CompressionParams(retention=0.5, blend="ratio")  # the benchmark re-forms scores per cell
    torch.testing.assert_close(
        ratio.scores(), standardize_per_layer(ratio.mass) + 0.5 * standardize_per_layer(ratio.leverage)
    )


def test_value_norm_and_smoothing_reshape_the_attention_mass() -> None:
    base, v = observed(CompressionParams())
    both, _ = observed(CompressionParams(value_norm=True, mass_smoothing=3))
    norms = v.norm(dim=-1).transpose(1, 2)  # [L, H, n]
    torch.testing.assert_close(both.value_norms(), norms)
    mass = both.mass * norms
    smoothed = torch.stack([mass[..., max(0, i - 1) : i + 2].mean(-1) for i in range(N)], dim=-1)
    want = standardize_per_layer(smoothed) + both.params.blend_weight * standardize_per_layer(both.leverage)
    got = both.scores()
    assert got.shape == (LAYERS, HEADS, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(smooth_positions(mass, 3), smoothed)
    # the weighting moves tokens in and out of the kept set
    kept_base, _ = select_tokens(base.scores(), CompressionParams(retention=0.3, span_chunk=0))
    kept_both, _ = select_tokens(got, CompressionParams(retention=0.3, span_chunk=0))
    assert not torch.equal(kept_base, kept_both)


def test_mass_sharpness_multiplies_the_softmax_logits() -> None:
    """mass_sharpness s: the mass is the column sums of softmax(Q Kᵀ · s / sqrt(d)) per block; s = sqrt(d)
    is kvpress's unscaled softmax, and a sharper softmax concentrates the mass on fewer keys."""
    block = 64
    base, _ = observed(CompressionParams(attention_block=block))
    sharp, _ = observed(CompressionParams(attention_block=block, mass_sharpness=DIM**0.5))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(LAYERS, N, HEADS * GROUP, DIM, generator=gen)  # the inputs `observed` drew
    torch.randn(LAYERS, N, HEADS, DIM, generator=gen)
    k = torch.randn(LAYERS, N, HEADS, DIM, generator=gen)
    bounds = sharp.mass_streams[1].bounds
    for lo, hi in zip(bounds, bounds[1:]):
        want = block_attention_mass(q[1, lo:hi], k[1, lo:hi], scale=1.0)  # no 1/sqrt(d): kvpress's logits
        torch.testing.assert_close(sharp.mass[1, :, lo:hi], want, rtol=1e-5, atol=1e-5)
    top = max(1, N // 10)

    def share(mass: torch.Tensor) -> float:
        return float((mass.topk(top, dim=-1).values.sum(-1) / mass.sum(-1)).mean())

    assert share(sharp.mass) > share(base.mass)


def test_query_weight_adds_the_windows_votes() -> None:
    params = CompressionParams(query_weight=0.5, window=24)
    mixed, _ = observed(params)
    base, _ = observed(CompressionParams(window=24))
    votes, _ = observed(CompressionParams(method="snapkv", window=24))
    want = base.scores() + 0.5 * standardize_per_layer(votes.scores())
    torch.testing.assert_close(mixed.scores(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [300, 64, 37])
def test_options_do_not_depend_on_the_prefill_chunk(chunk: int) -> None:
    params = CompressionParams(value_norm=True, mass_smoothing=5, query_weight=0.3, leverage_block=1 << 16)
    want, _ = observed(params, chunk=N)
    got, _ = observed(params, chunk=chunk)
    torch.testing.assert_close(got.scores(), want.scores(), rtol=1e-4, atol=1e-4)


def test_leverage_over_the_whole_prompt_is_one_block() -> None:
    whole, _ = observed(CompressionParams(leverage_block=1 << 16))
    blocks, _ = observed(CompressionParams(leverage_block=100))
    assert whole.mass_streams[0].bounds[-1] == N and len(whole.leverage_streams[0].bounds) == 2
    assert whole.leverage.mean(dim=-1).allclose(torch.ones(LAYERS, HEADS))  # divided by its one mean
    assert not torch.allclose(whole.leverage, blocks.leverage)


def test_score_pool_keeps_the_neighbours_of_a_high_scorer() -> None:
    scores = torch.rand(1, 1, 100, generator=torch.Generator().manual_seed(3))
    scores[0, 0, 50] = 10.0
    torch.testing.assert_close(pool_max(scores, 5)[0, 0, 48:53], torch.full((5,), 10.0))
    plain = CompressionParams(retention=0.1, sink=0, recent=0, span_chunk=0)
    pooled = CompressionParams(retention=0.1, sink=0, recent=0, score_pool=5, span_chunk=0)
    kept_plain, _ = select_tokens(scores, plain)
    kept_pooled, lens = select_tokens(scores, pooled)
    assert int(lens) == 10  # the same count: only the ranking changed
    assert {48, 49, 50, 51, 52} <= set(kept_pooled[0, 0].tolist())
    assert not {48, 49, 51, 52} <= set(kept_plain[0, 0].tolist())


def test_span_chunk_keeps_whole_chunks_ranked_by_their_mean() -> None:
    scores = torch.zeros(1, 1, 40)
    scores[0, 0, 3] = 5.0  # the best single token, in a chunk of low mean
    scores[0, 0, 16:24] = 1.0  # the best chunk by mean
    shaped = chunk_mean(scores, 8)
    assert bool((shaped[0, 0, 16:24] > shaped[0, 0, :8].max()).all())
    kept, lens = select_tokens(scores, CompressionParams(retention=0.2, sink=0, recent=0, span_chunk=8))
    assert kept[0, 0].tolist() == list(range(16, 24)) and int(lens) == 8
    # a budget that ends inside a chunk takes that chunk's best tokens first
    kept, _ = select_tokens(scores, CompressionParams(retention=0.225, sink=0, recent=0, span_chunk=8))
    assert 3 in kept[0, 0].tolist()


@pytest.mark.parametrize("budget", ["uniform", "adaptive", "global"])
@pytest.mark.parametrize("shaping", [{"score_pool": 7, "span_chunk": 0}, {"span_chunk": 16}])
def test_shaping_still_keeps_every_protected_token(budget: str, shaping: dict) -> None:
    scores = torch.randn(LAYERS, HEADS, N, generator=torch.Generator().manual_seed(5))
    params = CompressionParams(
        retention=0.1, budget=budget, sink=3, recent=9, protected_spans=[(100, 130)], **shaping
    )
    protected = protected_mask(N, 3, 9, [(100, 130)])
    scores[..., protected] = -1e9
    kept, lens = select_tokens(scores, params)
    for layer in range(LAYERS):
        for head in range(HEADS):
            got = set(kept[layer, head, : lens[layer, head]].tolist())
            assert set(protected.nonzero().flatten().tolist()) <= got
