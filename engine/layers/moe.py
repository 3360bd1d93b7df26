"""Top-k routed mixture of experts (Qwen3-MoE), experts stored as stacked weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvferry.engine.layers.mlp import swiglu_gate


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # [E, H, I]


class SparseMoE(nn.Module):
    use_kernels = False  # set by engine.layers.layer_kernels.use_layer_kernels

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", True))
        self.gate = Router(config.hidden_size, config.num_experts)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]; each token goes to its top_k experts."""
        probs = torch.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            token_idx, slot = torch.where(chosen == expert)
            gate, up = F.linear(x[token_idx], self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(swiglu_gate(gate, up, self.use_kernels), self.experts.down_proj[expert])
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out
