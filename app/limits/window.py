"""Sliding-window limits with costs: the result type, the backend protocol, in-process backend.

Algorithm: a sliding *log*. Every admitted hit is kept with its timestamp and cost for one
window; usage is the sum of costs younger than the window. Compared with a weighted
two-window counter it is exact (no "uniform previous window" guess, so a burst at a window
edge can never pass more than `limit` in any 60 s span), and it can say exactly when
capacity returns, which is what `Retry-After` and `x-ratelimit-reset-*` report. Its cost,
one entry per admitted request, is small at gateway request rates. The Redis backend runs
the same algorithm in one Lua script (app/limits/redis_backend.py).

Modes: "hit" admits and records `cost` only if it fits; "peek" answers whether `cost` would
fit without recording; "charge" records unconditionally (tokens known only after
generation may overshoot, and then the window is spent until they age out).

Reservations: a recorded entry has an id (`LimitResult.entry`), and `adjust` changes that
entry's cost in place, keeping its timestamp. A token budget reserves prompt + max_tokens at
admission and adjusts the entry to the real use at the end: the refund ages out exactly when
the reservation would have, so it never opens extra room later.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Mode = Literal["hit", "peek", "charge"]
Clock = Callable[[], float]
WINDOW = 60.0
LOCAL_PREFIX = "local:"  # ids of in-process entries (the fallback limiter tells them apart)


@dataclass(frozen=True)
class LimitResult:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the oldest counted entry leaves the window (capacity returns)
    retry_after: float  # seconds until this request would fit; 0 when allowed
    entry: str | None = None  # id of the entry recorded for this call, for `adjust`

    @property
    def reset_header(self) -> str:
        """`x-ratelimit-reset-*` value, OpenAI style: whole seconds like '1s', '12s'."""
        return f"{math.ceil(self.reset)}s"


class Limiter(Protocol):
    async def acquire(
        self, key: str, limit: int, *, cost: int = 1, window: float = WINDOW, mode: Mode = "hit"
    ) -> LimitResult: ...

    async def adjust(self, key: str, entry: str, cost: int, *, window: float = WINDOW) -> str:
        """Set a recorded entry's cost (a reservation settled); returns its id from now on.
        An entry that has left the window already is left alone."""
        ...

    async def aclose(self) -> None: ...


def _retry_after(entries: list[list[Any]], used: int, cost: int, limit: int,
                 now: float, window: float) -> float:
    """Seconds until enough of the oldest entries expire for `cost` to fit."""
    if cost > limit:
        return window  # can never fit; tell the caller to come back after a full window
    excess = used + cost - limit
    freed = 0
    for stamp, entry_cost, _ in entries:
        freed += entry_cost
        if freed >= excess:
            return max(0.0, float(stamp) + window - now)
    return window


class _Log:
    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[list[Any]] = deque()  # [timestamp, cost, entry id]
        self.total = 0


class InProcessLimiter:
    """The embedded default, and the fallback while Redis is down. Per process only."""

    def __init__(self, clock: Clock = time.time, *, sweep_every: int = 1000) -> None:
        self.clock = clock
        self._logs: dict[str, _Log] = {}
        self._calls = 0
        self._sweep_every = sweep_every
        self._ids = itertools.count(1)

    async def acquire(
        self, key: str, limit: int, *, cost: int = 1, window: float = WINDOW, mode: Mode = "hit"
    ) -> LimitResult:
        return self.acquire_now(key, limit, cost=cost, window=window, mode=mode)

    def acquire_now(
        self, key: str, limit: int, *, cost: int = 1, window: float = WINDOW, mode: Mode = "hit"
    ) -> LimitResult:
        now = self.clock()
        self._maybe_sweep(now, window)
        log = self._logs.setdefault(key, _Log())
        self._expire(log, now - window)
        allowed = mode == "charge" or log.total + cost <= limit
        entry = None
        if allowed and mode != "peek" and cost > 0:
            entry = f"{LOCAL_PREFIX}{next(self._ids)}"
            log.entries.append([now, cost, entry])
            log.total += cost
        reset = log.entries[0][0] + window - now if log.entries else 0.0
        retry = 0.0 if allowed else _retry_after(
            list(log.entries), log.total, cost, limit, now, window)
        return LimitResult(allowed, limit, max(0, limit - log.total), max(0.0, reset), retry,
                           entry)

    async def adjust(self, key: str, entry: str, cost: int, *, window: float = WINDOW) -> str:
        return self.adjust_now(key, entry, cost, window=window)

    def adjust_now(self, key: str, entry: str, cost: int, *, window: float = WINDOW) -> str:
        log = self._logs.get(key)
        if log is None:
            return entry
        self._expire(log, self.clock() - window)
        for item in log.entries:
            if item[2] == entry:
                log.total += max(0, cost) - item[1]
                item[1] = max(0, cost)
                break
        return entry

    @staticmethod
    def _expire(log: _Log, cutoff: float) -> None:
        while log.entries and log.entries[0][0] <= cutoff:
            log.total -= log.entries.popleft()[1]

    def _maybe_sweep(self, now: float, window: float) -> None:
        """Drop idle keys now and then so one-off client IPs don't pile up."""
        self._calls += 1
        if self._calls % self._sweep_every:
            return
        idle = [k for k, log in self._logs.items()
                if not log.entries or log.entries[-1][0] <= now - window]
        for key in idle:
            del self._logs[key]

    async def aclose(self) -> None:
        return None
