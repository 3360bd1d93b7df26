"""Sketched leverage scores of pre-RoPE keys, block by block (Triton).

The reference is engine/compression/leverage.py (`sketched_leverage`, then divided by the block's
mean as compactor does). A launch covers the blocks of one span of keys, in three kernels, so even
the two 1024-token blocks of one 2048-token chunk spread over hundreds of programs:
  1. `_partial_gram_kernel`, one program per (block, head, BLOCK_T tokens): x = (K - s)Φ and its
     partial sums Σ x xᵀ, Σ x, where the shift s is the mean of the block's first BLOCK_T keys
     (close to the block mean, so a large shared offset of the keys costs no precision);
  2. `_invert_kernel`, one per (block, head): the centred Gram G = Σ x xᵀ - b m mᵀ, a ridge relative
     to its trace, and (G + ridge)⁻¹ by symmetric sweeps in registers (SPD: no pivoting);
  3. `_score_kernel`, one per (block, head, BLOCK_T tokens): o_i = x_iᵀ G⁻¹ x_i with x centred,
     divided by the block mean of o, which is tr(G⁻¹ G) / b (no extra pass).
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
def _shift(base, lo, hi, stride_kt, t, d, BLOCK_T: tl.constexpr):
    """Mean [D] of the block's first BLOCK_T keys: a shift close to the block mean, so the Gram of
    the shifted keys loses no precision to a large shared offset."""
    tok = lo + t
    ok = tok < hi
    k = tl.load(base + tok.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
    return tl.sum(k.to(tl.float32), 0) / tl.minimum(hi - lo, BLOCK_T).to(tl.float32)


@triton.jit
def _sketch_tile(base, s0, hi, shift, phi, stride_kt, t, d, PRECISION: tl.constexpr):
    """x = (K - shift)Φ for the keys s0..s0+BLOCK_T-1 of the block (rows past hi are zero)."""
    tok = s0 + t
    ok = tok < hi
    k = tl.load(base + tok.to(tl.int64)[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
    kc = tl.where(ok[:, None], k.to(tl.float32) - shift[None, :], 0.0)
    return tl.dot(kc, phi, input_precision=PRECISION), ok  # [BLOCK_T, KP]


@triton.jit
def _partial_gram_kernel(
    keys_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    sketch_ptr,  # [D, KP] fp32, zero columns past K
    gram_ptr,  # [NB, H, S, KP, KP] fp32: Σ x xᵀ of each split
    xsum_ptr,  # [NB, H, S, KP] fp32: Σ x of each split
    offset,  # prompt position of token 0 of the keys
    stride_kt,
    stride_kh,
    H: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(bounds_ptr + blk) - offset
    hi = tl.load(bounds_ptr + blk + 1) - offset
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    c = tl.arange(0, KP)
    base = keys_ptr + h * stride_kh
    phi = tl.load(sketch_ptr + d[:, None] * KP + c[None, :])  # [D, KP]
    shift = _shift(base, lo, hi, stride_kt, t, d, BLOCK_T)
    x, ok = _sketch_tile(base, lo + split * BLOCK_T, hi, shift, phi, stride_kt, t, d, PRECISION)
    gram = tl.dot(tl.trans(x), x, input_precision=PRECISION)  # [KP, KP]
    ws = (blk * H + h) * S + split
    tl.store(gram_ptr + ws * KP * KP + c[:, None] * KP + c[None, :], gram)
    tl.store(xsum_ptr + ws * KP + c, tl.sum(x, 0))


@triton.jit
def _invert_kernel(
    bounds_ptr,  # [NB + 1] int32
    gram_ptr,  # [NB, H, S, KP, KP] fp32
    xsum_ptr,  # [NB, H, S, KP] fp32
    inv_ptr,  # [NB, H, KP, KP] fp32: (G + ridge)⁻¹ of the centred keys
    mean_ptr,  # [NB, H, KP] fp32: mean of the shifted sketch x
    norm_ptr,  # [NB, H] fp32: block mean of the leverage
    ridge,
    H: tl.constexpr,
    S: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    count = (tl.load(bounds_ptr + blk + 1) - tl.load(bounds_ptr + blk)).to(tl.float32)
    r = tl.arange(0, KP)
    c = tl.arange(0, KP)
    bh = blk * H + h
    gram = tl.zeros([KP, KP], tl.float32)
    xsum = tl.zeros([KP], tl.float32)
    for split in range(S):
        ws = bh * S + split
        gram += tl.load(gram_ptr + ws * KP * KP + r[:, None] * KP + c[None, :])
        xsum += tl.load(xsum_ptr + ws * KP + r)
    m = xsum / count
    gram = gram - count * m[:, None] * m[None, :]  # Σ (x - m)(x - m)ᵀ: the centred keys' Gram
    eye = r[:, None] == c[None, :]
    diag = tl.sum(tl.where(eye, gram, 0.0), 1)
    lift = ridge * tl.maximum(tl.sum(tl.where(r < K, diag, 0.0), 0) / K, 1e-12)
    a = gram + tl.where(eye, tl.where(r < K, lift, 1.0)[:, None], 0.0)
    # Symmetric sweeps on every real pivot turn the SPD matrix into -A⁻¹ (the padding stays -I
    # after its own sweeps are skipped, and never mixes in): one column read per pivot.
    for p in range(K):
        col = tl.sum(tl.where((c == p)[None, :], a, 0.0), 1)  # [KP] column p (= row p)
        pivot = tl.sum(tl.where(r == p, col, 0.0), 0)
        scaled = col / pivot
        a = a - col[:, None] * scaled[None, :]
        on_p = (r == p)[:, None] | (c == p)[None, :]
        a = tl.where(on_p, scaled[:, None] * (c == p)[None, :] + scaled[None, :] * (r == p)[:, None], a)
        a = tl.where(eye & (r == p)[:, None], -1.0 / pivot, a)
    inv = tl.where((r < K)[:, None] & (c < K)[None, :], -a, 0.0)
    # Σ_i o_i = tr(G⁻¹ Σ x xᵀ): the block mean of o without another pass over the keys
    norm = tl.maximum(tl.sum(tl.sum(inv * gram, 1), 0) / count, 1e-12)
    tl.store(inv_ptr + bh * KP * KP + r[:, None] * KP + c[None, :], inv)
    tl.store(mean_ptr + bh * KP + r, m)
    tl.store(norm_ptr + bh, norm)


@triton.jit
def _score_kernel(
    keys_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32
    sketch_ptr,  # [D, KP] fp32
    inv_ptr,  # [NB, H, KP, KP] fp32
    mean_ptr,  # [NB, H, KP] fp32
    norm_ptr,  # [NB, H] fp32
    out_ptr,  # [H, T] fp32
    offset,
    stride_kt,
    stride_kh,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(bounds_ptr + blk) - offset
    hi = tl.load(bounds_ptr + blk + 1) - offset
    s0 = lo + split * BLOCK_T
    if s0 >= hi:
        return
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    c = tl.arange(0, KP)
    base = keys_ptr + h * stride_kh
    bh = blk * H + h
    phi = tl.load(sketch_ptr + d[:, None] * KP + c[None, :])
    shift = _shift(base, lo, hi, stride_kt, t, d, BLOCK_T)
    x, ok = _sketch_tile(base, s0, hi, shift, phi, stride_kt, t, d, PRECISION)
    x = x - tl.load(mean_ptr + bh * KP + c)[None, :]  # the centred sketch
    inv = tl.load(inv_ptr + bh * KP * KP + c[:, None] * KP + c[None, :])
    o = tl.sum(x * tl.dot(x, inv, input_precision=PRECISION), 1)  # x_iᵀ G⁻¹ x_i
    tl.store(out_ptr + h * stride_oh + s0 + t, o / tl.load(norm_ptr + bh), mask=ok)


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
    max_block: int | None = None,
    ridge: float = 1e-4,
    block_t: int = 64,
) -> torch.Tensor:
    """keys [T, H, D] of prompt positions offset..offset+T-1; bounds [NB + 1] block edges (int32
    prompt positions, on the keys' device, within that range; no block longer than `max_block`,
    default T); sketch [D, KP] from `padded_sketch`; out [H, T] fp32 -> out: each block's leverage
    divided by its block mean."""
    t_len, h, d = keys.shape
    assert keys.stride(-1) == 1 and out.stride(-1) == 1 and out.shape == (h, t_len), (keys.shape, out.shape)
    assert sketch.shape[0] == d and sketch.dtype == torch.float32 and sketch.is_contiguous()
    assert d == next_pow2(d) and d >= 16, f"head_dim {d}: a power of 2 >= 16"
    num_blocks = bounds.numel() - 1
    if num_blocks <= 0:
        return out
    kp = sketch.shape[1]
    splits = triton.cdiv(max_block or t_len, block_t)
    precision = "tf32x3" if keys.is_cuda else "ieee"
    f32 = dict(dtype=torch.float32, device=keys.device)
    grams = torch.empty(num_blocks, h, splits, kp, kp, **f32)
    xsums = torch.empty(num_blocks, h, splits, kp, **f32)
    inv = torch.empty(num_blocks, h, kp, kp, **f32)
    means = torch.empty(num_blocks, h, kp, **f32)
    norms = torch.empty(num_blocks, h, **f32)
    common = dict(H=h, D=d, KP=kp, BLOCK_T=block_t, PRECISION=precision, num_warps=4)
    _partial_gram_kernel[(num_blocks, h, splits)](
        keys, bounds, sketch, grams, xsums, offset, keys.stride(0), keys.stride(1), S=splits, **common
    )
    _invert_kernel[(num_blocks, h)](
        bounds, grams, xsums, inv, means, norms, ridge, H=h, S=splits, K=sketch_size, KP=kp, num_warps=4
    )
    _score_kernel[(num_blocks, h, splits)](
        keys, bounds, sketch, inv, means, norms, out, offset, keys.stride(0), keys.stride(1), out.stride(0),
        **common,
    )  # fmt: skip
    return out
