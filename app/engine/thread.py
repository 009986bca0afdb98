"""The one thread that owns MLX.

MLX streams are thread-local, so every MLX call (load, evict, prefill, decode, clear_cache)
happens here. The asyncio side talks to this thread only through a command queue; results and
events come back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx
import structlog

from app import metrics
from app.engine.scheduler import ModelBatch, Sequence
from app.errors import Overloaded

log = structlog.get_logger(__name__)
T = TypeVar("T")


class EngineThread:
    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._batches: dict[str, ModelBatch] = {}
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._stream: Any = None
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join(timeout=30)

    @property
    def stream(self) -> Any:
        """The MLX stream of this thread, for BatchGenerators built here."""
        return self._stream

    # --- called from the event loop -----------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the MLX thread and await its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)

        self._commands.put(run)
        return await asyncio.wrap_future(future)

    def add_sequence(self, model_id: str, seq: Sequence) -> None:
        self._commands.put(lambda: self._batches[model_id].add(seq))

    def wake(self) -> None:
        """Nudge an idle thread, e.g. so it notices a cancelled sequence promptly."""
        self._commands.put(lambda: None)

    # --- on the MLX thread --------------------------------------------------------------------

    def attach(self, model_id: str, batch: ModelBatch) -> None:
        self._batches[model_id] = batch

    def detach(self, model_id: str) -> ModelBatch | None:
        return self._batches.pop(model_id, None)

    def fail_all(self, failure: Exception) -> None:
        for batch in self._batches.values():
            batch.cancel_all(failure)

    def _run(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        self._started.set()
        with mx.stream(self._stream):
            while True:
                busy = any(len(b) for b in self._batches.values())
                if not self._drain_commands(block=not busy):
                    break
                for batch in list(self._batches.values()):
                    batch.step()
                metrics.INFLIGHT.set(sum(len(b) for b in self._batches.values()))
        self.fail_all(Overloaded("The server is shutting down; retry shortly."))

    def _drain_commands(self, *, block: bool) -> bool:
        """Run queued commands; False when asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            try:
                command()
            except Exception as error:  # a bad command must not kill the engine
                log.exception("engine command failed", error=repr(error))
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
