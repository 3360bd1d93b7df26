"""Work-balanced decode attention over the head-sparse paged pool (Triton, stream-K style).

The split kernel (decode_attention.py) cuts every (sequence, kv-head) into the same number of
splits, so when heads keep different numbers of tokens the long heads' splits run longest, and each
program reads only a tile or two before it ends. Here a call's key tiles (BLOCK_N tokens of one
head) are laid end to end over all heads, and each of a fixed number of programs takes an equal run
of them. A program streams its run head after head: a head it covers whole it writes to `out`; a
piece of a head (at the start or the end of its run) it writes as a partial result, which the
merge kernel combines by log-sum-exp.

The plan (which head each program starts in) is built on the device from the head lengths, with no
host synchronisation, for all layers of a decode step at once: plan_decode(lens [L, B, H]).

Shapes: q [B, Hq, D]; pool_kv [num_pages, 2, P, D]; page_tables [B, H, max_pages]; lens [B, H];
out [B, Hq, D]; partials: mid_o [2 * programs, G, D] fp32, mid_lse [2 * programs, G] fp32 (log2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import LOG2E, check_pool, next_pow2, num_sms
from kvferry.kernels._decode_tiles import attend_token_range, row_strides, tile_constexprs

# Measured on an H100 (benchmarks/attention_kernels.py --balanced-sweep, docs/benchmarks/kernels.md).
BLOCK_N = 64
NUM_STAGES = 2
NUM_WARPS = 4
PROGRAMS_PER_SM = 3
MIN_TILES = 1  # tiles a program takes at least: small calls then leave programs idle


@dataclass(frozen=True)
class DecodePlan:
    """How a decode call's key tiles are shared among `num_programs` programs (one per layer row).

    tile_ends [..., B*H] int32: inclusive running sum of each head's tiles, heads in (b, h) order;
    runs [..., num_programs, 5] int32: each program's first head, that head's first tile and its
    length in tokens, and the program's tiles [lo, hi). Each program takes
    max(ceil(tiles / num_programs), min_tiles) tiles, so trailing programs may have none (lo >= hi).
    """

    tile_ends: torch.Tensor
    runs: torch.Tensor
    block_n: int
    num_programs: int
    min_tiles: int = MIN_TILES

    def layer(self, i: int) -> DecodePlan:
        return DecodePlan(self.tile_ends[i], self.runs[i], self.block_n, self.num_programs, self.min_tiles)


def default_num_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * num_sms(device)


def balanced_block_n(dtype: torch.dtype) -> int:
    """Key tile for a pool of this dtype: fp32 dots run on CUDA cores, so smaller tiles."""
    return 32 if dtype == torch.float32 else BLOCK_N


def plan_decode(
    lens: torch.Tensor, block_n: int = BLOCK_N, num_programs: int | None = None, min_tiles: int = MIN_TILES
) -> DecodePlan:
    """lens [..., B, H] tokens per head -> the plan of each leading index (device ops only)."""
    if num_programs is None:
        num_programs = default_num_programs(lens.device)
    tiles = (lens.flatten(-2).to(torch.int32) + block_n - 1) // block_n  # [..., B*H]
    ends = torch.cumsum(tiles, dim=-1, dtype=torch.int32)
    total = ends[..., -1:]  # [..., 1]
    per = ((total + num_programs - 1) // num_programs).clamp(min=min_tiles)  # tiles per program
    run_lo = torch.arange(num_programs, device=lens.device, dtype=torch.int32) * per  # [..., P]
    run_hi = torch.minimum(run_lo + per, total)
    first = torch.searchsorted(ends, run_lo, right=True, out_int32=True)  # first head ending past lo
    first = first.clamp(max=tiles.shape[-1] - 1)  # a program with no tiles: any head
    head_lo = torch.gather(ends - tiles, -1, first.long())
    length = torch.gather(lens.flatten(-2).to(torch.int32), -1, first.long())
    runs = torch.stack([first, head_lo, length, run_lo, run_hi], dim=-1)  # [..., P, 5]
    return DecodePlan(ends, runs, block_n, num_programs, min_tiles)


# page-table widths follow the batch's longest sequence, the head count its size
@triton.jit(do_not_specialize=["stride_pb", "stride_ph", "num_heads"])
def _decode_balanced_kernel(
    q_ptr,  # [B, Hq, D]
    kv_ptr,  # [num_pages, 2, P, D]
    pt_ptr,  # [B, H, max_pages]
    lens_ptr,  # [B, H]
    runs_ptr,  # [num_programs, 5] int32: first head, its first tile and length, tiles [lo, hi)
    out_ptr,  # [B, Hq, D]
    mid_o_ptr,  # [2 * num_programs, G, D] fp32
    mid_lse_ptr,  # [2 * num_programs, G] fp32
    scale_log2,
    stride_qb,
    stride_qh,
    stride_pb,
    stride_ph,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_heads,  # B * H
    H: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Two dependent loads before the first key tile (the run, then the head's pages), as few as
    # the split kernel's: small calls are latency-bound.
    p = tl.program_id(0)
    head = tl.load(runs_ptr + p * 5)
    head_lo = tl.load(runs_ptr + p * 5 + 1)
    length = tl.load(runs_ptr + p * 5 + 2)
    run_lo = tl.load(runs_ptr + p * 5 + 3)
    run_hi = tl.load(runs_ptr + p * 5 + 4)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    t = run_lo
    while t < run_hi:
        b = head // H
        h = head % H
        head_hi = head_lo + tl.cdiv(length, BLOCK_N)
        if head_hi > t:  # else an empty head: nothing to do
            seg_hi = tl.minimum(run_hi, head_hi)
            lo = (t - head_lo) * BLOCK_N
            hi = tl.minimum((seg_hi - head_lo) * BLOCK_N, length)

            q_rows = b * stride_qb + (h * G + g) * stride_qh  # [BLOCK_G]
            pt = pt_ptr + b * stride_pb + h * stride_ph
            m, l_sum, acc = attend_token_range(
                q_ptr,
                q_rows,
                kv_ptr,
                pt,
                lo,
                hi,
                scale_log2,
                G,
                BLOCK_G,
                D,
                PAGE_SIZE,
                BLOCK_N,
                PRECISION,
                UPCAST,
            )

            out = acc / l_sum[:, None]  # every segment holds at least one token
            if (t == head_lo) & (seg_hi == head_hi):  # the whole head: final output
                o_rows = b * stride_ob + (h * G + g) * stride_oh
                o_ptrs = out_ptr + o_rows[:, None] + d[None, :]
                tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])
            else:  # the first piece of the run in slot 2p, the last in slot 2p + 1
                slot = 2 * p + (t != run_lo).to(tl.int32)
                tl.store(mid_o_ptr + ((slot * G + g) * D)[:, None] + d[None, :], out, mask=(g < G)[:, None])
                tl.store(mid_lse_ptr + slot * G + g, m + tl.log2(l_sum), mask=g < G)
            t = seg_hi
        head += 1
        head_lo = head_hi
        nb = head // H
        nh = head % H
        length = tl.load(lens_ptr + nb * stride_lb + nh * stride_lh, mask=head < num_heads, other=0).to(
            tl.int32
        )


@triton.jit(do_not_specialize=["num_heads", "num_programs", "min_tiles"])
def _decode_balanced_merge_kernel(
    ends_ptr,  # [B*H] int32
    mid_o_ptr,  # [2 * num_programs, G, D] fp32
    mid_lse_ptr,  # [2 * num_programs, G] fp32
    out_ptr,  # [B, Hq, D]
    stride_ob,
    stride_oh,
    num_heads,
    num_programs,
    min_tiles,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    qh = tl.program_id(0)  # (b, h, g) flat
    head = qh // G
    gi = qh % G
    b = head // H
    hq = (head % H) * G + gi
    d = tl.arange(0, D)
    o_ptrs = out_ptr + b * stride_ob + hq * stride_oh + d
    head_hi = tl.load(ends_ptr + head)
    head_lo = tl.load(ends_ptr + head - 1, mask=head > 0, other=0)
    total = tl.load(ends_ptr + num_heads - 1)
    per = tl.maximum(tl.cdiv(total, num_programs), tl.maximum(min_tiles, 1))
    if head_hi == head_lo:  # no tokens (a padding row): zeros
        tl.store(o_ptrs, tl.zeros([D], tl.float32).to(out_ptr.dtype.element_ty))
    else:
        p_lo = head_lo // per
        p_hi = (head_hi - 1) // per
        if p_hi > p_lo:  # else one program covered the whole head and wrote it
            # Two passes: the pieces' largest log-sum-exp, then their weighted sum; only [D]
            # accumulators live across blocks of pieces (a head may span every program).
            first_slot = 2 * p_lo + (head_lo != p_lo * per).to(tl.int32)
            top = tl.full([BLOCK_S], float("-inf"), tl.float32)
            for p0 in range(p_lo, p_hi + 1, BLOCK_S):
                ps = p0 + tl.arange(0, BLOCK_S)
                slot = tl.where(ps == p_lo, first_slot, 2 * ps)
                lse = tl.load(mid_lse_ptr + slot * G + gi, mask=ps <= p_hi, other=float("-inf"))
                top = tl.maximum(top, lse)
            m = tl.max(top, 0)  # finite: every piece holds a token
            w_sum = tl.zeros([BLOCK_S], tl.float32)
            acc = tl.zeros([D], tl.float32)
            for p0 in range(p_lo, p_hi + 1, BLOCK_S):
                ps = p0 + tl.arange(0, BLOCK_S)
                live = ps <= p_hi
                slot = tl.where(ps == p_lo, first_slot, 2 * ps)
                lse = tl.load(mid_lse_ptr + slot * G + gi, mask=live, other=float("-inf"))
                o = tl.load(
                    mid_o_ptr + ((slot * G + gi) * D)[:, None] + d[None, :], mask=live[:, None], other=0.0
                )
                w = tl.exp2(lse - m)  # [BLOCK_S], 0 past the last piece
                w_sum += w
                acc += tl.sum(w[:, None] * o, 0)
            out = acc / tl.sum(w_sum, 0)
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty))


def decode_attention_balanced(
    q: torch.Tensor,
    pool_kv: torch.Tensor,
    page_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    *,
    plan: DecodePlan | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], page_tables [B, H, max_pages], lens [B, H] -> [B, Hq, D] (see module doc).

    `plan` must come from plan_decode over these `lens` (built here when not given); `out` and
    `workspace` (fp32 [2 * num_programs, G, D] and [2 * num_programs, G]) may be preallocated.
    """
    page_size, head_dim = check_pool(pool_kv)
    b, hq, d = q.shape
    h = page_tables.shape[1]
    assert d == head_dim and hq % h == 0 and lens.shape == (b, h), (q.shape, page_tables.shape, lens.shape)
    assert q.stride(-1) == 1 and page_tables.stride(-1) == 1
    group = hq // h
    if plan is None:
        plan = plan_decode(lens, balanced_block_n(q.dtype))
    assert plan.tile_ends.shape == (b * h,) and plan.runs.shape == (plan.num_programs, 5)
    programs = plan.num_programs
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if workspace is None:
        workspace = (
            torch.empty(2 * programs, group, d, dtype=torch.float32, device=q.device),
            torch.empty(2 * programs, group, dtype=torch.float32, device=q.device),
        )
    mid_o, mid_lse = workspace
    assert mid_o.shape == (2 * programs, group, d) and mid_lse.shape == (2 * programs, group)
    _decode_balanced_kernel[(programs,)](
        q,
        pool_kv,
        page_tables,
        lens,
        plan.runs,
        out,
        mid_o,
        mid_lse,
        scale * LOG2E,
        *row_strides(q, page_tables, lens, out),
        b * h,
        H=h,
        **tile_constexprs(q, h, page_size, plan.block_n),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_balanced_merge_kernel[(b * hq,)](
        plan.tile_ends,
        mid_o,
        mid_lse,
        out,
        out.stride(0),
        out.stride(1),
        b * h,
        programs,
        plan.min_tiles,
        H=h,
        G=group,
        D=d,
        # A head spans about programs / heads programs (up to twice that for long heads): at
        # batch 1 about 50 pieces a head, read in one block.
        BLOCK_S=min(64, next_pow2(max(16, 2 * -(-programs // (b * h)) + 2))),
        num_warps=4,
    )
    return out
