"""Regroup streamed prefill chunks into fixed token blocks, so block-wise scoring does not depend
on the prefill chunk size.

The prompt length n is known up front, so blocks are planned as ceil(n / block) near-equal ranges:
no tiny tail block whose statistics would be noisier than the others.
"""

from __future__ import annotations

import torch


def block_bounds(n: int, block: int) -> list[int]:
    """[0, b1, ..., n]: ceil(n / block) near-equal blocks of at most `block` tokens."""
    num = max(1, -(-n // block))
    return [i * n // num for i in range(num + 1)]


class BlockStream:
    """Feed chunks (token axis 0) in order; get back each block once all its tokens arrived."""

    def __init__(self, n: int, block: int) -> None:
        self.bounds = block_bounds(n, block)
        self.next_block = 0
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.pending_from = 0  # prompt position of the first pending token

    def push(self, start: int, *tensors: torch.Tensor) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
        """Add tokens start..start+T-1; returns [(block_start, tensors of that block)] completed now."""
        span = self.push_span(start, *tensors)
        if span is None:
            return []
        lo, joined, first, last = span
        edges = self.bounds[first : last + 1]
        return [(a, tuple(t[a - lo : b - lo] for t in joined)) for a, b in zip(edges, edges[1:])]

    def push_span(
        self, start: int, *tensors: torch.Tensor
    ) -> tuple[int, tuple[torch.Tensor, ...], int, int] | None:
        """Add tokens start..start+T-1; returns every block completed now as one span:
        (span_start, tensors of the span, first block, last block + 1), or None when none completed.
        The span's blocks are `bounds[first:last + 1]` (prompt positions)."""
        assert start == self.pending_from + sum(t[0].shape[0] for t in self.pending), "chunks out of order"
        self.pending.append(tensors)
        have_until = start + tensors[0].shape[0]
        first = self.next_block
        while self.next_block + 1 < len(self.bounds) and self.bounds[self.next_block + 1] <= have_until:
            self.next_block += 1
        if self.next_block == first:
            return None
        lo, hi = self.bounds[first], self.bounds[self.next_block]
        parts = self.pending
        if len(parts) == 1 and hi == have_until:  # the chunk ends on a block edge: no slicing, no copy
            self.pending = []
            self.pending_from = hi
            return lo, tensors, first, self.next_block
        joined = parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))
        # pending_from == lo: pending tokens always start at a block edge
        rest = tuple(t[hi - lo :] for t in joined)
        # a copy of the leftover tokens, so the caller's whole chunk is not kept alive for them
        self.pending = [tuple(t.clone() for t in rest)] if rest[0].shape[0] else []
        self.pending_from = hi
        return lo, tuple(t[: hi - lo] for t in joined), first, self.next_block
