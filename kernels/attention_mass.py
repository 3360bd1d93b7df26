"""Non-causal attention mass inside token blocks (Triton).

The reference is engine/compression/attention_scores.py (`block_attention_mass`). One program takes
one (block, kv-head): it loads the block's keys once, and for each query head of the GQA group
computes softmax(Q Kᵀ · scale) over the block (no causal mask) and adds its column sums. A block
fits one tile (at most MAX_BLOCK tokens), so every row's softmax is complete in registers.

Shapes: q [T, Hq, D], k [T, H, D] (post-RoPE; any token/head strides); bounds [NB + 1] block
edges (prompt positions, token 0 of q/k at `offset`); out [H, T] fp32 (any head stride; may be a
view into a larger [H, n] buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import LOG2E, input_precision, next_pow2, upcast_dots

MAX_BLOCK = 128  # a block's scores [b, b] stay in registers


@triton.jit(do_not_specialize=["offset", "stride_oh"])  # a chunk's start, the prompt's length
def _attention_mass_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    out_ptr,  # [H, T] fp32
    offset,  # prompt position of token 0 of the inputs
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    QSPLIT: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)  # which 1/QSPLIT of the block's queries
    lo = tl.load(bounds_ptr + blk) - offset
    hi = tl.load(bounds_ptr + blk + 1) - offset
    i = tl.arange(0, BLOCK_B)
    d = tl.arange(0, D)
    tok = lo + i
    ok = tok < hi
    rows = tok.to(tl.int64)
    k = tl.load(k_ptr + rows[:, None] * stride_kt + h * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    BLOCK_Q: tl.constexpr = BLOCK_B // QSPLIT
    q_tok = lo + part * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q_tok < hi
    mass = tl.zeros([BLOCK_B], tl.float32)
    for g in range(G):
        q_rows = q_tok.to(tl.int64)[:, None] * stride_qt + (h * G + g) * stride_qh
        q = tl.load(q_ptr + q_rows + d[None, :], mask=q_ok[:, None], other=0.0)  # [BLOCK_Q, D]
        if UPCAST:
            q = q.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [queries, keys]
        s = tl.where(ok[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        mass += tl.sum(tl.where(q_ok[:, None], p, 0.0), 0)
    if QSPLIT == 1:
        tl.store(out_ptr + h * stride_oh + tok, mass, mask=ok)
    else:  # two addends into zeros: the same sum in either order
        tl.atomic_add(out_ptr + h * stride_oh + tok, mass, mask=ok, sem="relaxed")


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    bounds: torch.Tensor,
    max_block: int,
    scale: float,
    out: torch.Tensor,
    offset: int = 0,
    num_warps: int | None = None,
    query_split: int = 1,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k [T, H, D] of prompt positions offset..offset+T-1; bounds [NB + 1] block
    edges (int32 prompt positions, on q's device, within that range; no block longer than
    `max_block` <= MAX_BLOCK); out [H, T] fp32 -> out: each token's attention mass in its block.

    query_split 2: two programs per (block, kv head), each on half the block's queries, add their
    column sums into out, which must hold zeros (two addends give the same sum in either order, so
    the result is still deterministic)."""
    assert query_split in (1, 2), query_split
    t_len, hq, d = q.shape
    h = k.shape[1]
    assert k.shape == (t_len, h, d) and hq % h == 0 and out.shape == (h, t_len), (q.shape, k.shape, out.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and out.stride(-1) == 1
    assert d == next_pow2(d) and d >= 16, f"head_dim {d}: a power of 2 >= 16"
    assert max_block <= MAX_BLOCK, f"blocks of {max_block} tokens: at most {MAX_BLOCK} fit one tile"
    num_blocks = bounds.numel() - 1
    if num_blocks <= 0:
        return out
    block_b = max(16, next_pow2(max_block))
    extra = {} if num_stages is None else dict(num_stages=num_stages)
    _attention_mass_kernel[(num_blocks, h, query_split)](
        q,
        k,
        bounds,
        out,
        offset,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        out.stride(0),
        G=hq // h,
        D=d,
        BLOCK_B=block_b,
        PRECISION=input_precision(q),
        UPCAST=upcast_dots(q),
        QSPLIT=query_split,
        num_warps=num_warps or (8 if block_b >= 128 else 4),
        **extra,
    )
    return out
