"""kvcompress: KV-Compress's squared-attention metric from an observation window of the last
`window` prompt queries, aggregated over the query group with an L2 norm:

    m[h, j] = sqrt( Σ_{g in group(h)} Σ_{queries i} p[h, g, i, j]² )

Attention probabilities share one scale in every layer, so these scores may be ranked across heads
AND layers: use `budget="global"` for KV-Compress's variable per-layer, per-head eviction.
"""

from __future__ import annotations

import torch

from kvferry.engine.compression.registry import register
from kvferry.engine.compression.window import WindowScorer


@register("kvcompress")
class KVCompressScorer(WindowScorer):
    comparable_across_layers = True

    def score_window(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.square().sum(dim=(1, 2)).sqrt()  # [H, n]
