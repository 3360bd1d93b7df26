"""Moving one sequence's KV between engines: what the prefill side exports and the decode side imports.

Pages travel in (layer, head, page) order; a head holding n tokens sends ceil(n / page_size) pages,
so a compressed request ships only its kept pages. The receiver rebuilds the same layout from
`head_lens` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVLayout:
    """Placement of one sequence's cached tokens: enough for a receiver to reserve and place pages."""

    head_lens: torch.Tensor  # [L, H] tokens kept by each (layer, kv-head)
    page_size: int

    def pages_per_head(self) -> torch.Tensor:
        return (self.head_lens + self.page_size - 1) // self.page_size  # [L, H]

    @property
    def num_pages(self) -> int:
        return int(self.pages_per_head().sum())

    @property
    def num_tokens(self) -> int:
        return int(self.head_lens.sum())
