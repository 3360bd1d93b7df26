"""SwiGLU's gate in one pass (Triton): silu(gate) * up, two eager kernels in
engine/layers/mlp.py (the reference), each over the [N, intermediate] activation.
silu is computed in fp32 and rounded to the input dtype before the product, as torch does."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < width
    g = tl.load(g_ptr + row * stride_g + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + c, mask=ok, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (s * u).to(ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [N, width] (rows any stride, last dim contiguous) -> silu(gate) * up, [N, width]."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.dtype == up.dtype
    assert gate.stride(-1) == 1 and up.stride(-1) == 1
    n, width = gate.shape
    out = torch.empty((n, width), dtype=gate.dtype, device=gate.device)
    if n == 0 or width == 0:
        return out
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(width, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), width, BLOCK=block, num_warps=4
    )
    return out
