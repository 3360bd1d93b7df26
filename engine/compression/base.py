"""The scorer base class: a new method is one file with a Scorer subclass under `@register("name")`
(registry.py) plus one import line in engine/compression/__init__.py.

A scorer lives for one request. Chunked prefill shows it every layer of every chunk through
`observe` (queries post-RoPE, keys pre- and post-RoPE); once the prompt is cached, `scores()`
returns one importance score per (layer, kv-head, prompt token) — higher means keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.registry import SCORERS
from kvferry.engine.layers.paged_attention import gather_heads
from kvferry.engine.page_table import SequenceKV


@dataclass
class PromptShape:
    num_layers: int
    num_kv_heads: int
    prompt_len: int  # n: tokens the scores cover


class Scorer:
    name: ClassVar[str] = ""
    # True when raw scores of different layers share one scale (needed by the `global` budget to be
    # meaningful); z-standardised or rank-like scores are only comparable within a layer.
    comparable_across_layers: ClassVar[bool] = False
    # True when a token's score does not depend on what comes after the scored text (no question in
    # it): only such a method may compress a context once for every later question (a cached context,
    # engine/context_cache.py). Methods that score from the prompt's last queries must leave it False.
    query_agnostic: ClassVar[bool] = False

    def __init__(self, params: CompressionParams, shape: PromptShape, seq_kv: SequenceKV) -> None:
        self.params = params
        self.shape = shape
        self.seq_kv = seq_kv

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        """q [T, Hq, D] post-RoPE; k_pre_rope, k [T, H, D]; tokens start..start+T-1 of the prompt."""

    def scores(self) -> torch.Tensor:
        """Importance [L, H, n] (float32, CPU or device); called once, after the last chunk."""
        raise NotImplementedError

    def is_last_chunk(self, start: int, num_tokens: int) -> bool:
        return start + num_tokens >= self.shape.prompt_len

    def cached_keys(self, layer: int) -> torch.Tensor:
        """Post-RoPE keys [H, n, D] of this layer's prompt, read back from the sequence's pages."""
        return self.cached_kv(layer)[0]

    def cached_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values, each [H, n, D], of this layer's prompt, from the sequence's pages."""
        kv = self.seq_kv
        n = self.shape.prompt_len
        table = kv.page_table[layer].to(kv.pool.kv.device)
        k, v = gather_heads(kv.pool.kv, table, -(-n // kv.pool.page_size))
        return k[:, :n], v[:, :n]


def make_scorer(params: CompressionParams, shape: PromptShape, seq_kv: SequenceKV) -> Scorer:
    return SCORERS[params.method](params, shape, seq_kv)
