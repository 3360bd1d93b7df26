"""One request's output on its way from the engine thread to a Decode call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvferry.engine.outputs import RequestOutput
from kvferry.engine.sampling_params import SamplingParams
from kvferry.engine.sequence import Sequence
from kvferry.serving.detokenizer import IncrementalDetokenizer


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last event
    output: RequestOutput | None = None  # set on the last event unless aborted


class TokenStream:
    """Filled on the engine thread (`publish`, `close`), read on the event loop (`events`). Tokens that
    come before the Decode call arrives wait in the queue."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, tokenizer: Any, sampling: SamplingParams, first: int | None
    ) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._detokenizer = IncrementalDetokenizer(tokenizer, sampling.stop)
        self._num_sent = 1
        self.closed = False
        if first is not None:
            self.set_first(first)

    def set_first(self, first: int) -> None:
        """The first token, which the prefill service already returned with its text (an early
        reservation learns it at the commit, before any other token)."""
        self._detokenizer.add([first])

    def publish(self, seq: Sequence, output: RequestOutput | None) -> None:
        """New tokens of `seq`; `output` is the engine's final output once it finished."""
        new = seq.output_token_ids[self._num_sent :]
        self._num_sent = len(seq.output_token_ids)
        text = self._detokenizer.add(new)
        if output is not None:
            text += self._detokenizer.finish(output.text)
            self._put(TokenEvent(new, text, output.finish_reason, output))
        elif new:
            self._put(TokenEvent(new, text))

    def close(self, reason: str = "abort") -> None:
        if not self.closed:
            self._put(TokenEvent([], "", reason))

    def _put(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.closed = True
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return
