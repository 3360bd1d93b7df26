"""What both decode kernels share: the inner loop (one GQA group over a token range of one head's
pages) and the launch arguments that go with it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import input_precision, next_pow2, upcast_dots


def row_strides(q: torch.Tensor, page_tables: torch.Tensor, lens: torch.Tensor, out: torch.Tensor) -> tuple:
    """The (batch, head) strides of q, page tables, lens and out, in the kernels' argument order."""
    return (*q.stride()[:2], *page_tables.stride()[:2], *lens.stride()[:2], *out.stride()[:2])


def tile_constexprs(q: torch.Tensor, kv_heads: int, page_size: int, block_n: int) -> dict:
    """attend_token_range's compile-time arguments for queries q [B, Hq, D]."""
    group = q.shape[1] // kv_heads
    return dict(
        G=group,
        BLOCK_G=max(16, next_pow2(group)),
        D=q.shape[2],
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        PRECISION=input_precision(q),
        UPCAST=upcast_dots(q),
    )


@triton.jit
def attend_token_range(
    q_ptr,
    q_rows,  # [BLOCK_G] offsets of the group's query rows
    kv_ptr,  # [num_pages, 2, P, D]
    pt,  # pointer to the head's page-table row
    lo,
    hi,  # tokens [lo, hi) of the head, lo a multiple of BLOCK_N
    scale_log2,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """-> (m [BLOCK_G] running max in log2 units, l_sum [BLOCK_G], acc [BLOCK_G, D] unnormalised)."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=(g < G)[:, None], other=0.0)  # [BLOCK_G, D]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + n  # [BLOCK_N]
        valid = tok < hi
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(pt + start // PAGE_SIZE).to(tl.int64)  # the whole block lies in one page
        else:
            page = tl.load(pt + tok // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row = page * (2 * PAGE_SIZE * D) + (tok % PAGE_SIZE) * D  # [BLOCK_N] offset of K
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(kv_ptr + PAGE_SIZE * D + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return m, l_sum, acc
