"""compactor (default): approximate leverage of pre-RoPE keys blended with non-causal attention mass.

    score = z(a) + λ·z(o)

o: sketched leverage of each kv head's PRE-RoPE keys, block by block (`leverage_block` tokens,
   each block centred; divided by the block's mean so blocks of different sizes compare).
a: non-causal attention mass inside `attention_block`-token blocks: column sums of
   softmax(Q Kᵀ · scale) (post-RoPE, no causal mask) over the block's queries and the GQA group.
z: standardise over the tokens x heads of one layer.
Both statistics stream with chunked prefill; nothing but [L, H, n] floats is kept.
"""

from __future__ import annotations

import torch

from engine.compression.attention_scores import block_attention_mass
from engine.compression.base import PromptShape, Scorer, register
from engine.compression.blocks import BlockStream
from engine.compression.leverage import gaussian_sketch, sketched_leverage
from engine.compression.params import CompressionParams
from engine.page_table import SequenceKV


def standardize_per_layer(x: torch.Tensor) -> torch.Tensor:
    """x [L, H, n] -> zero mean, unit std over each layer's heads and tokens."""
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True).nan_to_num(0.0).clamp(min=1e-6)
    return (x - mean) / std


@register("compactor")
class CompactorScorer(Scorer):
    def __init__(self, params: CompressionParams, shape: PromptShape, seq_kv: SequenceKV) -> None:
        super().__init__(params, shape, seq_kv)
        n = shape.prompt_len
        self.leverage_streams = [BlockStream(n, params.leverage_block) for _ in range(shape.num_layers)]
        self.mass_streams = [BlockStream(n, params.attention_block) for _ in range(shape.num_layers)]
        self.leverage: torch.Tensor | None = None  # [L, H, n]
        self.mass: torch.Tensor | None = None  # [L, H, n]
        self.sketch: torch.Tensor | None = None  # Φ [D, k]

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        if self.sketch is None:
            s = self.shape
            self.sketch = gaussian_sketch(k.shape[-1], self.params.sketch_size, k.device)
            self.leverage = torch.zeros(s.num_layers, s.num_kv_heads, s.prompt_len, device=k.device)
            self.mass = torch.zeros_like(self.leverage)
        assert self.leverage is not None and self.mass is not None
        for lo, (keys,) in self.leverage_streams[layer].push(start, k_pre_rope):
            o = sketched_leverage(keys.transpose(0, 1), self.sketch)  # [H, b]
            self.leverage[layer, :, lo : lo + o.shape[1]] = o / o.mean(dim=1, keepdim=True).clamp(min=1e-12)
        scale = k.shape[-1] ** -0.5
        for lo, (qb, kb) in self.mass_streams[layer].push(start, q, k):
            self.mass[layer, :, lo : lo + qb.shape[0]] = block_attention_mass(qb, kb, scale)

    def scores(self) -> torch.Tensor:
        assert self.leverage is not None and self.mass is not None, "no prefill chunk was observed"
        lam = self.params.leverage_weight
        return standardize_per_layer(self.mass) + lam * standardize_per_layer(self.leverage)
