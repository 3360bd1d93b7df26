"""Chunked prefill through a dense attention library: the prefix pages gathered, two dense calls, a merge.

A chunk of T tokens at positions start.. attends to the sequence's first `start` tokens (in pages)
with no mask, and to itself causally. Both parts are plain dense attention, so each runs on the
fastest dense kernel torch has (cuDNN on CUDA; the CPU flash kernel here, which lets tests run the
same code), each returning its log-sum-exp, and a Triton kernel merges the two by log-sum-exp. The
prefix is gathered from its pages into contiguous K/V first (one read and one write of the prefix,
a few percent of the attention's time from 8K tokens on), in segments of at most `max_keys` keys so
the scratch stays bounded for very long contexts.

cuDNN builds an execution plan for each new shape (about 60 ms each on an H100), so the shapes are
kept few: the chunk is padded to a multiple of `T_BUCKET` rows (padded queries are dropped, padded
keys sit after every real query and the causal mask hides them), and the prefix is cut into
`SEGMENT_KEYS` segments plus a remainder. `dense_prefill_applies` says which chunks take this path:
with 2048-token chunks (the engine's CUDA default) a model needs at most 8 x 9 plans, each built once.

Shapes: q [T, Hq, D]; k_new, v_new [T, H, D] (the chunk's own keys/values, already RoPE'd);
pool_kv [num_pages, 2, P, D]; table [H, max_pages]; out [T, Hq, D].
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import check_pool, next_pow2

log = logging.getLogger(__name__)

SEGMENT_KEYS = 16384  # prefix keys gathered per dense call (scratch: 2 * H * SEGMENT_KEYS * D elements)
T_BUCKET = 256  # chunk rows are padded to a multiple of this
MIN_TOKENS = 256  # shorter chunks run the Triton kernel (little work; no plan per length)
PREFIX_ALIGN = 1024  # prefixes that are a multiple of this (so few remainder shapes)


# a chunk's token count and the log-sum-exp rows' strides follow the prompt (the outputs' head
# strides, T x D, stay multiples of 16 and keep the hint their vector loads use)
@triton.jit(do_not_specialize=["num_t", "stride_lah", "stride_lbh", "stride_lseh"])
def _merge_kernel(
    oa_ptr,  # [Hq, T, D] (any strides)
    la_ptr,  # [Hq, T] fp32, natural log
    ob_ptr,
    lb_ptr,
    out_ptr,  # [T, Hq, D]
    lse_ptr,  # [Hq, T] fp32 (WRITE_LSE)
    num_t,
    stride_oah,
    stride_oat,
    stride_lah,
    stride_lat,
    stride_obh,
    stride_obt,
    stride_lbh,
    stride_lbt,
    stride_outt,
    stride_outh,
    stride_lseh,
    stride_lset,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    ok = t < num_t
    la = tl.load(la_ptr + h * stride_lah + t * stride_lat, mask=ok, other=0.0)
    lb = tl.load(lb_ptr + h * stride_lbh + t * stride_lbt, mask=ok, other=0.0)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: weights 0, output 0
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    oa = tl.load(oa_ptr + h * stride_oah + t[:, None] * stride_oat + d[None, :], mask=ok[:, None], other=0.0)
    ob = tl.load(ob_ptr + h * stride_obh + t[:, None] * stride_obt + d[None, :], mask=ok[:, None], other=0.0)
    o = (oa.to(tl.float32) * wa[:, None] + ob.to(tl.float32) * wb[:, None]) / tl.where(total > 0, total, 1.0)[
        :, None
    ]
    tl.store(
        out_ptr + t[:, None] * stride_outt + h * stride_outh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=ok[:, None],
    )
    if WRITE_LSE:
        tl.store(lse_ptr + h * stride_lseh + t * stride_lset, m + tl.log(total), mask=ok)


def merge_attention_states(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor,
    lse_out: torch.Tensor | None = None,
) -> None:
    """Attention over the union of two key sets from each set's output and log-sum-exp.

    o_a, o_b [Hq, T, D] and lse_a, lse_b [Hq, T] (natural log, fp32) with any strides; writes
    out [T, Hq, D] and, if given, lse_out [Hq, T]. out may alias o_a or o_b only when its element
    addresses equal theirs (each program reads its rows before writing them)."""
    hq, num_t, d = o_a.shape
    assert o_b.shape == o_a.shape and out.shape == (num_t, hq, d) and d == next_pow2(d)
    assert lse_a.shape == lse_b.shape == (hq, num_t)
    assert o_a.stride(-1) == o_b.stride(-1) == out.stride(-1) == 1
    if num_t == 0:
        return
    block_t = 32
    lse_w = lse_out if lse_out is not None else lse_a
    _merge_kernel[(triton.cdiv(num_t, block_t), hq)](
        o_a,
        lse_a,
        o_b,
        lse_b,
        out,
        lse_w,
        num_t,
        o_a.stride(0),
        o_a.stride(1),
        lse_a.stride(0),
        lse_a.stride(1),
        o_b.stride(0),
        o_b.stride(1),
        lse_b.stride(0),
        lse_b.stride(1),
        out.stride(0),
        out.stride(1),
        lse_w.stride(0),
        lse_w.stride(1),
        D=d,
        BLOCK_T=block_t,
        WRITE_LSE=lse_out is not None,
        num_warps=4,
    )


def dense_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, T, D], k/v [1, H, S, D] (H divides Hq) -> out [1, Hq, T, D], lse [1, Hq, T] (natural
    log, fp32). causal: T == S, query i sees keys 0..i. cuDNN on CUDA, the flash kernel on CPU."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    lse = res[1]
    if lse.dim() == 4:  # cuDNN's is [B, Hq, T, 1]
        lse = lse[..., 0]
    return res[0], lse


def gather_prefix(
    pool_kv: torch.Tensor, table: torch.Tensor, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values lo..hi-1 of every head, contiguous: table [H, max_pages] -> k, v [1, H, hi - lo, D].

    lo must be a multiple of the page size."""
    page_size = pool_kv.shape[2]
    assert lo % page_size == 0 and hi > lo
    pages = table[:, lo // page_size : -(-hi // page_size)].long()  # [H, n]
    k = pool_kv[:, 0][pages]  # [H, n, P, D]: one gather each, a free view after
    v = pool_kv[:, 1][pages]
    h, n, p, d = k.shape
    return k.view(1, h, n * p, d)[:, :, : hi - lo], v.view(1, h, n * p, d)[:, :, : hi - lo]


def prefill_attention_dense(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pool_kv: torch.Tensor,
    table: torch.Tensor,
    start: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    segment_keys: int = SEGMENT_KEYS,
    t_bucket: int = T_BUCKET,
) -> torch.Tensor:
    """One sequence's chunk: q [T, Hq, D] over its `start` cached tokens (table [H, max_pages]) and
    its own k_new/v_new [T, H, D] causally -> [T, Hq, D] (see module doc)."""
    page_size, _ = check_pool(pool_kv)
    num_t = q.shape[0]
    if num_t == 0:
        return torch.empty_like(q) if out is None else out
    padded = -(-num_t // t_bucket) * t_bucket
    if padded != num_t:  # zero rows after the chunk: their outputs are dropped, their keys unseen
        q, k_new, v_new = (
            torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - num_t)) for x in (q, k_new, v_new)
        )
    qd = q.transpose(0, 1)[None]  # [1, Hq, T', D] views, no copies
    o, lse = dense_attention_lse(qd, k_new.transpose(0, 1)[None], v_new.transpose(0, 1)[None], True, scale)
    if start == 0:  # a fresh prompt's first chunk: one dense causal call
        o = o[0, :, :num_t].transpose(0, 1)  # [T, Hq, D]: cuDNN writes it in the query's layout
        return o if out is None else out.copy_(o)
    if out is None:
        out = torch.empty_like(q[:num_t])
    step = max(page_size, segment_keys // page_size * page_size)
    o, lse = o[:, :, :num_t], lse[0, :, :num_t]  # [1, Hq, T, D], [Hq, T]
    for lo in range(0, start, step):
        hi = min(start, lo + step)
        k, v = gather_prefix(pool_kv, table, lo, hi)
        o_p, lse_p = dense_attention_lse(qd, k, v, False, scale)
        last = hi == start
        lse_next = None if last else torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
        merge_attention_states(o[0], lse, o_p[0, :, :num_t], lse_p[0, :, :num_t], out, lse_next)
        if not last:  # carry the merged state into the next segment
            o, lse = out.transpose(0, 1)[None], lse_next
    return out


def dense_prefill_applies(q: torch.Tensor, start: int) -> bool:
    """Whether a chunk q [T, Hq, D] at `start` takes the dense path on its device (see module doc)."""
    return dense_prefill_applies_to(q.shape[0], start, q.device, q.dtype, q.shape[-1])


def dense_prefill_applies_to(
    num_tokens: int, start: int, device: torch.device, dtype: torch.dtype, head_dim: int
) -> bool:
    """dense_prefill_applies for a chunk known by its sizes (decided once per chunk, not per layer)."""
    return (
        num_tokens >= MIN_TOKENS
        and start % PREFIX_ALIGN == 0
        and dense_prefill_supported(device.type, device.index, dtype, head_dim)
    )


@functools.cache
def dense_prefill_supported(
    device_type: str, device_index: int | None, dtype: torch.dtype, head_dim: int
) -> bool:
    """Whether this device runs the dense path (cuDNN accepts the shapes): probed once per
    (device, dtype, head_dim) on a small GQA problem."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    device = torch.device(device_type, device_index)
    try:
        q = torch.randn(1, 4, 64, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
        o, lse = dense_attention_lse(q, k, k, True, head_dim**-0.5)
        if o.shape != q.shape or lse.shape != (1, 4, 64) or not bool(torch.isfinite(lse).all()):
            log.warning(f"dense prefill off: cuDNN gave output {tuple(o.shape)}, lse {tuple(lse.shape)}")
            return False
        return True
    except RuntimeError as e:
        log.warning(f"dense prefill off: cuDNN attention failed: {str(e).splitlines()[0][:200]}")
        return False
