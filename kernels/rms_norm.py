"""RMSNorm of each row in one pass (Triton): the eager layer (engine/layers/norm.py, the reference)
runs eight elementwise kernels over the whole activation.

    out = weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)

with the same roundings as the reference: the normalised row is rounded to x's dtype before the
weight multiplies it. `add_rms_norm` first adds a block's output to the residual stream, in place and
rounded to its dtype as the eager `x + h` is, and normalises the sum: one kernel where there were two.
Shapes: x, residual [..., hidden] (last dim contiguous), weight [hidden].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # rows (token, head) of x [N, heads, hidden] at any token and head strides
    r_ptr,
    w_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    heads,
    stride_r,
    stride_o,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < hidden
    x = tl.load(x_ptr + (row // heads) * stride_xt + (row % heads) * stride_xh + c, mask=ok, other=0.0)
    if ADD:  # residual += x, rounded to the residual's dtype; the sum is what gets normalised
        r = tl.load(r_ptr + row * stride_r + c, mask=ok, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * stride_r + c, x, mask=ok)
    f = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(f * f, 0) / hidden + eps)
    y = (f * inv).to(x.dtype).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden] in the dtype weight * x gives (see the module doc)."""
    return _launch(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, in residual's dtype); -> rms_norm(residual) (see the module doc)."""
    assert residual.shape == x.shape and residual.stride(-1) == 1
    return _launch(x, residual, weight, eps)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and x.stride(-1) == 1
    if x.dim() == 3 and residual is None:  # per-head norms over a projection's view: read in place
        rows, heads, stride_xt, stride_xh = x, x.shape[1], x.stride(0), x.stride(1)
    else:
        rows = x.reshape(-1, hidden)
        heads, stride_xt, stride_xh = 1, rows.stride(0), 0
    res = residual.view(-1, hidden) if residual is not None else x
    dtype = (residual if residual is not None else x).dtype
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)
    num_rows = x.numel() // hidden if hidden else 0
    if num_rows:
        block = next_pow2(hidden)
        _rms_norm_kernel[(num_rows,)](
            rows, res, weight, out.view(-1, hidden), stride_xt, stride_xh, heads,
            res.stride(0) if residual is not None else 0, hidden, hidden, eps,
            BLOCK=block, ADD=residual is not None, num_warps=max(1, min(16, block // 256)),
        )  # fmt: skip
    return out
