"""The offline API: `LLM(model).generate(prompts, sampling_params)` runs the colocated engine."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from kvferry.engine.compression import CompressionParams, as_compression_params
from kvferry.engine.config import EngineConfig
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.outputs import RequestOutput
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.tokenizer import Message, chat_protected_spans, encode_chat, encode_prompt

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **options))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        compression: Any = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Text prompts or token-id prompts -> one RequestOutput each, in order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [encode_prompt(self.engine.tokenizer, p, self.engine.max_model_len) for p in prompts]  # type: ignore[union-attr]
        return self._run(ids, sampling_params, compression, use_tqdm)

    def generate_chat(
        self,
        messages_batch: list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        compression: Any = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Conversations (role/content dicts) through the model's chat template; a final assistant
        message is treated as the start of the answer and continued."""
        ids = [encode_chat(self.engine.tokenizer, m, self.engine.max_model_len) for m in messages_batch]
        per_chat = _per_request(compression, len(messages_batch), None)
        comp = [self._chat_compression(m, c) for m, c in zip(messages_batch, per_chat)]
        return self._run(ids, sampling_params, comp, use_tqdm)

    def _chat_compression(self, messages: list[Message], compression: Any) -> CompressionParams | None:
        """Turn protect_system_prompt / protect_last_user_turn into token spans of this conversation."""
        params = as_compression_params(compression)
        if params is None or not (params.protect_system_prompt or params.protect_last_user_turn):
            return params
        spans = chat_protected_spans(
            self.engine.tokenizer, messages, params.protect_system_prompt, params.protect_last_user_turn
        )
        return params.with_spans(spans)

    def _run(
        self, prompt_ids: list[list[int]], sampling_params: Any, compression: Any, use_tqdm: bool
    ) -> list[RequestOutput]:
        n = len(prompt_ids)
        sampling = _per_request(sampling_params, n, SamplingParams())
        comp = _per_request(compression, n, None)
        engine = self.engine
        seqs = [engine.make_sequence(ids, sp, c) for ids, sp, c in zip(prompt_ids, sampling, comp)]
        bar = tqdm(total=n, desc="generate", disable=not use_tqdm)
        try:
            # Validated all before queueing any; a request the pool can never hold is refused here,
            # and the except below takes the already-queued ones back out, so nothing stays behind.
            for s in seqs:
                engine.scheduler.add(s)
                engine.requests[s.request_id] = s
            while engine.has_unfinished():
                done = [s for s in engine.step() if s.is_finished]
                bar.update(len(done))
        except BaseException:
            for s in seqs:
                engine.abort(s.request_id)
            raise
        finally:
            bar.close()
        return [engine.output(s) for s in seqs]


def _per_request(value: Any, n: int, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, Seq) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"got {len(value)} per-request settings for {n} prompts")
        return list(value)
    return [value] * n
