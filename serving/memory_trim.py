"""Gives freed heap memory back to the OS after a large request, so a service's RSS does not keep the
high-water mark of every big message it once held.

A 10 MB prompt passes through several copies (the gRPC message, the proto, the Python string, the
copy sent on); glibc keeps freed blocks of that size in its arenas (its mmap threshold grows to the
largest block freed, up to 32 MiB) and RSS stayed ~30 MB higher per refused request (coordinator
41 -> 437 MB after 30 such prompts). And a refused request's message is often still referenced from a
reference cycle (the error's traceback holds the handler's frame), which only a full garbage
collection frees. So once a call whose request was at least LARGE_REQUEST_BYTES has ended, a full
collection runs on the event loop (a service's start-up heap is frozen out of it: serving/gc_pauses.py)
and then `malloc_trim(0)`, which returns the free pages of every arena, on a worker thread (it takes the
arenas' locks). One pending trim covers every large call that ends before it starts.

A service process also limits glibc to two malloc arenas (`limit_malloc_arenas`, first thing in its
`__main__`): by default each allocating thread gets its own arena (up to 8 per core), and the buffers of
large messages freed on gRPC's threads stayed spread over them: the coordinator held ~150 MB after 100
refused 10 MB prompts with the default, ~90 MB with two arenas.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)
LARGE_REQUEST_BYTES = 1 << 20  # a 32K-token prompt is ~130 KB of text or token ids: 1 MiB is rare
TRIM_DELAY_SECONDS = 0.25  # gRPC frees a call's buffers a little after the handler returns


M_ARENA_MAX = -8  # glibc malloc.h
SERVICE_ARENAS = 2


def limit_malloc_arenas(arenas: int = SERVICE_ARENAS) -> None:
    """glibc: at most `arenas` malloc arenas in this process (call it before threads start), unless the
    operator set MALLOC_ARENA_MAX; a no-op without glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, arenas)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
    except (OSError, AttributeError):
        return None


class MemoryTrimmer:
    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._scheduled = False
        self.trims = 0  # completed, for tests

    def after_large_request(self) -> None:
        """Call on the event loop when a large call has ended (its objects are garbage now)."""
        if self._trim is None or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._start)

    def _start(self) -> None:
        self._scheduled = False  # a large call ending from here on schedules its own trim
        gc.collect()
        future = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)  # type: ignore[arg-type]
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[int]) -> None:
        if future.cancelled() or future.exception() is not None:
            log.warning("malloc_trim failed", exc_info=None if future.cancelled() else future.exception())
            return
        self.trims += 1
