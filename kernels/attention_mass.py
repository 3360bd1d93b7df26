"""Non-causal attention mass inside token blocks (Triton).

The reference is engine/compression/attention_scores.py (`block_attention_mass`). One program takes
one (block, query head): it computes softmax(Q Kᵀ · scale) over the block (no causal mask) and its
column sums. A block fits one tile (at most MAX_BLOCK tokens), so every row's softmax is complete in
registers. The G query heads of a kv head write their sums to a scratch row each; the last of them
to finish (an atomic ticket) adds the G rows in head order and writes the kv head's mass, so the
result does not depend on which program ran first.

One program per (block, kv head) looping over its G query heads was the first version: 128 programs
for a 2048-token chunk of the Llama-3.1-8B shape, one wave of an H100 with every program waiting on
its own loads (18 µs, about 2.5x what the chunk's bytes need); `split_groups=False` still runs it.

Shapes: q [T, Hq, D], k [T, H, D] (post-RoPE; any token/head strides); bounds [NB + 1] block
edges (prompt positions, token 0 of q/k at `offset`); out [H, T] fp32 (any head stride; may be a
view into a larger [H, n] buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import LOG2E, input_precision, next_pow2, upcast_dots

MAX_BLOCK = 128  # a block's scores [b, b] stay in registers


@triton.jit
def _attention_mass_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, H, D]
    bounds_ptr,  # [NB + 1] int32, prompt positions
    out_ptr,  # [H, T] fp32
    part_ptr,  # SPLIT: [NB, H, G, BLOCK_B] fp32, each query head's column sums
    ticket_ptr,  # SPLIT: [NB, H] int32, zero before the launch and again after it
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
    SPLIT: tl.constexpr,  # one program per query head (grid axis 2), else per kv head
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
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
    mass = tl.zeros([BLOCK_B], tl.float32)
    if SPLIT:
        g = tl.program_id(2)
        bh = blk * tl.num_programs(1) + h
        part = part_ptr + bh * G * BLOCK_B
        tl.store(part + g * BLOCK_B + i, _head_mass(q_ptr, k, rows, ok, d, h * G + g, stride_qt, stride_qh,
                                                    scale_log2, PRECISION, UPCAST))  # fmt: skip
        # All threads' stores, then one acq_rel atomic at gpu scope (as leverage's sketch2 tickets):
        # the program that draws the last ticket sees every head's row.
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + bh, 1) == G - 1:
            tl.atomic_xchg(ticket_ptr + bh, 0)  # ready for the next launch
            for gg in range(G):  # head order, as the loop below: the same sums however programs ran
                mass += tl.load(part + gg * BLOCK_B + i, cache_modifier=".cg")
            tl.store(out_ptr + h * stride_oh + tok, mass, mask=ok)
    else:
        for g in range(G):
            mass += _head_mass(
                q_ptr, k, rows, ok, d, h * G + g, stride_qt, stride_qh, scale_log2, PRECISION, UPCAST
            )
        tl.store(out_ptr + h * stride_oh + tok, mass, mask=ok)


@triton.jit
def _head_mass(q_ptr, k, rows, ok, d, qh, stride_qt, stride_qh, scale_log2, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """Column sums of softmax(Q Kᵀ) of query head qh over the block: [BLOCK_B], 0 past its end."""
    q = tl.load(q_ptr + rows[:, None] * stride_qt + qh * stride_qh + d[None, :], mask=ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [queries, keys]
    s = tl.where(ok[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    return tl.sum(tl.where(ok[:, None], p, 0.0), 0)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    bounds: torch.Tensor,
    max_block: int,
    scale: float,
    out: torch.Tensor,
    offset: int = 0,
    num_warps: int | None = None,
    split_groups: bool = True,
    workspace: MassWorkspace | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k [T, H, D] of prompt positions offset..offset+T-1; bounds [NB + 1] block
    edges (int32 prompt positions, on q's device, within that range; no block longer than
    `max_block` <= MAX_BLOCK); out [H, T] fp32 -> out: each token's attention mass in its block.

    split_groups: one program per query head (the module doc); workspace: its scratch, reused by a
    caller that launches on one stream (a fresh one per call if None)."""
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
    g = hq // h
    split = split_groups and g > 1
    if split:
        part, tickets = (workspace or MassWorkspace()).get(num_blocks * h, g * block_b, q.device)
    else:
        part = tickets = out  # unread
    _attention_mass_kernel[(num_blocks, h, g if split else 1)](
        q,
        k,
        bounds,
        out,
        part,
        tickets,
        offset,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        out.stride(0),
        G=g,
        D=d,
        BLOCK_B=block_b,
        PRECISION=input_precision(q),
        UPCAST=upcast_dots(q),
        SPLIT=split,
        num_warps=num_warps or (8 if block_b >= 128 else 4),
    )
    return out


class MassWorkspace:
    """Scratch of the split launch, grown on demand: per (block, kv head) its query heads' column
    sums and a ticket counter (zeroed once; each launch leaves it at zero)."""

    def __init__(self) -> None:
        self.part: torch.Tensor | None = None
        self.tickets: torch.Tensor | None = None

    def get(self, blocks_heads: int, row: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.part is None or self.part.numel() < blocks_heads * row or self.part.device != device:
            self.part = torch.empty(blocks_heads * row, dtype=torch.float32, device=device)
        if self.tickets is None or self.tickets.numel() < blocks_heads or self.tickets.device != device:
            self.tickets = torch.zeros(blocks_heads, dtype=torch.int32, device=device)
        return self.part, self.tickets
