"""The attention block shared by every model: projections, optional q/k norm, RoPE, paged attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvferry.engine.layers.norm import RMSNorm
from kvferry.engine.layers.rotary import apply_rotary


class Attention(nn.Module):
    use_kernels = False  # RoPE through kernels/rotary.py; set by engine.layers.layer_kernels
    fused = False  # q/k/v in one matmul over qkv_weight up to fused_max_tokens rows; set by
    fused_max_tokens = 0  # engine.layers.fused_projections

    def __init__(self, config: Any, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        bias = bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: Any) -> torch.Tensor:
        n = x.shape[0]  # x [N, hidden]; rope = (cos, sin) [N, 1, D]
        if self.fused and n <= self.fused_max_tokens:  # views into one [N, (Hq + 2H) * D] product
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_pre_rope = k
        if self.use_kernels:
            from kvferry.kernels.rotary import rotary as rotate  # triton loads only where the kernels run
        else:
            rotate = apply_rotary
        q, k = rotate(q, *rope), rotate(k, *rope)
        out = batch.attend(self.layer_idx, q, k, v, k_pre_rope, self.scale)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, -1))
