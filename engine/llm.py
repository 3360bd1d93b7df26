"""The offline API: `LLM(model).generate(prompts, sampling_params)` runs the colocated engine."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from kvferry.engine.config import EngineConfig
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.outputs import RequestOutput
from kvferry.engine.prompt_regions import encode_request
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.tokenizer import Message

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
        context: Prompt | list[Prompt | None] | None = None,
        cache_context: bool | None = None,
        question: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Text prompts or token-id prompts -> one RequestOutput each, in order.

        `context` (text or token ids; one for every prompt, or a list with one per prompt) goes in
        front of its prompt. With `cache_context` (None: the engine's default) it is compressed on its
        own, by a query-agnostic method, and kept in the context cache, so later prompts on the same
        context prefill only themselves; `compression` then applies to the context only. `question`
        (one for all, or one per prompt) is appended to its prompt and always kept by compression."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        tok, max_len = self.engine.tokenizer, self.engine.max_model_len
        encoded = [
            encode_request(tok, prompt=p, question=q, compression=c, context=k, max_tokens=max_len)
            for p, k, q, c in zip(
                prompts,  # type: ignore[arg-type]
                _per_request_context(context, n),
                _per_request(question, n, None),
                _per_request(compression, n, None),
            )
        ]
        return self._run_encoded(encoded, sampling_params, use_tqdm, cache_context)

    def generate_chat(
        self,
        messages_batch: list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        compression: Any = None,
        use_tqdm: bool = False,
        cache_context: bool | None = None,
        question: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Conversations (role/content dicts) through the model's chat template; a final assistant
        message is treated as the start of the answer and continued. With `cache_context` (None: the
        engine's default) everything before the last user turn is the context: see `generate`.
        `question` (one for all, or one per conversation) becomes the last part of the last user
        message and is always kept by compression."""
        n = len(messages_batch)
        tok, max_len = self.engine.tokenizer, self.engine.max_model_len
        caching = self.engine.config.cache_context if cache_context is None else cache_context
        encoded = [
            encode_request(
                tok, messages=m, question=q, compression=c, chat_context=caching, max_tokens=max_len
            )
            for m, q, c in zip(
                messages_batch, _per_request(question, n, None), _per_request(compression, n, None)
            )
        ]
        return self._run_encoded(encoded, sampling_params, use_tqdm, cache_context)

    def _run_encoded(
        self, encoded: list[Any], sampling_params: Any, use_tqdm: bool, cache_context: bool | None
    ) -> list[RequestOutput]:
        """Every request encoded (all validated before any runs): run them."""
        ids, comp, context_lens = (
            [getattr(e, f) for e in encoded] for f in ("ids", "compression", "context_len")
        )
        return self._run(ids, sampling_params, comp, use_tqdm, context_lens, cache_context)

    def _run(
        self,
        prompt_ids: list[list[int]],
        sampling_params: Any,
        compression: Any,
        use_tqdm: bool,
        context_lens: list[int],
        cache_context: bool | None,
    ) -> list[RequestOutput]:
        n = len(prompt_ids)
        sampling = _per_request(sampling_params, n, SamplingParams())
        comp = _per_request(compression, n, None)
        engine = self.engine
        seqs = [
            engine.make_sequence(ids, sp, c, context_len=k, cache_context=cache_context)
            for ids, sp, c, k in zip(prompt_ids, sampling, comp, context_lens)
        ]
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


def _per_request_context(context: Any, n: int) -> list[Prompt | None]:
    """One context (text or token ids) for every prompt, or a list of them (None: no context)."""
    if context is None or isinstance(context, str):
        return [context] * n
    if isinstance(context, list) and context and all(isinstance(t, int) for t in context):
        return [context] * n  # token ids of one context
    return _per_request(context, n, None)


def _per_request(value: Any, n: int, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, Seq) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"got {len(value)} per-request settings for {n} prompts")
        return list(value)
    return [value] * n
