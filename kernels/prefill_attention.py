"""Chunked-prefill attention over the paged KV pool (Triton), batched over sequences (varlen).

Sequence i contributes the chunk q[cu_seqlens[i]:cu_seqlens[i+1]] after a prefix of starts[i]
tokens; its pages already hold every head's first starts[i] + T_i tokens (the chunk's own K/V
included, after the prefix), and the chunk attends to them causally: chunk token t sees the whole
prefix and chunk tokens 0..t. starts may also be per head, [S, H]: over a compressed cached context
each head keeps its own number of the context's tokens (engine/context_cache.py), and the chunk
follows each head's own prefix. Masks work in each head's key order only: RoPE positions are
already in the keys. A program takes BLOCK_M query rows made of BLOCK_M // G consecutive tokens
times the G query heads of one kv-head, so each K/V tile loaded serves the whole GQA group.

Shapes: q [N, Hq, D] (N = total chunk tokens); pool_kv [num_pages, 2, P, D];
page_tables [S, H, max_pages]; cu_seqlens [S + 1]; starts [S] or [S, H]; out [N, Hq, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import LOG2E, check_pool, input_precision, next_pow2, upcast_dots


@triton.jit
def _attend_block(
    q,
    acc,
    m,
    l_sum,
    kv_ptr,
    pt,
    kv_start,
    kv_end,
    q_pos,
    scale_log2,
    d,
    n,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, m, l_sum) with keys kv_start..kv_start+BLOCK_N-1."""
    tok = kv_start + n  # [BLOCK_N]
    if MASKED:
        valid = tok < kv_end
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(pt + kv_start // PAGE_SIZE).to(tl.int64)
        else:
            page = tl.load(pt + tok // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row = page * (2 * PAGE_SIZE * D) + (tok % PAGE_SIZE) * D
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(kv_ptr + PAGE_SIZE * D + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    else:
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(pt + kv_start // PAGE_SIZE).to(tl.int64)
        else:
            page = tl.load(pt + tok // PAGE_SIZE).to(tl.int64)
        row = page * (2 * PAGE_SIZE * D) + (tok % PAGE_SIZE) * D
        k = tl.load(kv_ptr + row[:, None] + d[None, :])
        v = tl.load(kv_ptr + PAGE_SIZE * D + row[:, None] + d[None, :])
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where((tok[None, :] <= q_pos[:, None]) & (tok < kv_end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_sum


@triton.jit
def _kv_rows(pt, kv_start, n, D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets [BLOCK_N] of the K rows of keys kv_start + n, all valid (V is PAGE_SIZE * D on)."""
    tok = kv_start + n
    if PAGE_SIZE % BLOCK_N == 0:
        page = tl.load(pt + kv_start // PAGE_SIZE).to(tl.int64)  # the whole tile lies in one page
    else:
        page = tl.load(pt + tok // PAGE_SIZE).to(tl.int64)
    return page * (2 * PAGE_SIZE * D) + (tok % PAGE_SIZE) * D


@triton.jit
def _softmax_pv(qk, v, acc, m, l_sum, scale_log2, PRECISION: tl.constexpr):
    """Online-softmax update with raw, unmasked scores qk [BLOCK_M, BLOCK_N]: the scale folds into
    the exponent's FMA, and P @ V accumulates into the rescaled acc."""
    m_new = tl.maximum(m, tl.max(qk, 1) * scale_log2)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_sum


@triton.jit(do_not_specialize=["stride_ps", "stride_ph"])  # page-table widths follow the prompt
def _prefill_kernel(
    q_ptr,  # [N, Hq, D]
    kv_ptr,  # [num_pages, 2, P, D]
    pt_ptr,  # [S, H, max_pages]
    cu_ptr,  # [S + 1]
    starts_ptr,  # [S], or [S, H] with HEAD_STARTS
    out_ptr,  # [N, Hq, D]
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_ph,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FOLD: tl.constexpr,  # unmasked tiles: the scale folds into the exponent (one FMA a score)
    HEAD_STARTS: tl.constexpr,  # starts are [S, H] (each head's own prefix), else [S]
):
    TOKENS: tl.constexpr = BLOCK_M // G  # chunk tokens per program
    seq = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_lo = tl.load(cu_ptr + seq).to(tl.int32)
    num_q = tl.load(cu_ptr + seq + 1).to(tl.int32) - q_lo
    num_blocks = tl.cdiv(num_q, TOKENS)
    if tl.program_id(0) >= num_blocks:
        return
    blk = num_blocks - 1 - tl.program_id(0)  # the longest rows first (causal load balance)
    t0 = blk * TOKENS
    if HEAD_STARTS:
        start = tl.load(starts_ptr + seq * H + h).to(tl.int32)
    else:
        start = tl.load(starts_ptr + seq).to(tl.int32)

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    t = t0 + r // G  # chunk token of each row
    row_ok = (r < TOKENS * G) & (t < num_q)
    q_rows = (q_lo + t).to(tl.int64) * stride_qt + (h * G + r % G) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = start + t  # [BLOCK_M] each row's own key index in its head (its last visible key)
    pt = pt_ptr + seq * stride_ps + h * stride_ph

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kv_end = start + tl.minimum(t0 + TOKENS, num_q)  # keys this block can see: [0, kv_end)
    full_end = (start + t0) // BLOCK_N * BLOCK_N  # every row sees every key before this
    if FOLD:
        for kv_start in range(0, full_end, BLOCK_N):
            rows = _kv_rows(pt, kv_start, n, D, PAGE_SIZE, BLOCK_N)
            k = tl.load(kv_ptr + rows[:, None] + d[None, :])
            v = tl.load(kv_ptr + PAGE_SIZE * D + rows[:, None] + d[None, :])
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            acc, m, l_sum = _softmax_pv(qk, v, acc, m, l_sum, scale_log2, PRECISION)
    else:
        for kv_start in range(0, full_end, BLOCK_N):
            acc, m, l_sum = _attend_block(
                q, acc, m, l_sum, kv_ptr, pt, kv_start, kv_end, q_pos, scale_log2, d, n,
                D, PAGE_SIZE, BLOCK_N, False, PRECISION, UPCAST,
            )  # fmt: skip
    for kv_start in range(full_end, kv_end, BLOCK_N):
        acc, m, l_sum = _attend_block(
            q, acc, m, l_sum, kv_ptr, pt, kv_start, kv_end, q_pos, scale_log2, d, n,
            D, PAGE_SIZE, BLOCK_N, True, PRECISION, UPCAST,
        )  # fmt: skip

    out = acc / l_sum[:, None]
    o_rows = (q_lo + t).to(tl.int64) * stride_ot + (h * G + r % G) * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(
    q: torch.Tensor,
    pool_kv: torch.Tensor,
    page_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    starts: torch.Tensor,
    max_q_len: int,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    fold_scale: bool = False,
) -> torch.Tensor:
    """q [N, Hq, D], page_tables [S, H, max_pages], cu_seqlens [S+1], starts [S] (or per head,
    [S, H]) -> [N, Hq, D].

    max_q_len bounds the chunk lengths (it sizes the grid); `out` may be given preallocated.
    Unset tile parameters take the fastest measured on an H100 for 2-byte dtypes (256 query rows,
    64 keys, 8 warps, 3 stages: benchmarks/prefill_variants.py, 2-8% over 128 rows and 4 warps);
    fp32 takes small tiles, since its dots run on CUDA cores and large ones spill registers (the
    launch then fails for lack of memory).
    `fold_scale` folds the softmax scale into the exponent's FMA on unmasked tiles (measured +1-2% at
    128 rows and 4 warps, -4% at the default tile, so off by default).
    """
    page_size, head_dim = check_pool(pool_kv)
    num_tokens, hq, d = q.shape
    num_seqs, h = page_tables.shape[:2]
    assert d == head_dim and hq % h == 0, (q.shape, page_tables.shape)
    head_starts = starts.dim() == 2
    assert cu_seqlens.shape == (num_seqs + 1,) and starts.shape in ((num_seqs,), (num_seqs, h))
    assert starts.is_contiguous()
    assert q.stride(-1) == 1 and page_tables.stride(-1) == 1
    group = hq // h
    wide = q.element_size() == 4
    block_m = block_m or (max(32, next_pow2(group)) if wide else 256)
    block_n = block_n or (32 if wide else 64)
    num_warps = num_warps or (4 if wide else 8)
    num_stages = num_stages or (1 if wide else 3)
    assert block_m >= group, "a query block must hold at least one token's whole GQA group"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(max_q_len, block_m // group), num_seqs * h)
    _prefill_kernel[grid](
        q,
        pool_kv,
        page_tables,
        cu_seqlens,
        starts,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        page_tables.stride(0),
        page_tables.stride(1),
        H=h,
        G=group,
        D=d,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=input_precision(q),
        UPCAST=upcast_dots(q),
        FOLD=fold_scale,
        HEAD_STARTS=head_starts,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
