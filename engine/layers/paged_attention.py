"""Pure-PyTorch paged attention over the per-head page layout.

These run the engine on CPU and are the references the Triton kernels are tested against.
Shapes: pool_kv [num_pages, 2, P, D]; page tables hold page ids, -1 where unallocated.
"""

from __future__ import annotations

import torch


def store_kv(
    pool_kv: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write k, v [..., D] into pool slots (pages[...], offsets[...]), same leading shape.

    A negative page marks a padding row (a CUDA-graph batch padded to its bucket): nothing is written."""
    real = pages >= 0
    if not bool(real.all()):
        pages, offsets, k, v = pages[real], offsets[real], k[real], v[real]
    pool_kv[pages, 0, offsets] = k.to(pool_kv.dtype)
    pool_kv[pages, 1, offsets] = v.to(pool_kv.dtype)


def gather_heads(
    pool_kv: torch.Tensor, page_table: torch.Tensor, num_pages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of the first `num_pages` pages of each head: page_table [..., max_pages] -> [..., num_pages*P, D]."""
    pages = page_table[..., :num_pages].clamp(min=0).long()
    kv = pool_kv[pages]  # [..., n, 2, P, D]
    lead = kv.shape[:-4]
    k = kv[..., 0, :, :].reshape(*lead, -1, kv.shape[-1])
    v = kv[..., 1, :, :].reshape(*lead, -1, kv.shape[-1])
    return k, v


def prefill_attention(
    q: torch.Tensor, pool_kv: torch.Tensor, page_table: torch.Tensor, start: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of a chunk over a sequence's cached prefix plus itself.

    q [T, Hq, D]; page_table [H, max_pages] already holds the chunk's K/V after each head's prefix.
    `start`: the tokens every head holds before the chunk (the chunk's first position), or per-head
    prefix lengths [H] (a compressed, head-sparse cached context: head h keeps start[h] tokens of it,
    then the chunk). Chunk token t sees its head's whole prefix and chunk tokens 0..t. Returns [T, Hq, D].
    """
    t, hq, d = q.shape
    h = page_table.shape[0]
    prefix = torch.as_tensor(start).to(torch.int64).cpu().expand(h)  # [H]
    total = int(prefix.max()) + t
    page_size = pool_kv.shape[2]
    k, v = gather_heads(pool_kv, page_table, -(-total // page_size))
    k, v = k[:, :total].float(), v[:, :total].float()  # [H, L, D]; past a head's prefix + t: masked
    qg = q.float().view(t, h, hq // h, d).permute(1, 2, 0, 3)  # [H, G, T, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)[:, None]) * scale  # [H, G, T, L]
    visible = torch.arange(total)[None, None, :] <= (prefix[:, None] + torch.arange(t)[None, :])[..., None]
    scores = scores.masked_fill(~visible[:, None].to(scores.device), float("-inf"))  # [H, 1, T, L] mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v[:, None])  # [H, G, T, D]
    return out.permute(2, 0, 1, 3).reshape(t, hq, d).to(q.dtype)


def decode_attention(
    q: torch.Tensor, pool_kv: torch.Tensor, page_tables: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence over head-sparse caches.

    q [B, Hq, D]; page_tables [B, H, max_pages]; lens [B, H] tokens kept by each head (each head
    has its own length). Returns [B, Hq, D].
    """
    b, hq, d = q.shape
    h = page_tables.shape[1]
    page_size = pool_kv.shape[2]
    max_len = int(lens.max())
    k, v = gather_heads(pool_kv, page_tables, -(-max_len // page_size))  # [B, H, L, D]
    k, v = k.float(), v.float()
    qg = q.float().view(b, h, hq // h, d)  # [B, H, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, H, G, L]
    valid = torch.arange(k.shape[2], device=lens.device)[None, None, :] < lens[..., None]  # [B, H, L]
    scores = scores.masked_fill(~valid[:, :, None, :].to(scores.device), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, G, D]
    return out.reshape(b, hq, d).to(q.dtype)
