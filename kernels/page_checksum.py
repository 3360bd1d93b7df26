"""sum64 of KV pages where they live (Triton): the check a direct transfer ends with.

The reference is kvtransfer/device_util.py (`page_checksum`, `pool_checksum`): the sum over pages i of
(i + 1) * (the sum of page i's 32-bit words), mod 2^64. The reference gathers the pages (a copy of
every byte) and syncs once per chunk; this kernel reads each page once, straight from the pool at its
id, and the weighted terms are summed on the device with one sync at the end.

Shapes: words [num_pages, W] int32 (a page's bytes as 32-bit words); ids [N] page ids (int64), or
none: pages 0..N-1 in order. Output terms [N] int64: (i + 1) * sum of page ids[i]'s words (exact:
a page's word sum fits in 64 bits for any page under 2^32 words; the product wraps mod 2^64, as the
reference's does).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kvferry.kernels._common import next_pow2

_MASK64 = (1 << 64) - 1
MAX_BLOCK = 4096  # words one program loads at a time


@triton.jit
def _page_terms_kernel(
    words_ptr,  # [num_pages, W] int32
    ids_ptr,  # [N] int64 (unused without HAS_IDS)
    terms_ptr,  # [N] int64
    W: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    i = tl.program_id(0)
    if HAS_IDS:
        page = tl.load(ids_ptr + i).to(tl.int64)
    else:
        page = i.to(tl.int64)
    row = words_ptr + page * W
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, W, BLOCK):
        w = start + offs
        total += tl.load(row + w, mask=w < W, other=0).to(tl.int64)
    tl.store(terms_ptr + i, tl.sum(total, axis=0) * (i.to(tl.int64) + 1))


def page_words(kv: torch.Tensor) -> torch.Tensor:
    """Contiguous pages [num_pages, ...] as [num_pages, W] int32 words (a view, no copy)."""
    assert kv.is_contiguous(), "pages must be contiguous"
    flat = kv.flatten(1).view(torch.uint8)  # flatten, unlike reshape(n, -1), takes zero pages
    assert flat.shape[1] % 4 == 0, "a page must be a whole number of 32-bit words"
    return flat.view(torch.int32)


def page_checksum_terms(kv: torch.Tensor, page_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted page terms [N] int64 of pages `page_ids` of `kv` (all pages in order when None)."""
    words = page_words(kv)
    n = words.shape[0] if page_ids is None else page_ids.numel()
    terms = torch.empty(n, dtype=torch.int64, device=kv.device)
    if n == 0:
        return terms
    ids = terms if page_ids is None else page_ids.to(kv.device, torch.int64).contiguous()
    width = words.shape[1]
    # Triton launches on the current device: a transfer thread's may be another GPU than the pages'.
    with torch.cuda.device(kv.device) if kv.is_cuda else contextlib.nullcontext():
        _page_terms_kernel[(n,)](
            words, ids, terms, W=width, BLOCK=min(next_pow2(width), MAX_BLOCK), HAS_IDS=page_ids is not None
        )
    return terms


def page_checksum(kv: torch.Tensor, page_ids: torch.Tensor | None = None) -> int:
    """sum64 of pages `page_ids` of `kv` in that order (all pages when None): one host sync."""
    terms = page_checksum_terms(kv, page_ids)
    return int(terms.sum()) & _MASK64 if terms.numel() else 0
