"""The global circuit breaker: a request budget shared by every visitor and every gateway
instance (`global_rpm`, through the shared limiter), and a failure breaker that stops
sending work to an engine that keeps failing (load errors, out of memory).

closed --(breaker_failures failures in a row)--> open --(cooldown)--> half-open
half-open lets one trial request through: success closes, failure opens again. A trial
that never reports back (client gone, non-engine route) frees the slot after a cooldown.

`allow()` is called in exactly one place, `Engine.submit`, which also reports the outcome:
calling it twice per request made the second call refuse the trial the first one took, so
the breaker never closed. Only engine failures count; a client's bad request, a cancelled
stream or a model that fails to load (that model's problem, answered as such) do not.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import structlog

from app import metrics
from app.errors import Overloaded, RateLimited
from app.limits.window import Clock, Limiter, LimitResult

log = structlog.get_logger(__name__)

GLOBAL_KEY = "global:requests"


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self, limiter: Limiter, *, global_rpm: int, failures: int, cooldown: float,
        clock: Clock = time.monotonic, name: str = "engine",
        publish: Callable[[BreakerState], None] = metrics.BREAKER_STATE.set,
    ) -> None:
        # `name` and `publish`: the same breaker guards each upstream (app/targets), with its
        # own gauge and log name.
        self.name = name
        self._publish = publish
        self.limiter = limiter
        self.global_rpm = global_rpm
        self.failure_threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive_failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._trial_started: float | None = None
        publish(BreakerState.CLOSED)

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.cooldown:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            log.warning("circuit breaker state", breaker=self.name, state=state.name.lower(),
                        failures=self.consecutive_failures)
        self._state = state
        self._publish(state)
        if state is not BreakerState.HALF_OPEN:
            self._trial_started = None

    def check(self) -> None:
        """Raise Overloaded while open; never takes the half-open trial (so it may be asked
        early, by the limits middleware, as well as by `allow`)."""
        if self.state is BreakerState.OPEN:
            raise Overloaded("The model engine is failing; try again shortly.",
                             retry_after=self._opened_at + self.cooldown - self.clock())

    def allow(self) -> None:
        """Raise Overloaded (503 + Retry-After) unless work may go to the engine now. Ask
        once per request: in half-open state this takes the one trial."""
        self.check()
        if self.state is BreakerState.CLOSED:
            return
        now = self.clock()
        if self._trial_started is None or now - self._trial_started >= self.cooldown:
            self._trial_started = now  # this request is the trial
            return
        raise Overloaded("The model engine is recovering; try again shortly.",
                         retry_after=max(1.0, self._trial_started + self.cooldown - now))

    def abandon(self) -> None:
        """The request that may hold the trial ended without telling us anything about the
        engine (refused at the door, cancelled): let the next request be the trial."""
        if self._state is BreakerState.HALF_OPEN:
            self._trial_started = None

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.consecutive_failures >= self.failure_threshold
        ):
            self._opened_at = self.clock()
            self._set(BreakerState.OPEN)
            self._trial_started = None

    async def hit_global(self) -> LimitResult | None:
        """Count one request against `global_rpm`; raise RateLimited when it is spent."""
        if self.global_rpm <= 0:
            return None
        result = await self.limiter.acquire(GLOBAL_KEY, self.global_rpm)
        if not result.allowed:
            metrics.RATE_LIMITED.labels(limit="global").inc()
            raise RateLimited("The server is at its request limit; try again shortly.",
                              retry_after=result.retry_after)
        return result
