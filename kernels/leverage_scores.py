"""Sketched leverage scores of pre-RoPE keys, block by block, fused into one Triton kernel.

The reference is engine/compression/leverage.py (`sketched_leverage`, then divided by the block's
mean as compactor does). One program takes one (block, kv-head) and makes three passes over the
block's keys (they stay in L2):
  1. the block mean μ [D];
  2. X = (K - μ)Φ tile by tile and the Gram G = XᵀX [k, k];
  3. after inverting G + ridge in registers (Gauss-Jordan: G is SPD, so no pivoting),
     o_i = x_iᵀ G⁻¹ x_i, divided by the block mean of o, which is tr(G⁻¹ G) / b (no extra pass).
The sketch width k is padded to a power of two with zero columns of Φ; the padded part of G gets
an identity, so it never mixes with the real part.

Shapes: keys [T, H, D] (any token/head strides); bounds [NB + 1] block edges (prompt positions,
token 0 of keys at `offset`); sketch [D, KP] (`padded_sketch`); out [H, T] fp32 (any head stride;
may be a view into a larger [H, n] buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2


@triton.jit
def _leverage_kernel(
    keys_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    sketch_ptr,  # [D, KP] fp32, zero columns past K
    out_ptr,  # [H, T] fp32
    offset,  # prompt position of token 0 of the inputs
    ridge,
    stride_kt,
    stride_kh,
    stride_oh,
    D: tl.constexpr,
    K: tl.constexpr,  # real sketch width
    KP: tl.constexpr,  # padded sketch width (power of 2, >= 16)
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.load(bounds_ptr + blk) - offset
    hi = tl.load(bounds_ptr + blk + 1) - offset
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    c = tl.arange(0, KP)
    r = tl.arange(0, KP)
    base = keys_ptr + h * stride_kh
    phi = tl.load(sketch_ptr + d[:, None] * KP + c[None, :])  # [D, KP]

    # 1. block mean of the keys
    total = tl.zeros([D], tl.float32)
    for s in range(lo, hi, BLOCK_T):
        tok = s + t
        ok = tok < hi
        k = tl.load(base + tok.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(k.to(tl.float32), 0)
    count = (hi - lo).to(tl.float32)
    mu = total / count

    # 2. Gram of the centred, sketched keys
    gram = tl.zeros([KP, KP], tl.float32)
    for s in range(lo, hi, BLOCK_T):
        tok = s + t
        ok = tok < hi
        k = tl.load(base + tok.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
        kc = tl.where(ok[:, None], k.to(tl.float32) - mu[None, :], 0.0)
        x = tl.dot(kc, phi, input_precision=PRECISION)  # [BLOCK_T, KP]
        gram += tl.dot(tl.trans(x), x, input_precision=PRECISION)

    # 3. (G + ridge)⁻¹ by Gauss-Jordan elimination in registers
    eye = r[:, None] == c[None, :]
    diag = tl.sum(tl.where(eye, gram, 0.0), 1)  # [KP]
    lift = ridge * tl.maximum(tl.sum(tl.where(r < K, diag, 0.0), 0) / K, 1e-12)
    a = gram + tl.where(eye, tl.where(r < K, lift, 1.0)[:, None], 0.0)
    inv = tl.where(eye, 1.0, 0.0)
    for p in range(K):
        at_row = (r == p)[:, None]
        prow = tl.sum(tl.where(at_row, a, 0.0), 0)  # [KP] row p
        irow = tl.sum(tl.where(at_row, inv, 0.0), 0)
        pivot = tl.sum(tl.where(c == p, prow, 0.0), 0)
        prow = prow / pivot
        irow = irow / pivot
        col = tl.sum(tl.where((c == p)[None, :], a, 0.0), 1)  # [KP] column p
        f = tl.where(r == p, 0.0, col)
        a = tl.where(at_row, prow[None, :], a - f[:, None] * prow[None, :])
        inv = tl.where(at_row, irow[None, :], inv - f[:, None] * irow[None, :])
    # Σ_i o_i = Σ_i x_iᵀ G⁻¹ x_i = tr(G⁻¹ XᵀX): the block mean of o without another pass
    mean_o = tl.maximum(tl.sum(tl.sum(inv * gram, 1), 0) / count, 1e-12)

    # 4. o_i = x_iᵀ G⁻¹ x_i / mean(o)
    for s in range(lo, hi, BLOCK_T):
        tok = s + t
        ok = tok < hi
        k = tl.load(base + tok.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
        kc = tl.where(ok[:, None], k.to(tl.float32) - mu[None, :], 0.0)
        x = tl.dot(kc, phi, input_precision=PRECISION)  # [BLOCK_T, KP]
        y = tl.dot(x, inv, input_precision=PRECISION)
        o = tl.sum(x * y, 1)  # [BLOCK_T]
        tl.store(out_ptr + h * stride_oh + tok, o / mean_o, mask=ok)


def padded_sketch(sketch: torch.Tensor) -> torch.Tensor:
    """Φ [D, k] -> fp32 [D, KP] with zero columns past k (KP = max(16, next_pow2(k)))."""
    d, k = sketch.shape
    kp = max(16, next_pow2(k))
    out = torch.zeros(d, kp, dtype=torch.float32, device=sketch.device)
    out[:, :k] = sketch.float()
    return out


def leverage_scores(
    keys: torch.Tensor,
    bounds: torch.Tensor,
    sketch: torch.Tensor,
    sketch_size: int,
    out: torch.Tensor,
    offset: int = 0,
    ridge: float = 1e-4,
    block_t: int = 64,
    num_warps: int = 8,
) -> torch.Tensor:
    """keys [T, H, D] of prompt positions offset..offset+T-1; bounds [NB + 1] block edges (int32
    prompt positions, on the keys' device, within that range); sketch [D, KP] from `padded_sketch`;
    out [H, T] fp32 -> out: each block's leverage divided by its block mean."""
    t_len, h, d = keys.shape
    assert keys.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == (h, t_len), (keys.shape, out.shape)
    assert sketch.shape[0] == d and sketch.dtype == torch.float32 and sketch.is_contiguous()
    assert d == next_pow2(d) and d >= 16, f"head_dim {d}: a power of 2 >= 16"
    num_blocks = bounds.numel() - 1
    if num_blocks <= 0:
        return out
    precision = "tf32x3" if keys.is_cuda else "ieee"
    _leverage_kernel[(num_blocks, h)](
        keys,
        bounds,
        sketch,
        out,
        offset,
        ridge,
        keys.stride(0),
        keys.stride(1),
        out.stride(0),
        D=d,
        K=sketch_size,
        KP=sketch.shape[1],
        BLOCK_T=block_t,
        PRECISION=precision,
        num_warps=num_warps,
    )
    return out
