"""Redis when it answers, the in-process limiter when it doesn't: never a 500, never open.

While Redis is down, requests go straight to the in-process limiter; one request per
`probe_interval` tries Redis again (bounded by `timeout`), and the first success switches
back. A warning is logged at most once per `warn_interval`; every fallback decision is
counted in `mlxgw_ratelimit_fallback_total`.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.exceptions import RedisError

from app import metrics
from app.limits.redis_backend import RedisLimiter
from app.limits.window import LOCAL_PREFIX, WINDOW, InProcessLimiter, LimitResult, Mode

log = structlog.get_logger(__name__)


class FallbackLimiter:
    def __init__(
        self, primary: RedisLimiter, local: InProcessLimiter, *, timeout: float = 0.1,
        probe_interval: float = 1.0, warn_interval: float = 60.0,
    ) -> None:
        self.primary = primary
        self.local = local
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.warn_interval = warn_interval
        self.redis_up = True
        self._down_since = 0.0
        self._last_probe = 0.0
        self._last_warning = -float("inf")
        metrics.RATELIMIT_REDIS_UP.set(1)

    async def acquire(
        self, key: str, limit: int, *, cost: int = 1, window: float = WINDOW, mode: Mode = "hit"
    ) -> LimitResult:
        now = time.monotonic()
        if self.redis_up or now - self._last_probe >= self.probe_interval:
            self._last_probe = now
            try:
                result = await asyncio.wait_for(
                    self.primary.acquire(key, limit, cost=cost, window=window, mode=mode),
                    self.timeout,
                )
            except (RedisError, OSError, TimeoutError) as error:
                self._mark_down(now, error)
            except Exception as error:  # a limiter bug must not turn into a 500 either
                log.exception("redis limiter failed unexpectedly; using in-process limits")
                self._mark_down(now, error)
            else:
                self._mark_up()
                return result
        metrics.RATELIMIT_FALLBACK.inc()
        return self.local.acquire_now(key, limit, cost=cost, window=window, mode=mode)

    async def adjust(self, key: str, entry: str, cost: int, *, window: float = WINDOW) -> str:
        """Settle the entry where it was recorded. If Redis is unreachable now, the Redis entry
        keeps its reserved cost: it overcharges the key until it ages out, never undercharges."""
        if entry.startswith(LOCAL_PREFIX):
            return self.local.adjust_now(key, entry, cost, window=window)
        try:
            return await asyncio.wait_for(
                self.primary.adjust(key, entry, cost, window=window), self.timeout)
        except (RedisError, OSError, TimeoutError) as error:
            self._mark_down(time.monotonic(), error)
            return entry

    def _mark_down(self, now: float, error: BaseException) -> None:
        if self.redis_up:
            self.redis_up = False
            self._down_since = now
            metrics.RATELIMIT_REDIS_UP.set(0)
        if now - self._last_warning >= self.warn_interval:
            self._last_warning = now
            log.warning("redis unreachable; rate limits are per-process until it returns",
                        error=type(error).__name__, down_for=round(now - self._down_since, 1))

    def _mark_up(self) -> None:
        if not self.redis_up:
            self.redis_up = True
            metrics.RATELIMIT_REDIS_UP.set(1)
            log.info("redis is back; rate limits are shared again",
                     down_for=round(time.monotonic() - self._down_since, 1))

    async def aclose(self) -> None:
        await self.primary.aclose()
