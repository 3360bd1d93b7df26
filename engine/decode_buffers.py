"""Static decode inputs: the device buffers a captured decode step reads, refilled before each replay.

A CUDA graph replays fixed addresses, so a decode step of B sequences is padded to a bucket size N
and reads its inputs from buffers allocated once:

- `packed` [max_batch, 2 + 2*L*H] int64, refilled by ONE host-to-device copy per step: per row the
  token id, its position, every head's cached length `lens` [L, H] and `new_pages` [L, H], the page
  a head's new token opens (-1: it goes into the head's last page, which the device table knows).
  Padding rows have length 0 and new page PADDING (nothing stored, nothing read).
- `page_tables` [max_batch, L, H, max_pages] int32, max_pages = ceil(max_model_len / page_size): it
  stays on the device between steps. Row i holds the table of the batch's i-th sequence; each step
  only the new token's page is written in (inside the graph, `PaddedDecodeBatch`). A row is uploaded
  from the host only when a sequence first lands on it or missed a step, and moved on the device
  when sequences before it leave the batch. Entries past a head's length are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvferry.engine.sequence import Sequence

PADDING = -2  # new_pages value of a padding row


@dataclass(frozen=True)
class RowOwner:
    """Which sequence a page-table row holds, and its token count when the row was last brought up to date."""

    seq_id: int
    kv_id: int  # id() of the sequence's SequenceKV: a replaced cache is a new owner
    num_tokens: int


class DecodeBuffers:
    def __init__(
        self,
        max_batch: int,
        num_layers: int,
        num_kv_heads: int,
        max_pages: int,
        page_size: int,
        device: torch.device,
    ) -> None:
        self.max_batch = max_batch
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.max_pages = max_pages
        self.page_size = page_size
        self.device = device
        heads = num_layers * num_kv_heads
        self._lens_cols = slice(2, 2 + heads)
        self._new_cols = slice(2 + heads, 2 + 2 * heads)
        width = 2 + 2 * heads
        self.packed = torch.zeros(max_batch, width, dtype=torch.int64, device=device)
        self.staging = torch.zeros(max_batch, width, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.page_tables = torch.full(
            (max_batch, num_layers, num_kv_heads, max_pages), -1, dtype=torch.int32, device=device
        )
        self.owners: list[RowOwner | None] = [None] * max_batch
        # The staging rows may be rewritten only once their last (asynchronous) copy has landed.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.rows_uploaded = 0  # rows copied from the host (tests and stats)
        self.rows_moved = 0  # rows moved on the device
        self.set_padding(max_batch)

    # ---- views of the first n rows (what a graph of bucket size n reads) ----------------------
    def input_ids(self, n: int) -> torch.Tensor:
        return self.packed[:n, 0]  # [n]

    def positions(self, n: int) -> torch.Tensor:
        return self.packed[:n, 1]  # [n]

    def lens(self, n: int) -> torch.Tensor:
        return self.packed[:n, self._lens_cols].view(n, self.num_layers, self.num_kv_heads)  # [n, L, H]

    def new_pages(self, n: int) -> torch.Tensor:
        return self.packed[:n, self._new_cols].view(n, self.num_layers, self.num_kv_heads)  # [n, L, H]

    # ---- filling ---------------------------------------------------------------------------
    def set_padding(self, n: int) -> None:
        """Make rows 0..n-1 padding rows (a warm-up or capture run then stores and reads nothing)."""
        self.packed[:n].zero_()
        self.packed[:n, self._new_cols] = PADDING

    def invalidate_rows(self) -> None:
        """Forget what every page-table row holds (after a run that wrote padding into them)."""
        self.owners = [None] * self.max_batch

    def fill(self, seqs: list[Sequence], lens: torch.Tensor, new_pages: torch.Tensor, n: int) -> None:
        """Inputs of one decode step of `seqs`, padded to n rows: lens, new_pages [B, L, H] (the
        sequences' head lengths before the step and the pages their new tokens open, already in
        their host page tables)."""
        b = len(seqs)
        assert 0 < b <= n <= self.max_batch, (b, n, self.max_batch)
        self._place_tables(seqs)
        if self._copied is not None:
            self._copied.synchronize()
        stage = self.staging[:n]
        stage[:b, :2] = torch.tensor([[s.last_token, s.num_tokens - 1] for s in seqs])
        stage[:b, self._lens_cols] = lens.view(b, -1)
        stage[:b, self._new_cols] = new_pages.view(b, -1)
        stage[b:] = 0
        stage[b:, self._new_cols] = PADDING
        self.packed[:n].copy_(stage, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _place_tables(self, seqs: list[Sequence]) -> None:
        """Bring page-table rows 0..B-1 to the batch's sequences: keep, move on device, or upload."""
        row_of = {(o.seq_id, o.kv_id): (row, o.num_tokens) for row, o in enumerate(self.owners) if o}
        owners: list[RowOwner | None] = [None] * self.max_batch
        move_from: list[int] = []
        move_to: list[int] = []
        upload: list[int] = []
        for i, s in enumerate(seqs):
            key = (s.seq_id, id(s.kv))
            row, tokens = row_of.get(key, (-1, -1))
            if row < 0 or tokens != s.num_tokens - 1:  # new here, or missed a step: stale
                upload.append(i)
            elif row != i:
                move_from.append(row)
                move_to.append(i)
            owners[i] = RowOwner(s.seq_id, id(s.kv), s.num_tokens)
        if move_from:  # the right side is gathered first, so any permutation of rows is safe
            src = torch.tensor(move_from, device=self.device)
            self.page_tables[torch.tensor(move_to, device=self.device)] = self.page_tables[src]
            self.rows_moved += len(move_from)
        for i in upload:
            table = seqs[i].kv.page_table  # type: ignore[union-attr]  # [L, H, w]
            assert table.shape[-1] <= self.max_pages, "a sequence longer than max_model_len"
            self.page_tables[i, :, :, : table.shape[-1]].copy_(table)
        self.rows_uploaded += len(upload)
        self.owners = owners
