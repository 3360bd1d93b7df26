"""Incremental detokenization: output token ids in, text deltas out.

Each new token re-decodes only a short window (from `prefix_offset`), as vLLM does. Text that may
still change is held back: a trailing incomplete UTF-8 character ("\\ufffd"), and with stop strings
the last len(longest stop) - 1 characters, which could be the start of a stop string that the engine
cuts from the output. The deltas of a request add up to its final text.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any | None, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text that is now certain and was not returned before."""
        if self.tokenizer is None:
            self.token_ids.extend(token_ids)
            return ""
        for token in token_ids:
            self.token_ids.append(token)
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            window = self._decode(self.token_ids[self._prefix_offset :])
            if len(window) > len(prefix) and not window.endswith("\ufffd"):
                self.text += window[len(prefix) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self.token_ids)
        end = len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (already cut at a stop string)."""
        delta = final_text[self.sent :] if len(final_text) > self.sent else ""
        self.sent = max(self.sent, len(final_text))
        return delta
