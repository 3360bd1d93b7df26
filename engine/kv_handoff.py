"""Moving one sequence's KV between engines: what the prefill side exports and the decode side imports.

Pages travel in (layer, head, page) order; a head holding n tokens sends ceil(n / page_size) pages,
so a compressed request ships only its kept pages. The receiver rebuilds the same layout from
`head_lens` alone.

A request whose KV starts with a cached context (engine/context_cache.py) names the context by its
`ContextRef` instead: its own pages follow the context's in each head, and the context's pages travel
only to a receiver that does not hold them yet (then ahead of the request's own pages).
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


@dataclass
class ContextRef:
    """The cached context a handed-off request's KV starts with: its cache handle (the same on every
    node with the same model and settings), the prompt tokens it covers and each head's kept tokens,
    whole pages. Each head's own tokens follow its context pages."""

    handle: str
    num_tokens: int  # a multiple of the page size
    head_lens: torch.Tensor  # [L, H] kept context tokens per (layer, kv-head), multiples of page_size
    page_size: int

    def pages_per_head(self) -> torch.Tensor:
        return self.head_lens // self.page_size  # [L, H]

    @property
    def num_pages(self) -> int:
        return int(self.pages_per_head().sum())
