"""Scorer building blocks against direct computations: sketched vs exact leverage, block attention
mass, the observation window, and chunk-size independence of streamed scores."""

from __future__ import annotations

import math

import pytest
import torch
from builders import cache_prompt
from scipy.stats import spearmanr

from kvferry.engine import CompressionParams
from kvferry.engine.compression import PromptShape, make_scorer
from kvferry.engine.compression.attention_scores import block_attention_mass, window_attention
from kvferry.engine.compression.blocks import BlockStream, block_bounds
from kvferry.engine.compression.leverage import exact_leverage, gaussian_sketch, sketched_leverage


def keys_with_decaying_spectrum(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[n, d] keys: singular values 0.9^i in a random basis, a mean offset, and mildly varying
    token scales (log-normal, sigma 0.25), as pre-RoPE keys have."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    spectrum = 0.9 ** torch.arange(d, dtype=torch.float32)
    scale = torch.exp(0.25 * torch.randn(n, 1, generator=gen))
    return (scale * torch.randn(n, d, generator=gen) * spectrum) @ basis.T + torch.randn(d, generator=gen)


def test_sketched_leverage_ranks_like_exact_leverage() -> None:
    seed = torch.seed()  # fresh inputs every run; the seed is in the failure message
    gen = torch.Generator().manual_seed(seed)
    for trial in range(3):
        keys = keys_with_decaying_spectrum(1024, 64, gen)
        exact = exact_leverage(keys)
        sketched = sketched_leverage(keys[None], gaussian_sketch(64, 48))[0]
        rho = spearmanr(exact.numpy(), sketched.numpy()).statistic
        # The trivial proxy (distance from the mean) must rank clearly worse, or this test is vacuous.
        norm_rho = spearmanr(exact.numpy(), (keys - keys.mean(0)).norm(dim=1).numpy()).statistic
        assert rho >= 0.9, f"seed {seed} trial {trial}: spearman {rho:.3f}"
        assert rho > norm_rho + 0.05, f"seed {seed}: sketch {rho:.3f} vs row norm {norm_rho:.3f}"


def test_sketched_leverage_is_exact_without_compression_of_the_dimension() -> None:
    # With k = d and an invertible Φ, XᵀX⁻¹ cancels Φ: the estimate equals the exact leverage.
    gen = torch.Generator().manual_seed(1)
    keys = keys_with_decaying_spectrum(256, 16, gen)
    sketched = sketched_leverage(keys[None], gaussian_sketch(16, 16), ridge=0.0)[0]
    torch.testing.assert_close(sketched, exact_leverage(keys), rtol=1e-3, atol=1e-4)
    assert math.isclose(float(sketched.sum()), 16.0, rel_tol=1e-3)  # leverage sums to the rank


def test_block_attention_mass_matches_explicit_softmax() -> None:
    gen = torch.Generator().manual_seed(2)
    b, h, g, d = 24, 2, 3, 8
    q, k = torch.randn(b, h * g, d, generator=gen), torch.randn(b, h, d, generator=gen)
    got = block_attention_mass(q, k, 0.35)
    for head in range(h):
        want = torch.zeros(b)
        for j in range(g):
            probs = torch.softmax(q[:, head * g + j] @ k[:, head].T * 0.35, dim=-1)  # no causal mask
            want += probs.sum(dim=0)
        torch.testing.assert_close(got[head], want)
    torch.testing.assert_close(got.sum(dim=1), torch.full((h,), float(b * g)))


def test_window_attention_is_causal_over_the_last_queries() -> None:
    gen = torch.Generator().manual_seed(3)
    n, w, h, g, d = 40, 5, 2, 2, 8
    keys, q = torch.randn(h, n, d, generator=gen), torch.randn(w, h * g, d, generator=gen)
    probs = window_attention(q, keys, 0.5)  # [H, G, w, n]
    for i in range(w):
        pos = n - w + i
        want = torch.softmax(q[i, 1 * g + 1] @ keys[1, : pos + 1].T * 0.5, dim=-1)
        torch.testing.assert_close(probs[1, 1, i, : pos + 1], want)
        assert float(probs[:, :, i, pos + 1 :].abs().sum()) == 0.0


def test_block_stream_regroups_any_chunking() -> None:
    n = 1000
    bounds = block_bounds(n, 128)
    assert bounds[0] == 0 and bounds[-1] == n and max(b - a for a, b in zip(bounds, bounds[1:])) <= 128
    assert (
        max(b - a for a, b in zip(bounds, bounds[1:])) - min(b - a for a, b in zip(bounds, bounds[1:])) <= 1
    )
    data = torch.arange(n)
    for chunk in (1, 77, 128, 500, 1000):
        stream, got = BlockStream(n, 128), []
        for s in range(0, n, chunk):
            got += [(lo, t.tolist()) for lo, (t,) in stream.push(s, data[s : s + chunk])]
        assert got == [(a, list(range(a, b))) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("method", ["compactor", "snapkv", "kvcompress"])
def test_streamed_scores_do_not_depend_on_the_prefill_chunk(method: str) -> None:
    gen = torch.Generator().manual_seed(4)
    layers, h, g, d, n = 2, 2, 2, 16, 700
    q = torch.randn(layers, n, h * g, d, generator=gen)
    k_pre = torch.randn(layers, n, h, d, generator=gen)
    k = torch.randn(layers, n, h, d, generator=gen)
    params = CompressionParams(method=method, leverage_block=256, attention_block=64, window=48)
    seq_kv = cache_prompt(k)
    results = []
    for chunk in (700, 256, 100, 33):
        scorer = make_scorer(params, PromptShape(layers, h, n), seq_kv)
        for s in range(0, n, chunk):
            for layer in range(layers):
                e = min(n, s + chunk)
                scorer.observe(layer, q[layer, s:e], k_pre[layer, s:e], k[layer, s:e], s)
        results.append(scorer.scores())
    assert results[0].shape == (layers, h, n)
    assert bool(torch.isfinite(results[0]).all())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_bytes", [1, 150_000, 1 << 30])
def test_compactor_scores_a_group_of_layers_as_each_layer_alone(monkeypatch, group_bytes: int) -> None:
    """The compactor gathers a chunk's pre-RoPE keys of several layers and scores them in one go; each
    layer's scores must be what it gets scored alone (groups of 1, of 2 with a partial last group,
    and of all 3 layers), with chunks that cut through the leverage blocks."""
    from kvferry.engine.compression.compactor import CompactorScorer

    gen = torch.Generator().manual_seed(9)
    layers, h, g, d, n = 3, 2, 2, 16, 500
    q = torch.randn(layers, n, h * g, d, generator=gen)
    k_pre = torch.randn(layers, n, h, d, generator=gen) * torch.linspace(0.2, 3.0, d) + 2.0
    k = torch.randn(layers, n, h, d, generator=gen)
    params = CompressionParams(method="compactor", leverage_block=128, attention_block=64)
    seq_kv = cache_prompt(k)
    results, groups = [], []
    for gb in (1, group_bytes):
        monkeypatch.setattr(CompactorScorer, "group_bytes", gb)
        scorer = make_scorer(params, PromptShape(layers, h, n), seq_kv)
        for s in range(0, n, 100):
            for layer in range(layers):
                scorer.observe(
                    layer, q[layer, s : s + 100], k_pre[layer, s : s + 100], k[layer, s : s + 100], s
                )
        results.append(scorer.scores())
        groups.append(scorer.group)
    assert groups[0] == 1 and groups[1] == {1: 1, 150_000: 2, 1 << 30: 3}[group_bytes]
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert results[0].std() > 0.5  # scores that tell tokens apart, not a constant
