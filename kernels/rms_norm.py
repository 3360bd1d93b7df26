"""RMSNorm of each row in one pass (Triton): the eager layer (engine/layers/norm.py, the reference)
runs eight elementwise kernels over the whole activation.

    out = weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)

with the same roundings as the reference: the normalised row is rounded to x's dtype before the
weight multiplies it. Shapes: x [N, hidden] (rows any stride, last dim contiguous), weight [hidden].

`add_rms_norm` also folds in the residual add that precedes each norm of a decoder layer:
s = x + residual (rounded to x's dtype, as the eager add), then rms_norm(s); it returns both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,  # with ADD: the residual [N, hidden] to add to x first
    sum_ptr,  # with ADD: x + residual [N, hidden], the next residual
    stride_x,
    stride_o,
    stride_r,
    stride_s,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < hidden
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + c, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + c, x, mask=ok)
    x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    y = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden] in the dtype weight * x gives (see the module doc)."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and x.stride(-1) == 1
    rows = x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        _launch(rows, weight, out.view(-1, hidden), None, None, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [N, hidden] -> (rms_norm(x + residual), x + residual), both in x's dtype
    (weight must not widen it: the decoder layers' norms have the model's dtype)."""
    hidden = x.shape[-1]
    assert residual.shape == x.shape and residual.dtype == x.dtype and x.dim() == 2
    assert weight.shape == (hidden,) and torch.promote_types(weight.dtype, x.dtype) == x.dtype
    assert x.stride(-1) == 1 and residual.stride(-1) == 1
    out, total = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        _launch(x, weight, out, residual, total, eps)
    return out, total


def _launch(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None,
    total: torch.Tensor | None, eps: float,
) -> None:  # fmt: skip
    add = residual is not None and total is not None
    res, tot = (residual, total) if add else (x, out)  # unread without ADD
    block = next_pow2(x.shape[-1])
    _rms_norm_kernel[(x.shape[0],)](
        x, weight, out, res, tot, x.stride(0), out.stride(0), res.stride(0), tot.stride(0), x.shape[-1],
        eps, BLOCK=block, ADD=add, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
