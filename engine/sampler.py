"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeded generators."""

from __future__ import annotations

import torch

from kvferry.engine.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, V] (float32, any device) -> one token id per row.

    Greedy rows take their argmax where the logits are; only other rows bring logits to the host."""
    greedy = logits.argmax(dim=-1).tolist()
    if all(p.greedy for p in params):
        return greedy
    logits = logits.float().cpu()
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out
