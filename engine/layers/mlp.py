from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    use_kernels = False  # set by engine.layers.layer_kernels.use_layer_kernels

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_gate(self.gate_proj(x), self.up_proj(x), self.use_kernels))


def swiglu_gate(gate: torch.Tensor, up: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """silu(gate) * up over [N, width]: one Triton pass, or two eager kernels (the reference)."""
    if use_kernel:
        from kernels.silu_mul import silu_mul

        return silu_mul(gate, up)
    return F.silu(gate) * up
