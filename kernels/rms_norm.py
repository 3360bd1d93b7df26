"""RMSNorm of each row in one pass (Triton): the eager layer (engine/layers/norm.py, the reference)
runs eight elementwise kernels over the whole activation.

    out = weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)

with the same roundings as the reference: the normalised row is rounded to x's dtype before the
weight multiplies it. Shapes: x [..., hidden] (last dim contiguous), weight [hidden].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < hidden
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    f = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(f * f, 0) / hidden + eps)
    y = (f * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden] in the dtype weight * x gives (see the module doc)."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and x.stride(-1) == 1
    rows = x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out.view(-1, hidden), rows.stride(0), hidden, hidden, eps,
            BLOCK=block, num_warps=max(1, min(16, block // 256)),
        )  # fmt: skip
    return out
