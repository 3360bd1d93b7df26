"""Decode attention over the head-sparse paged KV pool (Triton).

One query token per sequence; every (sequence, kv-head) has its own length and its own chain of
pages. A program handles the whole GQA group of one kv-head over one split of that head's tokens
(split-K), so each K/V byte is read once; a second kernel merges the splits by log-sum-exp.

`decode_attention` is the engine's entry: this split kernel for small batches, the work-balanced
kernel (decode_balanced.py) from BALANCED_MIN_HEADS (sequence, kv-head) pairs on.

Shapes: q [B, Hq, D]; pool_kv [num_pages, 2, P, D]; page_tables [B, H, max_pages] (int32, -1 where
unallocated); lens [B, H] tokens kept by each head; out [B, Hq, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import LOG2E, check_pool, next_pow2, num_sms
from kvferry.kernels._decode_tiles import attend_token_range, row_strides, tile_constexprs
from kvferry.kernels.decode_balanced import DecodePlan, decode_attention_balanced


# page-table widths follow the batch's longest sequence
@triton.jit(do_not_specialize=["stride_pb", "stride_ph", "num_splits"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    kv_ptr,  # [num_pages, 2, P, D]
    pt_ptr,  # [B, H, max_pages]
    lens_ptr,  # [B, H]
    out_ptr,  # [B, Hq, D] (num_splits == 1)
    mid_o_ptr,  # [B, Hq, S, D] fp32 (S = num_splits > 1)
    mid_lse_ptr,  # [B, Hq, S] fp32, log2 domain
    scale_log2,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_splits,  # a run-time value, never specialized: a new split count costs no recompilation
    H: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for the merge kernel
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(lens_ptr + b * stride_lb + h * stride_lh).to(tl.int32)
    # This head's tokens are cut into num_splits equal, BLOCK_N-aligned pieces.
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q_rows = b * stride_qb + (h * G + g) * stride_qh  # [BLOCK_G]
    pt = pt_ptr + b * stride_pb + h * stride_ph
    m, l_sum, acc = attend_token_range(
        q_ptr, q_rows, kv_ptr, pt, lo, hi, scale_log2, G, BLOCK_G, D, PAGE_SIZE, BLOCK_N, PRECISION, UPCAST
    )

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    if not SPLIT:
        o_rows = b * stride_ob + (h * G + g) * stride_oh
        tl.store(
            out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None]
        )
    else:
        qh = (b * H + h) * G + g  # flat (b, q-head) index into the contiguous mid buffers
        tl.store(
            mid_o_ptr + ((qh * num_splits + split) * D)[:, None] + d[None, :], out, mask=(g < G)[:, None]
        )
        lse = tl.where(l_sum > 0, m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + qh * num_splits + split, lse, mask=g < G)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    mid_o_ptr,  # [B, Hq, S, D] fp32
    mid_lse_ptr,  # [B, Hq, S] fp32
    out_ptr,  # [B, Hq, D]
    stride_ob,
    stride_oh,
    num_splits,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    qh = tl.program_id(0)  # flat (b, q-head)
    b = qh // HQ
    hq = qh % HQ
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    lse = tl.load(mid_lse_ptr + qh * num_splits + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a head with no tokens: every weight 0, output 0
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(
        mid_o_ptr + ((qh * num_splits + s) * D)[:, None] + d[None, :],
        mask=(s < num_splits)[:, None],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# Measured on an H100 (benchmarks/attention_kernels.py --sweep, docs/benchmarks/kernels.md): many small
# programs per SM keep enough loads in flight at batch 1; the merge costs little.
PROGRAMS_PER_SM = 32
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 256


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_tokens: int,
    device: torch.device,
    programs_per_sm: int = PROGRAMS_PER_SM,
    min_split: int = MIN_SPLIT_TOKENS,
) -> int:
    """Enough programs to fill the GPU `programs_per_sm` times over, but no split shorter than
    `min_split` tokens of the longest head (and at most MAX_SPLITS).

    Depends only on shapes (not on head lengths), so it is fixed under CUDA-graph capture.
    """
    want = -(-programs_per_sm * num_sms(device) // (batch * num_kv_heads))
    return max(1, min(want, -(-max_tokens // min_split), MAX_SPLITS))


def decode_attention_split(
    q: torch.Tensor,
    pool_kv: torch.Tensor,
    page_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], page_tables [B, H, max_pages], lens [B, H] -> [B, Hq, D] (see module doc).

    `out` [B, Hq, D] and `workspace` (fp32 [B, Hq, S, D] and [B, Hq, S], S = num_splits) may be
    given preallocated (CUDA graphs, tests that poison them); otherwise they are allocated here.
    """
    page_size, head_dim = check_pool(pool_kv)
    b, hq, d = q.shape
    h = page_tables.shape[1]
    assert d == head_dim and hq % h == 0 and lens.shape == (b, h), (q.shape, page_tables.shape, lens.shape)
    assert q.stride(-1) == 1 and page_tables.stride(-1) == 1
    wide = q.element_size() == 4  # fp32: dots run on CUDA cores, so small tiles (no spills)
    if block_n is None:
        block_n = 32 if wide else 128
    if num_stages is None:
        num_stages = 2
    if num_splits is None:
        num_splits = choose_num_splits(b, h, page_tables.shape[-1] * page_size, q.device)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_splits > 1:
        if workspace is None:
            workspace = (
                torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device),
                torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device),
            )
        mid_o, mid_lse = workspace
        assert mid_o.shape == (b, hq, num_splits, d) and mid_lse.shape == (b, hq, num_splits)
        assert mid_o.is_contiguous() and mid_lse.is_contiguous()
    else:
        mid_o = mid_lse = out  # unused
    _decode_split_kernel[(b * h, num_splits)](
        q,
        pool_kv,
        page_tables,
        lens,
        out,
        mid_o,
        mid_lse,
        scale * LOG2E,
        *row_strides(q, page_tables, lens, out),
        num_splits,
        H=h,
        SPLIT=num_splits > 1,
        **tile_constexprs(q, h, page_size, block_n),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_merge_kernel[(b * hq,)](
            mid_o,
            mid_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_splits,
            HQ=hq,
            D=d,
            BLOCK_S=max(2, next_pow2(num_splits)),
            num_warps=4,
        )
    return out


# Measured on an H100 (benchmarks/attention_kernels.py, docs/benchmarks/kernels.md): with 64 heads or more
# (B >= 8 at 8 kv heads) the balanced kernel is 1-4% faster; at B=1 its extra merge work and
# dependent loads cost 1-2 us of calls that take 11-60 us.
BALANCED_MIN_HEADS = 64


def use_balanced(batch: int, kv_heads: int) -> bool:
    """Whether decode_attention takes the work-balanced kernel (shapes only: fixed under capture)."""
    return batch * kv_heads >= BALANCED_MIN_HEADS


def decode_attention(
    q: torch.Tensor,
    pool_kv: torch.Tensor,
    page_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    *,
    plan: DecodePlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], page_tables [B, H, max_pages], lens [B, H] -> [B, Hq, D].

    The work-balanced kernel when `plan` is given (plan_decode over `lens`; a decode step builds
    one for all its layers) or the batch has BALANCED_MIN_HEADS heads, else the split kernel."""
    if plan is not None or use_balanced(*lens.shape):  # without a plan, it plans this call alone
        return decode_attention_balanced(q, pool_kv, page_tables, lens, scale, plan=plan, out=out)
    return decode_attention_split(q, pool_kv, page_tables, lens, scale, out=out)
