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
        assert start == self.pending_from + sum(t[0].shape[0] for t in self.pending), "chunks out of order"
        self.pending.append(tensors)
        have_until = start + tensors[0].shape[0]
        done = []
        while self.next_block + 1 < len(self.bounds) and self.bounds[self.next_block + 1] <= have_until:
            lo, hi = self.bounds[self.next_block], self.bounds[self.next_block + 1]
            joined = tuple(torch.cat(parts) for parts in zip(*self.pending))
            offset = lo - self.pending_from
            done.append((lo, tuple(t[offset : offset + hi - lo] for t in joined)))
            rest = tuple(t[offset + hi - lo :] for t in joined)
            self.pending = [rest] if rest[0].shape[0] else []
            self.pending_from = hi
            self.next_block += 1
        return done
