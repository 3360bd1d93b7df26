"""Select-and-pack, the pack half (Triton): each head's kept tokens, densely and in order, into
page-aligned destination pages; and the page scatter a receiver uses to place shipped pages.

The reference is engine/compression/select.py (`pack_kept`). One program walks one (layer, head):
kept token j of the head (its position kept[j] in the source chain) goes to slot j % P of
destination page dst_table[j // P]. The destination may be the source pool itself (in-place
compaction into the first pages of the same chain): kept positions ascend, so slot j is never
behind position kept[j], and a barrier between each tile's loads and its stores means no slot is
overwritten before every read of it in the tile is done (later tiles read only positions past it).

Shapes: src / dst [num_pages, 2, P, D] (K at 0, V at 1); src_table [L, H, max_pages],
dst_table [L, H, max_dst_pages] page ids (int32/int64); kept [L, H, K] ascending positions
(padding past kept_lens ignored); kept_lens [L, H].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import check_pool


# strides of tables and kept lists follow the prompt's length
@triton.jit(do_not_specialize=["stride_sl", "stride_sh", "stride_dl", "stride_dh", "stride_kl", "stride_kh"])
def _pack_kept_kernel(
    src_ptr,  # [num_pages, 2, P, D]
    dst_ptr,  # [num_dst_pages, 2, P, D]
    src_table_ptr,  # [L, H, max_pages]
    dst_table_ptr,  # [L, H, max_dst_pages]
    kept_ptr,  # [L, H, K]
    lens_ptr,  # [L, H]
    stride_sl,
    stride_sh,
    stride_dl,
    stride_dh,
    stride_kl,
    stride_kh,
    stride_ll,
    stride_lh,
    H: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    layer = tl.program_id(0) // H
    head = tl.program_id(0) % H
    n = tl.load(lens_ptr + layer * stride_ll + head * stride_lh).to(tl.int32)
    j = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    kept = kept_ptr + layer * stride_kl + head * stride_kh
    src_table = src_table_ptr + layer * stride_sl + head * stride_sh
    dst_table = dst_table_ptr + layer * stride_dl + head * stride_dh
    for s in range(0, n, BLOCK_T):
        slot = s + j
        ok = slot < n
        pos = tl.load(kept + slot, mask=ok, other=0).to(tl.int64)
        src_page = tl.load(src_table + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        src_row = src_page * (2 * PAGE_SIZE * D) + (pos % PAGE_SIZE) * D  # [BLOCK_T] K row
        k = tl.load(src_ptr + src_row[:, None] + d[None, :], mask=ok[:, None])
        v = tl.load(src_ptr + PAGE_SIZE * D + src_row[:, None] + d[None, :], mask=ok[:, None])
        dst_page = tl.load(dst_table + slot // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        dst_row = dst_page * (2 * PAGE_SIZE * D) + (slot % PAGE_SIZE).to(tl.int64) * D
        if IN_PLACE:
            tl.debug_barrier()  # every read of this tile happens before any of its writes
        tl.store(dst_ptr + dst_row[:, None] + d[None, :], k, mask=ok[:, None])
        tl.store(dst_ptr + PAGE_SIZE * D + dst_row[:, None] + d[None, :], v, mask=ok[:, None])


def pack_kept(
    pool_kv: torch.Tensor,
    src_table: torch.Tensor,
    kept: torch.Tensor,
    kept_lens: torch.Tensor,
    dst_table: torch.Tensor,
    dst_kv: torch.Tensor | None = None,
    block_t: int = 64,
) -> torch.Tensor:
    """Same contract as engine.compression.select.pack_kept (dst_kv None: into pool_kv, in place);
    with `dst_kv` [N, 2, P, D] the kept tokens go to that buffer's pages instead. Returns dst."""
    page_size, head_dim = check_pool(pool_kv)
    dst = pool_kv if dst_kv is None else dst_kv
    assert dst.shape[1:] == pool_kv.shape[1:] and dst.dtype == pool_kv.dtype and dst.is_contiguous()
    layers, heads = kept_lens.shape
    assert src_table.shape[:2] == dst_table.shape[:2] == kept.shape[:2] == (layers, heads)
    assert src_table.stride(-1) == 1 and dst_table.stride(-1) == 1 and kept.stride(-1) == 1
    on = {t.device for t in (pool_kv, dst, src_table, dst_table, kept, kept_lens)}
    assert len(on) == 1, f"pack_kept's tensors must share one device, got {on}"
    if layers * heads == 0 or kept.shape[-1] == 0:
        return dst
    _pack_kept_kernel[(layers * heads,)](
        pool_kv,
        dst,
        src_table,
        dst_table,
        kept,
        kept_lens,
        src_table.stride(0),
        src_table.stride(1),
        dst_table.stride(0),
        dst_table.stride(1),
        kept.stride(0),
        kept.stride(1),
        kept_lens.stride(0),
        kept_lens.stride(1),
        H=heads,
        D=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_T=block_t,
        IN_PLACE=dst.data_ptr() == pool_kv.data_ptr(),
        num_warps=4,
        num_stages=1,  # no loads hoisted across the barrier
    )
    return dst


@triton.jit
def _scatter_pages_kernel(
    pool_ptr,  # [num_pages, 2 * P * D] viewed flat per page
    ids_ptr,  # [N]
    pages_ptr,  # [N, 2 * P * D]
    PAGE_ELEMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    part = tl.program_id(1)
    e = part * BLOCK + tl.arange(0, BLOCK)
    ok = e < PAGE_ELEMS
    page = tl.load(ids_ptr + i).to(tl.int64)
    x = tl.load(pages_ptr + i.to(tl.int64) * PAGE_ELEMS + e, mask=ok)
    tl.store(pool_ptr + page * PAGE_ELEMS + e, x, mask=ok)


def scatter_pages(pool_kv: torch.Tensor, page_ids: torch.Tensor, pages: torch.Tensor) -> None:
    """pool_kv[page_ids[i]] = pages[i] for packed pages [N, 2, P, D] arriving in travel order
    (the receiving side of a handoff); page ids distinct."""
    check_pool(pool_kv)
    assert pages.shape[1:] == pool_kv.shape[1:] and pages.dtype == pool_kv.dtype and pages.is_contiguous()
    assert page_ids.shape == (pages.shape[0],)
    if pages.shape[0] == 0:
        return
    page_elems = pages[0].numel()
    block = min(4096, triton.next_power_of_2(page_elems))
    _scatter_pages_kernel[(pages.shape[0], triton.cdiv(page_elems, block))](
        pool_kv, page_ids, pages, PAGE_ELEMS=page_elems, BLOCK=block, num_warps=4
    )
