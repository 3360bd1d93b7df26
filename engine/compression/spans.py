"""Score shaping before selection, to keep a key bound to its value: a fact such as "the number for
amber-frost is: 4821337" only answers its question if the key's tokens and the value's tokens both
survive, and per-token top-k tends to keep the distinctive value digits of every fact while dropping
some of the key words between them. Two ways to keep spans rather than isolated tokens:

score_pool: each token takes the max score of its `score_pool` (odd) neighbours, so a high scorer
            lifts the tokens around it and they are kept together.
span_chunk: tokens are ranked in fixed chunks of `span_chunk` tokens by the chunk's mean score
            (ChunkKV), so whole chunks are kept or dropped.
Both keep the budget's counts unchanged (only the ranking changes); protection still applies after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvferry.engine.compression.params import CompressionParams


def shape_scores(scores: torch.Tensor, params: CompressionParams) -> torch.Tensor:
    """scores [L, H, n] -> scores [L, H, n] ranked by spans (the input itself when both are off)."""
    if params.score_pool > 1:
        scores = pool_max(scores, params.score_pool)
    if params.span_chunk > 1:
        scores = chunk_mean(scores, params.span_chunk)
    return scores


def pool_max(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Each position's max over its `width` (odd) neighbours, along the last dim."""
    lead, n = scores.shape[:-1], scores.shape[-1]
    pooled = F.max_pool1d(scores.float().reshape(-1, 1, n), width, stride=1, padding=width // 2)
    return pooled.reshape(*lead, n)


def chunk_mean(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each position gets the mean score of its chunk (positions c*chunk .. (c+1)*chunk - 1; the last
    chunk may be shorter), plus a tie-break below any gap between chunk means that keeps a chunk's
    own order, so a budget that ends inside a chunk keeps that chunk's best tokens."""
    lead, n = scores.shape[:-1], scores.shape[-1]
    s = scores.float().reshape(-1, n)
    num = -(-n // chunk)
    padded = F.pad(s, (0, num * chunk - n))
    counts = torch.full((num,), float(chunk), device=s.device)
    counts[-1] = n - (num - 1) * chunk
    means = padded.reshape(-1, num, chunk).sum(dim=-1) / counts  # [rows, num]
    per_token = means.repeat_interleave(chunk, dim=-1)[:, :n]
    # a token's own score, squashed into (0, 1) and scaled under the smallest gap between two chunk
    # means, orders it inside its chunk without moving it past another chunk
    steps = means.sort(dim=-1).values.diff(dim=-1)
    positive = steps[steps > 0]
    gap = positive.min() if positive.numel() else torch.ones((), device=s.device)
    inside = torch.sigmoid(s) * (gap * 0.5)
    return (per_token + inside).reshape(*lead, n)
