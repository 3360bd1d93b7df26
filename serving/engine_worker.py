"""The engine thread: one per service. It owns the LLMEngine (blocking torch code), runs commands that
asyncio handlers send it between steps, and steps while there is work.

Handlers never touch the engine directly: `await worker.call(fn)` runs `fn(engine)` on the engine
thread and returns its result; `worker.submit(fn)` does the same without waiting (cleanup paths).
After each step `after_step(engine, seqs)` runs on the engine thread with the sequences that produced
a token (none after a prefill chunk that is not a prompt's last); services use it to hand tokens to asyncio through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sequence import Sequence

log = logging.getLogger(__name__)
T = TypeVar("T")
AfterStep = Callable[[LLMEngine, list[Sequence]], None]
StepFailed = Callable[[LLMEngine, BaseException], None]


class EngineWorker:
    def __init__(
        self,
        build: Callable[[], LLMEngine],
        after_step: AfterStep | None = None,
        on_step_error: StepFailed | None = None,
        name: str = "engine",
    ) -> None:
        self._build = build
        self._after_step = after_step
        self._on_step_error = on_step_error
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.loaded: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self.engine: LLMEngine | None = None
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    async def wait_loaded(self) -> LLMEngine:
        return await asyncio.wrap_future(self.loaded)

    @property
    def is_loaded(self) -> bool:
        return self.engine is not None

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current step and end the thread (pending commands are dropped)."""
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; its result or exception comes back here."""
        return await asyncio.wrap_future(self._enqueue(fn))

    def submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Like call() without waiting; a failure is logged."""
        future = self._enqueue(fn)
        future.add_done_callback(_log_failure)

    def _enqueue(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up before the command ran
            try:
                assert self.engine is not None
                future.set_result(fn(self.engine))
            except BaseException as e:
                future.set_exception(e)

        self._commands.put(run)
        return future

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as e:
            log.exception("engine failed to load")
            self.loaded.set_exception(e)
            return
        self.loaded.set_result(self.engine)
        engine = self.engine
        while True:
            # Idle: sleep until a command comes. Busy: take what is queued and step again.
            try:
                command = self._commands.get(block=not engine.has_unfinished())
            except queue.Empty:
                command = _no_command
            while command is not _no_command:
                if command is None:
                    return
                command()
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = _no_command
            if engine.has_unfinished():
                self._step(engine)

    def _step(self, engine: LLMEngine) -> None:
        try:
            produced = engine.step()
        except Exception as e:
            log.exception("engine step failed; aborting every request")
            if self._on_step_error is not None:
                self._on_step_error(engine, e)
            for request_id in list(engine.requests):
                engine.abort(request_id)
            return
        self.steps += 1
        if self._after_step is not None:
            try:
                self._after_step(engine, produced)
            except Exception:
                log.exception("after_step hook failed")


def _no_command() -> None:
    pass


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("engine command failed", exc_info=future.exception())
