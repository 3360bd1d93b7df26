"""Rotary position embedding (rotate-half form) in one pass (Triton): the eager path
(engine/layers/rotary.py `apply_rotary`, the reference) runs five kernels per tensor (chunk, neg,
cat, two products, a sum).

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

with the reference's roundings (each product, then the sum, rounded to x's dtype). A new tensor:
the pre-RoPE keys stay intact for the compactor. Shapes: x [N, heads, D] (last dim contiguous, any
token and head strides: the projections' views), cos, sin [N, 1, D] (or [N, D]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import next_pow2


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_ot,
    stride_oh,
    heads,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of 2 >= HALF
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    in_d = d < HALF
    ok = (h < heads)[:, None] & in_d[None, :]
    xs = x_ptr + t * stride_xt + h[:, None].to(tl.int64) * stride_xh + d[None, :]
    x1 = tl.load(xs, mask=ok, other=0.0)
    x2 = tl.load(xs + HALF, mask=ok, other=0.0)
    c1 = tl.load(cos_ptr + t * stride_ct + d, mask=in_d, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=in_d, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + t * stride_ct + d, mask=in_d, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + d, mask=in_d, other=0.0)[None, :]
    ty = out_ptr.dtype.element_ty
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    a1 = (f1 * c1.to(tl.float32)).to(ty).to(tl.float32)
    b1 = (-f2 * s1.to(tl.float32)).to(ty).to(tl.float32)
    a2 = (f2 * c2.to(tl.float32)).to(ty).to(tl.float32)
    b2 = (f1 * s2.to(tl.float32)).to(ty).to(tl.float32)
    os_ = out_ptr + t * stride_ot + h[:, None].to(tl.int64) * stride_oh + d[None, :]
    tl.store(os_, (a1 + b1).to(ty), mask=ok)
    tl.store(os_ + HALF, (a2 + b2).to(ty), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D] rotated by its tokens' angles -> a new contiguous [N, heads, D] (module doc)."""
    n, heads, d = x.shape
    assert d % 2 == 0, f"head_dim {d} must be even"
    cos, sin = cos.reshape(n, d), sin.reshape(n, d)
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert cos.dtype == sin.dtype == x.dtype, "cos and sin in x's dtype, as the model computes them"
    out = torch.empty((n, heads, d), dtype=x.dtype, device=x.device)
    if n == 0 or heads == 0:
        return out
    block_h = min(16, next_pow2(heads))
    _rotary_kernel[(n, triton.cdiv(heads, block_h))](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1), heads,
        HALF=d // 2, BLOCK_D=next_pow2(d // 2), BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out
