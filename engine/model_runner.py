"""Runs the model for one scheduled step: a prefill chunk or a decode batch (replayed from a CUDA
graph when the engine has a `DecodeGraphRunner` with a bucket for the batch, else eagerly)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from kvferry.engine.cuda_graphs import DecodeGraphRunner
from kvferry.engine.forward_batch import DecodeBatch, PrefillBatch, PrefillObserver
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.models import CausalLM
from kvferry.engine.sequence import Sequence
from kvferry.engine.uploads import upload_values


@runtime_checkable
class OutputObserver(Protocol):
    """A prefill observer that also sees each chunk's final hidden states (the compression observer
    measures the context's NLL there for retention="auto")."""

    def observe_output(
        self, logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, start: int
    ) -> None: ...


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        device: torch.device,
        graphs: DecodeGraphRunner | None = None,
        dense_prefill: bool = True,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.graphs = graphs
        self.dense_prefill = dense_prefill  # CUDA chunks may take the dense (cuDNN) path

    @torch.inference_mode()
    def prefill(
        self, seq: Sequence, num_tokens: int, observer: PrefillObserver | None = None
    ) -> torch.Tensor | None:
        """Process the next `num_tokens` prompt tokens; logits [V] of the last prompt token once the prompt is done."""
        assert seq.kv is not None
        start = seq.num_prefilled
        ids = upload_values(seq.prompt_token_ids[start : start + num_tokens], torch.int64, self.device)
        seq.kv.grow(num_tokens)
        batch = PrefillBatch(
            seq.kv,
            start,
            num_tokens,
            observer,
            dense=self.dense_prefill,
            cancelled=lambda: seq.cancel_requested,
        )
        hidden = self.model(ids, batch.positions, batch)
        batch.finish()
        if isinstance(observer, OutputObserver):
            observer.observe_output(self.model.logits, hidden, start)
        seq.num_prefilled += num_tokens
        if seq.num_prefilled < seq.num_prompt_tokens:
            return None
        return self.model.logits(hidden[-1:])[0]

    @torch.no_grad()  # not inference_mode: the compacted page table and lengths must stay normal tensors
    def compress(self, seq: Sequence, round_to: int = 1) -> None:
        """Prompt (or context) fully cached: let the request's compression observer select and compact
        its pages (`round_to`: whole pages per head, for a cached context)."""
        observer = seq.scorer_state
        if observer is not None:
            observer.compress(seq, round_to)
            seq.scorer_state = None

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; logits [B, V] for the next one."""
        assert all(s.kv is not None for s in seqs)
        if self.graphs is not None and self.graphs.bucket_for(len(seqs)) is not None:
            return self.graphs.run(seqs)  # grows every sequence by one token itself
        for s in seqs:
            s.kv.grow(1)  # type: ignore[union-attr]
        ids = upload_values([s.last_token for s in seqs], torch.int64, self.device)
        batch = DecodeBatch([s.kv for s in seqs], [s.num_tokens - 1 for s in seqs])  # type: ignore[misc]
        hidden = self.model(ids, batch.positions, batch)
        batch.finish()
        return self.model.logits(hidden)
