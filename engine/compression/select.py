"""Select-and-pack: scores -> per-head kept tokens -> page-aligned packed layout. `pack_kept` is the
PyTorch reference of the Triton kernel kernels/pack_kept.py, which compaction uses on CUDA.

After packing, head (l, h) holds its kept tokens densely in the first ceil(kept/page_size) pages
of its chain (kept positions ascending; keys are post-RoPE, so order does not matter to attention,
but ascending order makes a head that keeps everything an exact no-op).
"""

from __future__ import annotations

import torch

from kvferry.engine.compression.budget import keep_mask, uniform_share
from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.protection import protected_mask
from kvferry.engine.compression.spans import shape_scores
from kvferry.engine.page_table import SequenceKV
from kvferry.engine.uploads import upload


def select_tokens(
    scores: torch.Tensor, params: CompressionParams, round_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [L, H, n] -> kept positions [L, H, K] (ascending, -1 padded; on the scores' device) and
    kept_lens [L, H] (int64, on the host).

    A uniform budget keeps the same number of tokens in every head, known on the host: its positions
    come from one top-k and a sort of the kept ones, and the host never waits for the GPU.
    `round_to` (the page size, for a cached context) raises each head's count to a multiple of it,
    at most n, with its next-best tokens: they fill the head's last page, which is allocated anyway,
    so no head ends in a partly filled page that a sequence could later write into."""
    n = scores.shape[-1]
    scores = shape_scores(scores, params)
    protected = protected_mask(n, params.sink, params.recent, params.protected_spans)  # on the host
    on_device = upload(protected, scores.device)
    if params.budget == "uniform":
        share = max(uniform_share(n, params.retention), int(protected.sum()))
        share = min(n, -(-share // round_to) * round_to)
        s = scores.float().masked_fill(on_device, float("inf"))
        kept = torch.topk(s, share, dim=-1, sorted=False).indices.sort(dim=-1).values
        return kept, torch.full(scores.shape[:2], share, dtype=torch.int64)
    mask = keep_mask(scores, on_device, params)
    if round_to > 1:
        mask = round_up_kept(mask, scores, round_to)
    kept, lens = mask_to_indices(mask)
    return kept, lens.cpu()


def round_up_kept(mask: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """Bool [L, H, n]: each head's kept set grown with its best dropped tokens to a multiple of
    `multiple` tokens (at most n)."""
    n = mask.shape[-1]
    target = torch.clamp(-(-mask.sum(dim=-1) // multiple) * multiple, max=n)  # [L, H]
    order = scores.float().masked_fill(mask, float("inf")).argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=mask.device).expand_as(order))
    return rank < target[..., None]


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [L, H, n] -> positions [L, H, K] ascending with -1 padding, counts [L, H]."""
    n = mask.shape[-1]
    lens = mask.sum(dim=-1)
    position = torch.arange(n, device=mask.device)
    order = torch.where(mask, position, position + n).sort(dim=-1).values  # kept first, ascending
    width = int(lens.max()) if lens.numel() else 0
    kept = order[..., :width]
    kept = kept.masked_fill(torch.arange(width, device=mask.device) >= lens[..., None], -1)
    return kept, lens


def pack_kept(
    pool_kv: torch.Tensor,
    src_table: torch.Tensor,
    kept: torch.Tensor,
    kept_lens: torch.Tensor,
    dst_table: torch.Tensor,
) -> None:
    """Copy each head's kept tokens densely into the first pages of `dst_table`.

    pool_kv [num_pages, 2, P, D]; src_table, dst_table [L, H, max_pages] page ids; kept [L, H, K]
    token positions in the source head; kept_lens [L, H]. Source and destination may share pages
    (in-place compaction): every kept token is read before any is written.
    """
    page_size = pool_kv.shape[2]
    device = pool_kv.device
    slot = torch.arange(kept.shape[-1])
    valid = slot < kept_lens[..., None].cpu()  # [L, H, K]
    layer, head, j = valid.nonzero(as_tuple=True)
    src = kept.cpu()[valid]
    src_page = src_table[layer, head, src // page_size].long().to(device)
    dst_page = dst_table[layer, head, j // page_size].long().to(device)
    assert bool((src_page >= 0).all()) and bool((dst_page >= 0).all()), "a kept token maps to no page"
    values = pool_kv[src_page, :, (src % page_size).to(device)]  # [N, 2, D]
    pool_kv[dst_page, :, (j % page_size).to(device)] = values


def compact_in_place(seq_kv: SequenceKV, kept: torch.Tensor, kept_lens: torch.Tensor) -> None:
    """Pack kept tokens into each head's first pages and free the pages no head needs any more."""
    kept_lens = kept_lens.cpu().to(torch.int64)  # already on the host from select_tokens: no wait
    pages_kept = seq_kv.pages_per_head(kept_lens)  # [L, H]
    table = seq_kv.page_table.clone()
    first = int(pages_kept.min())
    if first == int(pages_kept.max()):  # every head keeps as many pages (a uniform budget): slices
        tail = table[:, :, first:]
        dropped = tail[tail >= 0]
        tail.fill_(-1)
    else:
        cut = torch.arange(seq_kv.max_pages)[None, None, :] >= pages_kept[..., None]  # [L, H, max_pages]
        dropped = table[cut]
        dropped = dropped[dropped >= 0]
        table[cut] = -1
    pool_kv = seq_kv.pool.kv
    if pool_kv.is_cuda:  # the Triton kernel: no host round trip, each head packed in place
        from kvferry import kernels

        device = pool_kv.device
        kernels.pack_kept(
            pool_kv, upload(seq_kv.page_table, device), kept.to(device), upload(kept_lens, device),
            upload(table, device),
        )  # fmt: skip
    else:
        pack_kept(pool_kv, seq_kv.page_table, kept, kept_lens, table)
    seq_kv.set_heads(kept_lens, table, dropped)


def compress_kv(
    seq_kv: SequenceKV, scores: torch.Tensor, params: CompressionParams, round_to: int = 1
) -> None:
    """Select with `params` and compact the sequence's cache in place; a no-op if every head keeps all.
    `round_to`: see select_tokens."""
    kept, kept_lens = select_tokens(scores, params, round_to)
    if bool((kept_lens == seq_kv.head_lens).all()):
        return
    compact_in_place(seq_kv, kept, kept_lens)
