"""The one thread that owns MLX.

MLX streams are thread-local, so every MLX call (load, evict, prefill, decode, clear_cache)
happens here. The asyncio side talks to this thread only through a command queue; results and
events come back through `loop.call_soon_threadsafe`.

Supervised: an exception out of a batch's step fails that batch's sequences (with an error
event) and the batch starts over with a fresh generator; the thread lives on. If the thread
itself cannot go on, it fails every sequence and every queued command, and says so in `dead`
(`/ready` answers 503 and `/health` "degraded"), so nobody waits on a stream that will never
move. `fault` is the test hook for injecting faults (see `ModelBatch`), plus the point
"loop", raised outside any batch, which kills the thread.
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
from app.engine.sampling import reseed_global_prng
from app.engine.scheduler import FaultHook, ModelBatch, Sequence
from app.errors import EngineFailure, GatewayError, Overloaded

log = structlog.get_logger(__name__)
T = TypeVar("T")


class _Command:
    """Work for the thread, and what to do instead if the thread is dead."""

    __slots__ = ("abandon", "run")

    def __init__(self, run: Callable[[], None], abandon: Callable[[Exception], None]) -> None:
        self.run = run
        self.abandon = abandon


def _ignore(_: Exception) -> None:
    pass


class EngineThread:
    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._batches: dict[str, ModelBatch] = {}
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._stream: Any = None
        self._started = threading.Event()
        self.dead: str | None = None  # why the thread stopped serving, once it has
        self._fault: FaultHook | None = None

    @property
    def fault(self) -> FaultHook | None:
        return self._fault

    @fault.setter
    def fault(self, hook: FaultHook | None) -> None:
        """Tests only: `hook(point)` runs at each fault point and may raise."""
        self._fault = hook
        for batch in list(self._batches.values()):
            batch.fault = hook

    def dead_error(self) -> Overloaded:
        return Overloaded(f"The model engine has stopped ({self.dead}); the server needs a "
                          "restart.", code="engine_stopped")

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

        def abandon(error: Exception) -> None:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

        self._put(_Command(run, abandon))
        return await asyncio.wrap_future(future)

    def add_sequence(self, model_id: str, seq: Sequence) -> None:
        """Start `seq` on `model_id`'s batch; if that fails, `seq` gets an error event (it
        must never be left waiting, holding its slot)."""

        def run() -> None:
            try:
                batch = self._batches.get(model_id)
                if batch is None:
                    raise EngineFailure(f"model {model_id!r} is no longer loaded; retry.")
                batch.add(seq)
            except Exception as error:
                log.exception("starting a sequence failed", request_id=seq.request_id)
                seq.fail(error if isinstance(error, GatewayError)
                         else EngineFailure(f"could not start the generation: {error!r}"))

        self._put(_Command(run, seq.fail))

    def wake(self) -> None:
        """Nudge an idle thread, e.g. so it notices a cancelled sequence promptly."""
        self._put(_Command(lambda: None, _ignore))

    def _put(self, command: _Command) -> None:
        self._commands.put(command)
        if self.dead is not None:  # nobody will run it: answer it (and any stragglers) now
            self._abandon_queued()

    def _abandon_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command.abandon(self.dead_error())

    # --- on the MLX thread --------------------------------------------------------------------

    def attach(self, model_id: str, batch: ModelBatch) -> None:
        batch.fault = self._fault
        self._batches[model_id] = batch

    def detach(self, model_id: str) -> ModelBatch | None:
        return self._batches.pop(model_id, None)

    def fail_all(self, failure: Exception) -> None:
        for batch in self._batches.values():
            batch.cancel_all(failure)

    def _run(self) -> None:
        self._stream = mx.new_stream(mx.default_device())
        with mx.stream(self._stream):
            reseed_global_prng()  # the global PRNG state may still be another thread's
        self._started.set()
        try:
            with mx.stream(self._stream):
                self._serve()
                self.fail_all(Overloaded("The server is shutting down; retry shortly."))
        except BaseException as error:  # whatever it was: say so and fail every request
            self._die(repr(error))
        finally:
            # An MLX stream owns a C++ worker thread. Destroyed at interpreter exit instead of
            # from the thread that made it, it can abort the process ("terminate called
            # without an active exception"), which a service manager counts as a crash.
            try:
                mx.synchronize(self._stream)
                mx.clear_streams()
            except Exception:
                log.exception("releasing the engine's MLX streams failed")

    def _serve(self) -> None:
        while True:
            busy = any(len(b) for b in self._batches.values())
            if not self._drain_commands(block=not busy):
                return
            if self._fault is not None:
                self._fault("loop")
            for model_id, batch in list(self._batches.items()):
                try:
                    batch.step()
                except Exception as error:  # the batch's sequences fail; the engine goes on
                    log.exception("engine step failed", model=model_id)
                    metrics.ENGINE_FAILURES.inc(len(batch))
                    batch.reset(EngineFailure(f"generation failed in the engine: {error!r}"))
            metrics.INFLIGHT.set(sum(len(b) for b in self._batches.values()))

    def _die(self, reason: str) -> None:
        self.dead = reason
        log.critical("engine thread stopped: failing every request", error=reason)
        metrics.INFLIGHT.set(0)
        for batch in list(self._batches.values()):
            try:
                batch.abandon(self.dead_error())
            except Exception:
                log.exception("failing the sequences of a dead engine")
        self._abandon_queued()

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
                command.run()
            except Exception as error:  # a bad command must not kill the engine
                log.exception("engine command failed", error=repr(error))
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
