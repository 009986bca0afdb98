"""Admission control: at most `max_inflight` generations, at most `max_queue` waiting (FIFO).

Beyond that, Overloaded (503) with a Retry-After estimated from recent throughput: the
queue ahead drains `max_inflight` at a time, each taking about as long as recent slots did.

`per_owner` caps what one key may hold (running or queued) at once: without it a few
clients that open streams and stop reading could take every slot. Over the cap is a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from app import metrics
from app.errors import Overloaded, RateLimited
from app.limits.window import Clock

_RECENT = 50  # slot durations kept for the estimate


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, *, per_owner: int = 0,
                 clock: Clock = time.monotonic):
        if max_inflight < 1 or max_queue < 0 or per_owner < 0:
            raise ValueError("max_inflight must be >= 1, max_queue and per_owner >= 0")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.per_owner = per_owner
        self.by_owner: dict[str, int] = {}
        self.clock = clock
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._durations: deque[float] = deque(maxlen=_RECENT)
        self._closed: tuple[str, float] | None = None  # (message, retry_after) once draining

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def retry_after(self) -> float:
        """Seconds until a new request would likely get a slot (1-60)."""
        if not self._durations:
            return 1.0
        per_slot = sum(self._durations) / len(self._durations)
        rounds = (self.queued + self.max_inflight) // self.max_inflight  # ahead of us, +1
        return min(60.0, max(1.0, per_slot * rounds))

    async def acquire(self, owner: str | None = None, *, wait: float | None = None) -> float:
        """Take a slot, waiting in the queue if need be (at most `wait` seconds, when given);
        pass the result (and the same `owner`) to `release`.

        For holders whose slot outlives one block, e.g. a stream released when it ends.
        """
        if owner is not None and self.per_owner > 0:
            held = self.by_owner.get(owner, 0)
            if held >= self.per_owner:
                metrics.ADMISSION_REJECTED.inc()
                raise RateLimited(
                    f"This key already has {held} generations running or queued (the most "
                    "one key may have at once); wait for one to finish.",
                    retry_after=self.retry_after(), code="too_many_concurrent_requests")
            self.by_owner[owner] = held + 1
        try:
            if wait is None:
                await self._acquire()
            else:
                await self._acquire_within(wait)
        except BaseException:
            self._forget_owner(owner)
            raise
        return self.clock()

    def release(self, started: float, owner: str | None = None) -> None:
        self._durations.append(self.clock() - started)
        self._forget_owner(owner)
        self._release()

    def _forget_owner(self, owner: str | None) -> None:
        if owner is None or owner not in self.by_owner:
            return
        self.by_owner[owner] -= 1
        if self.by_owner[owner] <= 0:
            del self.by_owner[owner]

    def close(self, message: str, retry_after: float = 5.0) -> None:
        """Stop admitting (the server is draining): queued requests and every later one get
        Overloaded (503 + Retry-After) instead of starting a generation nobody will finish.
        Slots already held run on and are released as usual."""
        self._closed = (message, retry_after)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Overloaded(message, retry_after=retry_after))
        self._publish()

    async def _acquire_within(self, wait: float) -> None:
        """Like `_acquire`, but Overloaded once `wait` seconds pass without a slot (0: only a
        free slot will do)."""
        if wait <= 0 and (self.inflight >= self.max_inflight or self.queued):
            metrics.ADMISSION_REJECTED.inc()
            raise Overloaded("Every generation slot is busy.", retry_after=self.retry_after())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                await self._acquire()
        except TimeoutError:
            metrics.ADMISSION_REJECTED.inc()
            raise Overloaded(f"No generation slot came free within {wait:g}s.",
                             retry_after=self.retry_after()) from None

    async def _acquire(self) -> None:
        if self._closed is not None:
            metrics.ADMISSION_REJECTED.inc()
            raise Overloaded(self._closed[0], retry_after=self._closed[1])
        if self.inflight < self.max_inflight and not self.queued:
            self._take()
            return
        if self.queued >= self.max_queue:
            metrics.ADMISSION_REJECTED.inc()
            raise Overloaded("The server is busy; try again shortly.",
                             retry_after=self.retry_after())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        try:
            await waiter  # resolved by _release, which already counted us in
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted just as we were cancelled: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._publish()

    def _take(self) -> None:
        self.inflight += 1
        self._publish()

    def _release(self) -> None:
        self.inflight -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)
                break
        self._publish()

    def _publish(self) -> None:
        metrics.ADMISSION_INFLIGHT.set(self.inflight)
        metrics.ADMISSION_QUEUED.set(self.queued)
