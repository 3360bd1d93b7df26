"""Runs the model for one scheduled step: a prefill chunk or a decode batch."""

from __future__ import annotations

import torch

from engine.forward_batch import DecodeBatch, PrefillBatch, PrefillObserver
from engine.kv_pool import KVPool
from engine.models import CausalLM
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.device = device

    @torch.inference_mode()
    def prefill(
        self, seq: Sequence, num_tokens: int, observer: PrefillObserver | None = None
    ) -> torch.Tensor | None:
        """Process the next `num_tokens` prompt tokens; logits [V] of the last prompt token once the prompt is done."""
        assert seq.kv is not None
        start = seq.num_prefilled
        ids = torch.tensor(seq.prompt_token_ids[start : start + num_tokens], device=self.device)
        seq.kv.grow(num_tokens)
        batch = PrefillBatch(seq.kv, start, num_tokens, observer)
        hidden = self.model(ids, batch.positions, batch)
        batch.finish()
        seq.num_prefilled += num_tokens
        if seq.num_prefilled < seq.num_prompt_tokens:
            return None
        return self.model.logits(hidden[-1:])[0]

    @torch.no_grad()  # not inference_mode: the compacted page table and lengths must stay normal tensors
    def compress(self, seq: Sequence) -> None:
        """Prompt fully cached: let the request's compression observer select and compact its pages."""
        observer = seq.scorer_state
        if observer is not None:
            observer.compress(seq)
            seq.scorer_state = None

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; logits [B, V] for the next one."""
        for s in seqs:
            assert s.kv is not None
            s.kv.grow(1)
        ids = torch.tensor([s.last_token for s in seqs], device=self.device)
        batch = DecodeBatch([s.kv for s in seqs], [s.num_tokens - 1 for s in seqs])  # type: ignore[misc]
        hidden = self.model(ids, batch.positions, batch)
        batch.finish()
        return self.model.logits(hidden)
