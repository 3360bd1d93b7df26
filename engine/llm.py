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
        question: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Text prompts or token-id prompts -> one RequestOutput each, in order. `question` (one for
        all, or one per prompt) is appended to its prompt and always kept by compression."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        return self._encode_and_run(prompts, None, sampling_params, compression, use_tqdm, question)  # type: ignore[arg-type]

    def generate_chat(
        self,
        messages_batch: list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        compression: Any = None,
        use_tqdm: bool = False,
        question: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Conversations (role/content dicts) through the model's chat template; a final assistant
        message is treated as the start of the answer and continued. `question` (one for all, or one per
        conversation) becomes the last part of the last user message and is always kept by compression."""
        return self._encode_and_run(None, messages_batch, sampling_params, compression, use_tqdm, question)

    def _encode_and_run(
        self,
        prompts: list[Prompt] | None,
        chats: list[list[Message]] | None,
        sampling_params: Any,
        compression: Any,
        use_tqdm: bool,
        question: Any,
    ) -> list[RequestOutput]:
        """Encode every request (validating all before any runs), then run them."""
        tok = self.engine.tokenizer
        n = len(prompts if prompts is not None else chats)  # type: ignore[arg-type]
        per_request = zip(_per_request(question, n, None), _per_request(compression, n, None))
        encoded = [
            encode_request(tok, prompt=prompts[i], question=q, compression=c)
            if prompts is not None
            else encode_request(tok, messages=chats[i], question=q, compression=c)  # type: ignore[index]
            for i, (q, c) in enumerate(per_request)
        ]
        return self._run([ids for ids, _ in encoded], sampling_params, [c for _, c in encoded], use_tqdm)

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
