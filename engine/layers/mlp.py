from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    use_kernels = False  # set by engine.layers.layer_kernels.use_layer_kernels
    fused = False  # gate and up in one matmul over gate_up_weight up to fused_max_tokens rows; set by
    fused_max_tokens = 0  # engine.layers.fused_projections

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.shape[0] <= self.fused_max_tokens:  # views into one [N, 2 * intermediate] product
            gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu_gate(gate, up, self.use_kernels))


def swiglu_gate(gate: torch.Tensor, up: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """silu(gate) * up over [N, width]: one Triton pass, or two eager kernels (the reference)."""
    if use_kernel:
        from kvferry.kernels.silu_mul import silu_mul

        return silu_mul(gate, up)
    return F.silu(gate) * up
