"""Write new K/V rows into their pool slots (Triton).

Shapes: pool_kv [num_pages, 2, P, D]; pages, offsets [...] (page id and in-page offset of every
new token of every head); k, v [..., D] with the same leading shape. A negative page id marks a
padding row (CUDA-graph batches padded to a bucket size): nothing is written for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import check_pool


@triton.jit
def _store_kv_kernel(
    kv_ptr,  # [num_pages, 2, P, D]
    pages_ptr,  # [N]
    offsets_ptr,  # [N]
    k_ptr,  # [N, D]
    v_ptr,  # [N, D]
    num_rows,
    stride_k,
    stride_v,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    page = tl.load(pages_ptr + r, mask=r < num_rows, other=-1).to(tl.int64)
    ok = page >= 0  # rows past the end and padding rows (page -1) write nothing
    offset = tl.load(offsets_ptr + r, mask=ok, other=0).to(tl.int64)
    dst = page * (2 * PAGE_SIZE * D) + offset * D  # [BLOCK_R] K row of each slot
    k = tl.load(k_ptr + r.to(tl.int64)[:, None] * stride_k + d[None, :], mask=ok[:, None])
    v = tl.load(v_ptr + r.to(tl.int64)[:, None] * stride_v + d[None, :], mask=ok[:, None])
    tl.store(kv_ptr + dst[:, None] + d[None, :], k.to(kv_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(
        kv_ptr + PAGE_SIZE * D + dst[:, None] + d[None, :], v.to(kv_ptr.dtype.element_ty), mask=ok[:, None]
    )


def store_kv(
    pool_kv: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Same contract as engine.layers.paged_attention.store_kv."""
    page_size, head_dim = check_pool(pool_kv)
    assert pages.shape == offsets.shape == k.shape[:-1] == v.shape[:-1], (pages.shape, k.shape, v.shape)
    assert k.shape[-1] == head_dim
    # One element per row: a broadcast (stride-0) view would flatten to a view the kernel misreads.
    pages, offsets = pages.reshape(-1).contiguous(), offsets.reshape(-1).contiguous()
    k, v = k.reshape(-1, head_dim), v.reshape(-1, head_dim)  # copies only if the rows are not strided
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    num_rows = pages.numel()
    if num_rows == 0:
        return
    block_r = 16
    _store_kv_kernel[(triton.cdiv(num_rows, block_r),)](
        pool_kv,
        pages,
        offsets,
        k,
        v,
        num_rows,
        k.stride(0),
        v.stride(0),
        D=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_R=block_r,
        num_warps=4,
    )
