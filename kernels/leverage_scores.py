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

The sketch paths (`method="sketch3"`, the default, and "sketch2") compute x once: the Gram kernel
keeps x = (K - k_lo)Φ (k_lo: the block's first key, one row instead of a mean of BLOCK_T keys) in a
workspace, and the score kernel reads it back (no keys, no Φ, no second sketch product). The sketch
product runs in tf32 on CUDA: since the Gram and the scores share the same x, its rounding acts as a
slightly different sketch. sketch2 also inverts inside the Gram launch: the last program of each
(block, head) to finish (an atomic ticket) sums the partials and inverts (two launches, not three).
Scratch buffers live in a `LeverageWorkspace` that a caller can keep (no allocations per call).
"split3" is the path of 2026-11-23 above, kept for comparison.

"fused" (the default) is sketch3 in one kernel: one program per (block, head) streams the block's
keys in BLOCK_T-token tiles (x kept in the workspace, the Gram and Σ x summed in registers), inverts,
and scores the kept x. No partial Grams go through memory; 100 us against sketch3's 153 us for a
2048-token chunk of 8 layers x 8 kv heads on an H100.

Shapes: keys [T, H, D] (any token/head strides); bounds [NB + 1] block edges (prompt positions,
token 0 of keys at `offset`); sketch [D, KP] (`padded_sketch`); out [H, T] fp32 (any head stride;
may be a view into a larger [H, n] buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import next_pow2


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


@triton.jit(do_not_specialize=["offset"])
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


@triton.jit(do_not_specialize=["offset", "stride_oh"])
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


# ---- the "sketch" paths: x computed once and kept, the shift is the block's first key ----


@triton.jit
def _invert_tile(gram, xsum, count, ridge, r, c, K: tl.constexpr):
    """(G + ridge)⁻¹ [KP, KP] of the centred Gram, the mean m of x and the block mean of o, from the
    summed partials (the algorithm of _invert_kernel)."""
    m = xsum / count
    gram = gram - count * m[:, None] * m[None, :]  # Σ (x - m)(x - m)ᵀ: the centred keys' Gram
    eye = r[:, None] == c[None, :]
    diag = tl.sum(tl.where(eye, gram, 0.0), 1)
    lift = ridge * tl.maximum(tl.sum(tl.where(r < K, diag, 0.0), 0) / K, 1e-12)
    a = gram + tl.where(eye, tl.where(r < K, lift, 1.0)[:, None], 0.0)
    for p in range(K):  # symmetric sweeps: a becomes -A⁻¹ (see _invert_kernel)
        col = tl.sum(tl.where((c == p)[None, :], a, 0.0), 1)
        pivot = tl.sum(tl.where(r == p, col, 0.0), 0)
        scaled = col / pivot
        a = a - col[:, None] * scaled[None, :]
        on_p = (r == p)[:, None] | (c == p)[None, :]
        a = tl.where(on_p, scaled[:, None] * (c == p)[None, :] + scaled[None, :] * (r == p)[:, None], a)
        a = tl.where(eye & (r == p)[:, None], -1.0 / pivot, a)
    inv = tl.where((r < K)[:, None] & (c < K)[None, :], -a, 0.0)
    norm = tl.maximum(tl.sum(tl.sum(inv * gram, 1), 0) / count, 1e-12)  # tr(G⁻¹ Σ x xᵀ) / b
    return inv, m, norm


@triton.jit(do_not_specialize=["offset", "blk0"])
def _sketch_gram_kernel(
    keys_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    sketch_ptr,  # [D, KP] fp32, zero columns past K
    x_ptr,  # [NB, H, S, BLOCK_T, KP] fp32: the shifted sketch x of each token (0 past the block)
    gram_ptr,  # [NB, H, S, KP, KP] fp32: Σ x xᵀ of each split
    xsum_ptr,  # [NB, H, S, KP] fp32: Σ x of each split
    ticket_ptr,  # [NB, H] int32 (TICKET): zero before the launch, and again after it
    inv_ptr,  # [NB, H, KP, KP] fp32 (TICKET): (G + ridge)⁻¹
    mean_ptr,  # [NB, H, KP] fp32 (TICKET)
    norm_ptr,  # [NB, H] fp32 (TICKET)
    offset,  # prompt position of token 0 of the keys
    blk0,  # the launch's first block: bounds_ptr[blk0 + blk] are its edges
    ridge,
    stride_kt,
    stride_kh,
    H: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SKETCH_PRECISION: tl.constexpr,
    PRECISION: tl.constexpr,
    TICKET: tl.constexpr,
):
    """x = (K - k_lo)Φ of BLOCK_T tokens (k_lo: the block's first key, which takes a large shared
    offset out as well as a mean would), kept for the score pass, and its partial sums. With TICKET,
    the last program of a (block, head) to finish also sums the partials and inverts."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(bounds_ptr + blk0 + blk) - offset
    hi = tl.load(bounds_ptr + blk0 + blk + 1) - offset
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    r = tl.arange(0, KP)
    c = tl.arange(0, KP)
    base = keys_ptr + h * stride_kh
    bh = blk * H + h
    s0 = lo + split * BLOCK_T
    if s0 < hi:  # splits past a shorter block's end write nothing, and nothing reads them
        phi = tl.load(sketch_ptr + d[:, None] * KP + c[None, :])  # [D, KP]
        shift = tl.load(base + lo.to(tl.int64) * stride_kt + d).to(tl.float32)
        # x is computed once, so the Gram and the scores see the same x whatever the precision
        x, ok = _sketch_tile(base, s0, hi, shift, phi, stride_kt, t, d, SKETCH_PRECISION)
        ws = bh * S + split
        tl.store(x_ptr + ws * BLOCK_T * KP + t[:, None] * KP + c[None, :], x)
        gram = tl.dot(tl.trans(x), x, input_precision=PRECISION)  # [KP, KP]
        tl.store(gram_ptr + ws * KP * KP + r[:, None] * KP + c[None, :], gram)
        tl.store(xsum_ptr + ws * KP + c, tl.sum(x, 0))
    if TICKET:
        # All threads' stores, then one acq_rel atomic at gpu scope (a CUTLASS semaphore's order):
        # the program that draws the last ticket sees every partial of its (block, head).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + bh, 1)
        if ticket == S - 1:
            tl.atomic_xchg(ticket_ptr + bh, 0)  # ready for the next launch
            gram = tl.zeros([KP, KP], tl.float32)
            xsum = tl.zeros([KP], tl.float32)
            for sp in range(tl.cdiv(hi - lo, BLOCK_T)):  # a fixed order: the same sums every launch
                ws = bh * S + sp
                gram += tl.load(gram_ptr + ws * KP * KP + r[:, None] * KP + c[None, :], cache_modifier=".cg")
                xsum += tl.load(xsum_ptr + ws * KP + r, cache_modifier=".cg")
            inv, m, norm = _invert_tile(gram, xsum, (hi - lo).to(tl.float32), ridge, r, c, K)
            tl.store(inv_ptr + bh * KP * KP + r[:, None] * KP + c[None, :], inv)
            tl.store(mean_ptr + bh * KP + r, m)
            tl.store(norm_ptr + bh, norm)


@triton.jit(do_not_specialize=["blk0"])
def _invert_partials_kernel(
    bounds_ptr,  # [NB + 1] int32
    gram_ptr,  # [NB, H, S, KP, KP] fp32
    xsum_ptr,  # [NB, H, S, KP] fp32
    inv_ptr,  # [NB, H, KP, KP] fp32
    mean_ptr,  # [NB, H, KP] fp32
    norm_ptr,  # [NB, H] fp32
    blk0,
    ridge,
    H: tl.constexpr,
    S: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """_invert_kernel for the sketch paths: only the block's own splits are summed."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(bounds_ptr + blk0 + blk + 1) - tl.load(bounds_ptr + blk0 + blk)
    r = tl.arange(0, KP)
    c = tl.arange(0, KP)
    bh = blk * H + h
    gram = tl.zeros([KP, KP], tl.float32)
    xsum = tl.zeros([KP], tl.float32)
    for sp in range(tl.cdiv(n, BLOCK_T)):
        ws = bh * S + sp
        gram += tl.load(gram_ptr + ws * KP * KP + r[:, None] * KP + c[None, :])
        xsum += tl.load(xsum_ptr + ws * KP + r)
    inv, m, norm = _invert_tile(gram, xsum, n.to(tl.float32), ridge, r, c, K)
    tl.store(inv_ptr + bh * KP * KP + r[:, None] * KP + c[None, :], inv)
    tl.store(mean_ptr + bh * KP + r, m)
    tl.store(norm_ptr + bh, norm)


@triton.jit(do_not_specialize=["offset", "blk0", "out_col", "stride_oh"])
def _score_x_kernel(
    bounds_ptr,  # [NB + 1] int32
    x_ptr,  # [NB, H, S, BLOCK_T, KP] fp32
    inv_ptr,  # [NB, H, KP, KP] fp32
    mean_ptr,  # [NB, H, KP] fp32
    norm_ptr,  # [NB, H] fp32
    out_ptr,  # [H, >= out_col + T] fp32
    offset,
    blk0,
    out_col,  # column of out that token 0 of the keys goes to
    stride_oh,
    H: tl.constexpr,
    S: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """o_i = x_iᵀ G⁻¹ x_i over the block mean, from the kept x (no keys, no sketch)."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(bounds_ptr + blk0 + blk) - offset
    hi = tl.load(bounds_ptr + blk0 + blk + 1) - offset
    s0 = lo + split * BLOCK_T
    if s0 >= hi:
        return
    t = tl.arange(0, BLOCK_T)
    c = tl.arange(0, KP)
    bh = blk * H + h
    ws = bh * S + split
    x = tl.load(x_ptr + ws * BLOCK_T * KP + t[:, None] * KP + c[None, :])
    x = x - tl.load(mean_ptr + bh * KP + c)[None, :]  # the centred sketch
    inv = tl.load(inv_ptr + bh * KP * KP + c[:, None] * KP + c[None, :])
    o = tl.sum(x * tl.dot(x, inv, input_precision=PRECISION), 1)  # x_iᵀ G⁻¹ x_i
    tl.store(out_ptr + h * stride_oh + out_col + s0 + t, o / tl.load(norm_ptr + bh), mask=s0 + t < hi)


@triton.jit(do_not_specialize=["offset", "blk0", "out_col", "stride_oh"])
def _fused_kernel(
    keys_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    sketch_ptr,  # [D, KP] fp32, zero columns past K
    x_ptr,  # [NB, H, S, BLOCK_T, KP] fp32: the shifted sketch x of each token
    out_ptr,  # [H, >= out_col + T] fp32
    offset,  # prompt position of token 0 of the keys
    blk0,
    out_col,
    ridge,
    stride_kt,
    stride_kh,
    stride_oh,
    H: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SKETCH_PRECISION: tl.constexpr,
    PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """sketch3 in one program per (block, head): stream the block's keys once (x kept, Gram and Σ x
    summed in registers), invert, then score the kept x. No partial Grams go through memory, and a
    launch is one kernel."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.load(bounds_ptr + blk0 + blk) - offset
    hi = tl.load(bounds_ptr + blk0 + blk + 1) - offset
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    r = tl.arange(0, KP)
    c = tl.arange(0, KP)
    base = keys_ptr + h * stride_kh
    bh = blk * H + h
    xs = x_ptr + bh * S * BLOCK_T * KP
    phi = tl.load(sketch_ptr + d[:, None] * KP + c[None, :])  # [D, KP]
    shift = tl.load(base + lo.to(tl.int64) * stride_kt + d).to(tl.float32)
    gram = tl.zeros([KP, KP], tl.float32)
    xsum = tl.zeros([KP], tl.float32)
    for s0 in tl.range(0, hi - lo, BLOCK_T, num_stages=NUM_STAGES):
        x, ok = _sketch_tile(base, lo + s0, hi, shift, phi, stride_kt, t, d, SKETCH_PRECISION)
        tl.store(xs + (s0 + t)[:, None] * KP + c[None, :], x)
        gram += tl.dot(tl.trans(x), x, input_precision=PRECISION)
        xsum += tl.sum(x, 0)
    inv, m, norm = _invert_tile(gram, xsum, (hi - lo).to(tl.float32), ridge, r, c, K)
    tl.debug_barrier()  # every thread's x is stored before any is read back
    inv = inv / norm  # o / norm = x_iᵀ (G⁻¹ / norm) x_i
    for s0 in tl.range(0, hi - lo, BLOCK_T, num_stages=NUM_STAGES):
        x = tl.load(xs + (s0 + t)[:, None] * KP + c[None, :], cache_modifier=".cg") - m[None, :]
        o = tl.sum(x * tl.dot(x, inv, input_precision=PRECISION), 1)
        tl.store(out_ptr + h * stride_oh + out_col + lo + s0 + t, o, mask=lo + s0 + t < hi)


def padded_sketch(sketch: torch.Tensor) -> torch.Tensor:
    """Φ [D, k] -> fp32 [D, KP] with zero columns past k (KP = max(16, next_pow2(k)))."""
    d, k = sketch.shape
    kp = max(16, next_pow2(k))
    out = torch.zeros(d, kp, dtype=torch.float32, device=sketch.device)
    out[:, :k] = sketch.float()
    return out


STAGES = {
    "split3": ("gram", "invert", "score"),  # the three kernels of 2026-11-23
    "sketch3": ("sketch_gram", "invert", "score"),  # x kept: the score pass reads no keys
    "sketch2": ("sketch_gram", "score"),  # sketch3 with the inverse in the Gram launch (tickets)
    "fused": ("fused",),  # sketch3 in one kernel: a program streams, inverts and scores its block
}
# A Newton-Schulz inverse with tensor-core dots was measured on an H100 (2026-12-06): 44.7 us against
# the sweeps' 32-34 us per 2048-token launch, and 2% score error on keys with a few 300x dims. Dropped.
# fused against sketch3 on an H100 (2026-12-06), a 2048-token chunk of 8 layers x 8 kv heads: 117 us
# against 153 us per launch, the same scores (benchmarks/scoring_kernels.py --lev-heads 64).
DEFAULT_METHOD = "fused"
INVERT_WARPS = 8  # the sweep's 48 steps are throughput-bound: more warps, fewer elements each
FUSED_WARPS = 4  # one program streams, inverts and scores: 4 warps 100-117 us, 8 warps 141-156, 2 warps 270


def leverage_splits(max_block: int, block_t: int) -> int:
    """The kernels' S (a compile-time constant): BLOCK_T-token splits of the longest block, rounded up to
    a power of two. Near-equal blocks make the longest block's length follow the prompt's, so an exact
    count would compile the kernels again for almost every new prompt length (seconds each on a GPU);
    rounded, a process compiles at most log2(max block / BLOCK_T) + 1 variants. Splits past a block's
    end compute nothing (fused, sketch paths) or zeros (split3)."""
    return next_pow2(triton.cdiv(max_block, block_t))


class LeverageWorkspace:
    """Scratch buffers of `leverage_scores`, grown on demand and reused across calls: a caller that
    keeps one (compactor keeps one per prompt) allocates nothing per call, and CUDA-graph captures
    see fixed addresses. One workspace serves one stream at a time: launches on a stream run in
    order, and sketch2's tickets are back to zero when its launch ends."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}
        self.last: tuple | None = None  # the arguments of the last `get` (its buffers still fit)

    def get(self, method: str, nbh: int, splits: int, block_t: int, kp: int, device: torch.device) -> dict:
        key = (method, nbh, splits, block_t, kp, device)
        if key == self.last:
            return self.bufs
        # fused keeps the sums and the inverse in the program's registers: only x goes through memory
        need = {} if method == "fused" else dict(
            grams=nbh * splits * kp * kp,
            xsums=nbh * splits * kp,
            inv=nbh * kp * kp,
            means=nbh * kp,
            norms=nbh,
        )  # fmt: skip
        if method != "split3":
            need["xs"] = nbh * splits * block_t * kp
        if method == "sketch2":
            need["tickets"] = nbh
        bufs = self.bufs
        for name, n in need.items():
            buf = bufs.get(name)
            if buf is None or buf.numel() < n or buf.device != device:
                if name == "tickets":  # sketch2's counters start (and end) at zero
                    bufs[name] = torch.zeros(n, dtype=torch.int32, device=device)
                else:
                    bufs[name] = torch.empty(n, dtype=torch.float32, device=device)
        self.last = key
        return bufs


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
    method: str | None = None,
    workspace: LeverageWorkspace | None = None,
    num_warps: int = 4,
    invert_warps: int | None = None,
    sketch_precision: str | None = None,
    stages: tuple[str, ...] | None = None,
    blocks: tuple[int, int] | None = None,
    out_col: int | None = None,
    fused_stages: int = 3,
) -> torch.Tensor:
    """keys [T, H, D] of prompt positions offset..offset+T-1; bounds [NB + 1] block edges (int32
    prompt positions, on the keys' device, within that range; no block longer than `max_block`,
    default T); sketch [D, KP] from `padded_sketch`; out [H, T] fp32 -> out: each block's leverage
    divided by its block mean.

    method: a key of STAGES (default DEFAULT_METHOD). workspace: scratch buffers to reuse (one
    stream at a time); a fresh one per call if None. num_warps: every kernel's but the inverse's
    (invert_warps: split3 4, else INVERT_WARPS). sketch_precision: of x = (K - s)Φ in the sketch
    paths, "tf32" on CUDA by default: x is computed once and used by both the Gram and the scores,
    so its rounding acts as a slightly different sketch (the Gram and x G⁻¹ stay tf32x3). stages: for benchmarks, a subset of STAGES[method] launched
    alone on the workspace's contents.
    blocks (first, last): the launch covers bounds[first:last + 1] of a longer bounds tensor; out_col:
    out is [H, n] and the keys' tokens go to its columns out_col.. (no slicing on the host)."""
    t_len, h, d = keys.shape
    method = method or DEFAULT_METHOD
    if method == "split3" and (blocks is not None or out_col is not None):  # the old path slices
        if blocks is not None:
            bounds = bounds[blocks[0] : blocks[1] + 1]
        if out_col is not None:
            out = out[:, out_col : out_col + t_len]
        blocks = out_col = None
    if out_col is None:
        assert out.shape == (h, t_len), (keys.shape, out.shape)
    else:
        assert out.shape[0] == h and out.shape[1] >= out_col + t_len, (keys.shape, out.shape, out_col)
    assert keys.stride(-1) == 1 and out.stride(-1) == 1
    assert sketch.shape[0] == d and sketch.dtype == torch.float32 and sketch.is_contiguous()
    assert d == next_pow2(d) and d >= 16, f"head_dim {d}: a power of 2 >= 16"
    stages = stages or STAGES[method]
    blk0, num_blocks = (0, bounds.numel() - 1) if blocks is None else (blocks[0], blocks[1] - blocks[0])
    if num_blocks <= 0:
        return out
    kp = sketch.shape[1]
    splits = leverage_splits(max_block or t_len, block_t)
    precision = "tf32x3" if keys.is_cuda else "ieee"
    ws = (workspace or LeverageWorkspace()).get(method, num_blocks * h, splits, block_t, kp, keys.device)
    grid = (num_blocks, h, splits)
    if method == "split3":
        common = dict(H=h, D=d, KP=kp, BLOCK_T=block_t, PRECISION=precision, num_warps=num_warps)
        if "gram" in stages:
            _partial_gram_kernel[grid](
                keys, bounds, sketch, ws["grams"], ws["xsums"], offset, keys.stride(0), keys.stride(1),
                S=splits, **common,
            )  # fmt: skip
        if "invert" in stages:
            _invert_kernel[(num_blocks, h)](
                bounds, ws["grams"], ws["xsums"], ws["inv"], ws["means"], ws["norms"], ridge, H=h,
                S=splits, K=sketch_size, KP=kp, num_warps=invert_warps or 4,
            )  # fmt: skip
        if "score" in stages:
            _score_kernel[grid](
                keys, bounds, sketch, ws["inv"], ws["means"], ws["norms"], out, offset, keys.stride(0),
                keys.stride(1), out.stride(0), **common,
            )  # fmt: skip
        return out
    assert method in STAGES, method
    ticket = method == "sketch2"
    sketch_precision = sketch_precision or ("tf32" if keys.is_cuda else "ieee")
    if method == "fused":
        _fused_kernel[(num_blocks, h)](
            keys, bounds, sketch, ws["xs"], out, offset, blk0, out_col or 0, ridge, keys.stride(0),
            keys.stride(1), out.stride(0), H=h, S=splits, D=d, K=sketch_size, KP=kp, BLOCK_T=block_t,
            SKETCH_PRECISION=sketch_precision, PRECISION=precision, NUM_STAGES=fused_stages,
            num_warps=invert_warps or FUSED_WARPS,
        )  # fmt: skip
        return out
    invert_warps = invert_warps or INVERT_WARPS
    if "sketch_gram" in stages:
        extra = (ws["tickets"], ws["inv"], ws["means"], ws["norms"]) if ticket else (keys,) * 4  # unused
        _sketch_gram_kernel[grid](
            keys, bounds, sketch, ws["xs"], ws["grams"], ws["xsums"], *extra, offset, blk0, ridge,
            keys.stride(0), keys.stride(1), H=h, S=splits, D=d, K=sketch_size, KP=kp, BLOCK_T=block_t,
            SKETCH_PRECISION=sketch_precision, PRECISION=precision, TICKET=ticket,
            num_warps=invert_warps if ticket else num_warps,
        )  # fmt: skip
    if "invert" in stages and not ticket:
        _invert_partials_kernel[(num_blocks, h)](
            bounds, ws["grams"], ws["xsums"], ws["inv"], ws["means"], ws["norms"], blk0, ridge, H=h,
            S=splits, K=sketch_size, KP=kp, BLOCK_T=block_t, num_warps=invert_warps,
        )  # fmt: skip
    if "score" in stages:
        _score_x_kernel[grid](
            bounds, ws["xs"], ws["inv"], ws["means"], ws["norms"], out, offset, blk0, out_col or 0,
            out.stride(0), H=h, S=splits, KP=kp, BLOCK_T=block_t, PRECISION=precision,
            num_warps=num_warps,
        )  # fmt: skip
    return out
