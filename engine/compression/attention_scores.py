"""Attention statistics the scorers share (pure PyTorch; GPU kernels are tested against these).

GQA: query head j belongs to kv head j // G, with G = Hq / H.
"""

from __future__ import annotations

import torch


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention mass inside one block.

    q [b, Hq, D], k [b, H, D] (both post-RoPE, the same b tokens) -> [H, b]: column sums of
    softmax(Q Kᵀ · scale) over every query of the block and every query head of the kv head's group.
    """
    b, hq, d = q.shape
    h = k.shape[1]
    qg = q.float().reshape(b, h, hq // h, d).permute(1, 2, 0, 3)  # [H, G, b, D]
    kh = k.float().permute(1, 2, 0)  # [H, D, b]
    probs = torch.softmax(torch.matmul(qg, kh[:, None]) * scale, dim=-1)  # [H, G, b, b]
    return probs.sum(dim=(1, 2))


def window_attention(q_window: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the prompt's last w queries to all n cached keys.

    q_window [w, Hq, D] at positions n-w..n-1; keys [H, n, D] -> probabilities [H, G, w, n].
    """
    w, hq, d = q_window.shape
    h, n, _ = keys.shape
    qg = q_window.float().reshape(w, h, hq // h, d).permute(1, 2, 0, 3)  # [H, G, w, D]
    logits = torch.matmul(qg, keys.float().transpose(1, 2)[:, None]) * scale  # [H, G, w, n]
    positions = torch.arange(n - w, n, device=keys.device)
    causal = torch.arange(n, device=keys.device)[None, :] <= positions[:, None]  # [w, n]
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
