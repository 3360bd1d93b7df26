"""What is left of a caller's deadline, handed on to each downstream call."""

from __future__ import annotations

import time


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); never 0, which gRPC would read as 'no time at all'."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.001)

    def passed(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
