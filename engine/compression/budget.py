"""Budget policies: how many tokens each (layer, kv-head) keeps, and which ones, from scores.

uniform:  every head of a layer keeps round(retention * n) tokens (its own top-k).
adaptive: a layer keeps H * round(retention * n) tokens chosen by one top-k across its heads, and
          every head keeps at least `head_floor` of the uniform share (the floor).
global:   like adaptive, but one top-k across every head of every layer (KV-Compress-style).
Protected tokens are kept by every head and count toward the budget; when they alone exceed a
head's share they are still kept, so real counts can exceed the nominal budget.
"""

from __future__ import annotations

import math

import torch

from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.protection import protected_mask


def uniform_share(n: int, retention: float) -> int:
    """Tokens one head keeps under a uniform budget: round(r * n), at least 1."""
    return min(n, max(1, round(retention * n)))


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries along the last dim (k may differ from the dim size)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.topk(scores, min(k, scores.shape[-1]), dim=-1).indices, True)
    return mask


def keep_mask(scores: torch.Tensor, protected: torch.Tensor, params: CompressionParams) -> torch.Tensor:
    """scores [L, H, n], protected [n] -> Bool [L, H, n]: the tokens each head keeps."""
    num_layers, num_heads, n = scores.shape
    share = uniform_share(n, params.retention)
    num_protected = int(protected.sum())
    s = scores.float().masked_fill(protected, float("inf"))
    if params.budget == "uniform":
        return top_mask(s, max(share, num_protected))
    floor = min(n, max(1, num_protected, math.ceil(params.head_floor * share)))
    # Every head first takes its floor (protected tokens first: they score +inf) ...
    floor_mask = top_mask(s, floor)
    s = s.masked_fill(floor_mask, float("inf"))
    # ... then the rest of the budget goes to the best remaining (head, token) pairs.
    if params.budget == "adaptive":
        total = num_heads * max(share, floor)
        return top_mask(s.reshape(num_layers, num_heads * n), total).reshape(s.shape)
    total = num_layers * num_heads * max(share, floor)
    return top_mask(s.reshape(-1), total).reshape(s.shape)


def max_kept_pages(
    params: CompressionParams | None, n: int, num_layers: int, num_kv_heads: int, page_size: int
) -> int:
    """The most pages an n-token prompt's kept KV can take under `params`, known before its prefill
    runs (what an early decode reservation sets aside). `keep_mask` keeps exactly max(share, protected)
    tokens per head under uniform, and that share times the heads per layer (adaptive) or per model
    (global) in all; each head then wastes less than one page."""
    full_head = -(-n // page_size)
    full = num_layers * num_kv_heads * full_head
    if params is None or not params.active:
        return full
    share = uniform_share(n, params.retention)
    num_protected = int(protected_mask(n, params.sink, params.recent, params.protected_spans).sum())
    if params.budget == "uniform":
        return num_layers * num_kv_heads * -(-min(n, max(share, num_protected)) // page_size)
    floor = min(n, max(1, num_protected, math.ceil(params.head_floor * share)))
    per_head = max(share, floor)
    if params.budget == "adaptive":
        per_layer = (num_kv_heads * per_head + num_kv_heads * (page_size - 1)) // page_size
        return num_layers * min(num_kv_heads * full_head, per_layer)
    heads = num_layers * num_kv_heads
    return min(full, (heads * per_head + heads * (page_size - 1)) // page_size)
