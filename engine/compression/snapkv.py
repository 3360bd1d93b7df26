"""snapkv: votes of the last `window` prompt queries, summed over the GQA group, max-pooled over
neighbouring positions (`pool_kernel`) so a kept token brings its context; the window itself is
always kept (SnapKV keeps its observation window)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvferry.engine.compression.registry import register
from kvferry.engine.compression.window import WindowScorer


@register("snapkv")
class SnapKVScorer(WindowScorer):
    def score_window(self, probs: torch.Tensor) -> torch.Tensor:
        votes = probs.sum(dim=(1, 2))  # [H, n]
        kernel = self.params.pool_kernel
        pooled = F.max_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        pooled[:, pooled.shape[1] - self.window :] = pooled.max() + 1.0
        return pooled
