"""What one model forward pass works on: a prefill chunk of one sequence, or a decode batch.

Attention layers call `batch.attend(layer, q, k, v, k_pre_rope)`; the batch stores the new K/V
into the sequence pages and runs paged attention. `PaddedDecodeBatch` is the decode batch a CUDA
graph captures: it works only on static device buffers (engine/decode_buffers.py). Compression scorers observe prefill chunks
through `observer` (they see queries, pre-RoPE keys and post-RoPE keys layer by layer).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch

from kvferry.engine.layers import paged_attention as ref
from kvferry.engine.page_table import SequenceKV
from kvferry.engine.uploads import upload, upload_values

if TYPE_CHECKING:  # kernels needs triton: imported only where the pool is on CUDA
    from kvferry.kernels import DecodePlan


def _triton_kernels() -> ModuleType:
    """The Triton kernels package, imported only when the pool is on CUDA (it needs triton)."""
    from kvferry import kernels

    return kernels


def decode_plan(pool_kv: torch.Tensor, attn_lens: torch.Tensor) -> DecodePlan | None:
    """One work plan for every layer's decode attention, attn_lens [L, B, H], where the work-balanced
    Triton kernel serves this batch shape; None elsewhere (CPU, small batches)."""
    if not pool_kv.is_cuda:
        return None
    kernels = _triton_kernels()
    if not kernels.use_balanced(attn_lens.shape[1], attn_lens.shape[2]):
        return None
    return kernels.plan_decode(attn_lens, kernels.balanced_block_n(pool_kv.dtype))


class LayerMajorDecode:
    """attend() of both decode batches. They hold write_pages, write_offsets and attn_lens [L, B, H]
    layer-major (each layer reads contiguous [B, H] rows), page_tables [B, L, H, n], and one work
    plan for every layer's attention (decode_plan)."""

    pool_kv: torch.Tensor
    page_tables: torch.Tensor
    write_pages: torch.Tensor
    write_offsets: torch.Tensor
    attn_lens: torch.Tensor
    plan: DecodePlan | None

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pre_rope: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [B, Hq, D]; k, v [B, H, D]: stores the new K/V, then -> [B, Hq, D] (padding rows of a
        PaddedDecodeBatch: zeros or NaN, never read)."""
        pages, offsets, lens = self.write_pages[layer], self.write_offsets[layer], self.attn_lens[layer]
        tables = self.page_tables[:, layer]
        if not self.pool_kv.is_cuda:
            ref.store_kv(self.pool_kv, pages, offsets, k, v)
            return ref.decode_attention(q, self.pool_kv, tables, lens, scale)
        kernels = _triton_kernels()
        kernels.store_kv(self.pool_kv, pages, offsets, k, v)
        plan = self.plan.layer(layer) if self.plan is not None else None
        return kernels.decode_attention(q, self.pool_kv, tables, lens, scale, plan=plan)


class PrefillObserver(Protocol):
    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None: ...


class PrefillCancelled(Exception):
    """A prefill chunk stopped between two layers because its request was cancelled."""


class PrefillBatch:
    """One chunk of one sequence: tokens start..start+T-1 (their RoPE positions). Every head holds
    `start` tokens before the chunk, except over a compressed cached context (engine/context_cache.py):
    there each head holds its own kept prefix (head_lens [L, H], whole pages) and the chunk goes after it.
    `cancelled` is asked before each layer (the model calls `stop_if_cancelled`): a long chunk of a
    cancelled request ends within one layer's work, not after all of them (1.5-5 s for a long prompt)."""

    def __init__(
        self,
        seq_kv: SequenceKV,
        start: int,
        num_tokens: int,
        observer: PrefillObserver | None = None,
        dense: bool = True,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.seq_kv = seq_kv
        self.start = start
        self.num_tokens = num_tokens
        self.observer = observer
        self.cancelled = cancelled
        device = seq_kv.pool.kv.device
        self.positions = torch.arange(start, start + num_tokens, device=device)
        # Each head's tokens before this chunk, [L, H]; equal to `start` everywhere but after a cached context.
        self.prefix_lens = seq_kv.head_lens.clone()
        self.uniform = bool((self.prefix_lens == start).all())
        self.use_triton = device.type == "cuda"
        if self.use_triton:  # the varlen kernel's view of this single chunk
            self.cu_seqlens = upload_values([0, num_tokens], torch.int32, device)
            # Every layer's page table uploaded once per chunk, without a wait (engine/uploads.py):
            # a blocking copy per layer, or even per chunk, kept the host from running ahead of the
            # GPU, and the host's work (scoring launches included) then added to the wall time.
            self.tables = upload(seq_kv.page_table, device)  # [L, H, max_pages]
            page_size = seq_kv.pool.page_size
            if self.uniform:  # every head holds `start` tokens before this chunk: its slots on the device
                self.starts = upload_values([start], torch.int32, device)  # [1]
                pos = self.positions
                self.slot_page = (pos // page_size).long()  # [T] page index in each head
                offset = (pos % page_size)[:, None]  # [T, H] below, real memory: store_kv's rows
                self.slot_offset = offset.expand(num_tokens, seq_kv.num_kv_heads).contiguous()
            else:  # per-head prefixes: every layer's slots at once on the device, no host work per layer
                lens = upload(self.prefix_lens, device)  # [L, H]
                self.head_starts = lens.to(torch.int32)  # [L, H]: the kernel's per-head prefix lengths
                slot = lens[:, None, :] + torch.arange(num_tokens, device=device)[None, :, None]  # [L, T, H]
                index = (slot // page_size).transpose(1, 2)  # [L, H, T] page index in each head
                self.slot_pages = (
                    self.tables.gather(2, index).transpose(1, 2).long().contiguous()
                )  # [L, T, H]
                self.slot_offsets = slot % page_size  # [L, T, H]
        # kernels/prefill_dense.py's prefill_attention_dense where it applies to this chunk
        self.dense_attention: Callable[..., torch.Tensor] | None = None
        if dense and self.use_triton and self.uniform:
            from kvferry.kernels import prefill_dense  # CUDA only (needs triton)

            pool = seq_kv.pool
            if prefill_dense.dense_prefill_applies_to(
                num_tokens, start, device, pool.kv.dtype, pool.head_dim
            ):
                self.dense_attention = prefill_dense.prefill_attention_dense

    def stop_if_cancelled(self) -> None:
        """Called by the model before each layer: raise PrefillCancelled once the request is cancelled."""
        if self.cancelled is not None and self.cancelled():
            raise PrefillCancelled

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pre_rope: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D]; k, v, k_pre_rope [T, H, D] -> [T, Hq, D]."""
        kv = self.seq_kv
        device = kv.pool.kv.device
        if self.use_triton:
            if self.uniform:  # no host work, no sync
                pages_t = self.tables[layer][:, self.slot_page].T.long()  # [T, H]
                offsets_t = self.slot_offset
            else:
                pages_t, offsets_t = self.slot_pages[layer], self.slot_offsets[layer]  # [T, H]
            _triton_kernels().store_kv(kv.pool.kv, pages_t, offsets_t, k, v)
        else:
            pages, offsets = kv.slots(layer, self.num_tokens)  # [H, T]
            ref.store_kv(
                kv.pool.kv, pages.to(device), offsets.to(device), k.transpose(0, 1), v.transpose(0, 1)
            )
        if self.observer is not None:
            self.observer.observe(layer, q, k_pre_rope, k, self.start)
        if self.dense_attention is not None:
            return self.dense_attention(q, k, v, kv.pool.kv, self.tables[layer], self.start, scale)
        if self.use_triton:
            starts = self.starts if self.uniform else self.head_starts[layer][None]  # [1] or [1, H]
            return _triton_kernels().prefill_attention(
                q, kv.pool.kv, self.tables[layer][None], self.cu_seqlens, starts, self.num_tokens, scale
            )
        table = kv.page_table[layer].to(device)  # [H, max_pages]
        prefix = self.start if self.uniform else self.prefix_lens[layer]
        return ref.prefill_attention(q, kv.pool.kv, table, prefix, scale)

    def finish(self) -> None:
        self.seq_kv.head_lens += self.num_tokens


class DecodeBatch(LayerMajorDecode):
    """One new token for each of B sequences; every head appends to its own tail."""

    def __init__(self, seq_kvs: list[SequenceKV], positions: list[int]):
        self.seq_kvs = seq_kvs
        pool = seq_kvs[0].pool
        device = pool.kv.device
        self.pool_kv = pool.kv
        self.positions = torch.tensor(positions, device=device)
        lens = torch.stack([s.head_lens for s in seq_kvs])  # [B, L, H]
        max_pages = int(((lens + pool.page_size) // pool.page_size).max())
        # Sequences own page tables of different widths (sized to their own max length): cut or
        # pad each to the batch's widest head with -1 (unallocated; masked out by the lengths).
        tables = []
        for s in seq_kvs:
            t = s.page_table[:, :, :max_pages]
            tables.append(torch.nn.functional.pad(t, (0, max_pages - t.shape[-1]), value=-1))
        self.page_tables = upload(torch.stack(tables), device)  # [B, L, H, n]
        slot = upload(lens, device)  # [B, L, H]: the new token goes to position head_len of each head
        write_pages = torch.gather(self.page_tables, 3, (slot // pool.page_size)[..., None]).squeeze(-1)
        self.write_pages = write_pages.long().transpose(0, 1).contiguous()  # [L, B, H]
        self.write_offsets = (slot % pool.page_size).transpose(0, 1).contiguous()  # [L, B, H]
        self.attn_lens = (slot + 1).transpose(0, 1).contiguous()  # [L, B, H]: the new token included
        self.plan = decode_plan(pool.kv, self.attn_lens)

    def finish(self) -> None:
        for s in self.seq_kvs:
            s.head_lens += 1


class PaddedDecodeBatch(LayerMajorDecode):
    """A decode step over static device buffers, B real rows padded to N (what a CUDA graph captures).

    page_tables [N, L, H, max_pages] stay on the device between steps and hold every page of each
    row's heads up to their lengths; lens [N, L, H] are the tokens each head held before this step;
    new_pages [N, L, H] the page a head's new token opens, -1 when it goes into the head's last page,
    PADDING (-2) on padding rows (lens 0: they store nothing and attend to nothing). Only device work
    here, no host synchronisation: the same code runs eagerly (CPU tests) and under capture.
    """

    def __init__(
        self, pool_kv: torch.Tensor, page_tables: torch.Tensor, lens: torch.Tensor, new_pages: torch.Tensor
    ):
        page_size = pool_kv.shape[2]
        self.pool_kv = pool_kv
        self.page_tables = page_tables
        index = (lens // page_size)[..., None]  # [N, L, H, 1] page index of each head's new token
        last = page_tables.gather(3, index)[..., 0].to(lens.dtype)  # stale where a page opens
        write_pages = torch.where(new_pages == -1, last, new_pages)  # [N, L, H], < 0 on padding rows
        page_tables.scatter_(3, index, write_pages[..., None].to(page_tables.dtype))  # opened pages in
        real = write_pages >= 0
        # Layer-major copies so that each layer reads contiguous [N, H] rows.
        self.write_pages = write_pages.transpose(0, 1).contiguous()  # [L, N, H]
        self.write_offsets = (lens % page_size).transpose(0, 1).contiguous()  # [L, N, H]
        self.attn_lens = (lens + real).transpose(0, 1).contiguous()  # [L, N, H]: the new token included
        self.plan = decode_plan(pool_kv, self.attn_lens)
