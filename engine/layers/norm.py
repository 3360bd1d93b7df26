from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    use_kernels = False  # set by engine.layers.layer_kernels.use_layer_kernels
    fuse_add = True  # with the kernels: the residual add in the norm's kernel (False: benchmarks' baseline)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            from kvferry.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): a block's output joins the residual stream, which is
        then normalised. The kernel does both in one pass and updates `residual` in place."""
        if self.use_kernels and self.fuse_add:
            from kvferry.kernels.rms_norm import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = residual + x
        return self(residual), residual


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden]: normalised in fp32, rounded to x's dtype, then scaled by weight (HF's order)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
