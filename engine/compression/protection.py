"""Tokens that are always kept: the first `sink`, the last `recent`, and caller-given spans."""

from __future__ import annotations

import torch


def protected_mask(
    n: int, sink: int, recent: int, spans: list[tuple[int, int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool [n]: True for every protected prompt position (spans are clipped to the prompt)."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[: min(sink, n)] = True
    if recent > 0:
        mask[max(0, n - recent) :] = True
    for start, end in spans:
        mask[min(start, n) : min(end, n)] = True
    return mask
