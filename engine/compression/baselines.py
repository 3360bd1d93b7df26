"""Baselines for the quality benchmark: streaming (attention sinks + recent window), random, none."""

from __future__ import annotations

import torch

from kvferry.engine.compression.base import Scorer
from kvferry.engine.compression.registry import register


@register("streaming")
class StreamingScorer(Scorer):
    """StreamingLLM: the later a token, the higher its score. The sinks are the `sink` protection
    (default 4), so under a budget it keeps the first `sink` tokens and the most recent ones."""

    query_agnostic = True

    def scores(self) -> torch.Tensor:
        s = self.shape
        position = torch.arange(s.prompt_len, dtype=torch.float32)
        return position.expand(s.num_layers, s.num_kv_heads, s.prompt_len).clone()


@register("random")
class RandomScorer(Scorer):
    """Uniform random scores from `seed`: what any scorer must beat."""

    query_agnostic = True

    def scores(self) -> torch.Tensor:
        s = self.shape
        gen = torch.Generator().manual_seed(self.params.seed)
        return torch.rand(s.num_layers, s.num_kv_heads, s.prompt_len, generator=gen)


@register("none")
class NoCompression(Scorer):
    """Keeps every token; CompressionParams(method="none").active is False, so it never runs."""

    query_agnostic = True

    def scores(self) -> torch.Tensor:
        s = self.shape
        return torch.zeros(s.num_layers, s.num_kv_heads, s.prompt_len)
