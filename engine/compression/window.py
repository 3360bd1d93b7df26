"""Shared by the query-aware scorers: the attention of the prompt's last `window` queries to every key.

Queries of the window may arrive over two chunks, so each layer keeps the tail of its queries
([<= w, Hq, D]); on the layer's last chunk every prompt key is already in the pages, so the
layer is scored right there against the cached post-RoPE keys.
"""

from __future__ import annotations

import torch

from kvferry.engine.compression.attention_scores import window_attention
from kvferry.engine.compression.base import PromptShape, Scorer
from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.page_table import SequenceKV


class WindowScorer(Scorer):
    def __init__(self, params: CompressionParams, shape: PromptShape, seq_kv: SequenceKV) -> None:
        super().__init__(params, shape, seq_kv)
        self.window = min(params.window, shape.prompt_len)
        self.queries: list[list[torch.Tensor]] = [[] for _ in range(shape.num_layers)]
        self.layer_scores: list[torch.Tensor | None] = [None] * shape.num_layers

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        first = self.shape.prompt_len - self.window  # position of the window's first query
        if start + q.shape[0] > first:
            self.queries[layer].append(q[max(0, first - start) :])
        if self.is_last_chunk(start, q.shape[0]):
            q_window = torch.cat(self.queries[layer])  # [w, Hq, D]
            self.queries[layer] = []
            probs = window_attention(q_window, self.cached_keys(layer), k.shape[-1] ** -0.5)
            self.layer_scores[layer] = self.score_window(probs)

    def score_window(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [H, G, w, n] -> scores [H, n]."""
        raise NotImplementedError

    def scores(self) -> torch.Tensor:
        assert all(s is not None for s in self.layer_scores), "the prompt's last chunk was not observed"
        return torch.stack(self.layer_scores)  # type: ignore[arg-type]
