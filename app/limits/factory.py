"""Pick the limiter backend from settings."""

from __future__ import annotations

from app.limits.fallback import FallbackLimiter
from app.limits.redis_backend import RedisLimiter
from app.limits.window import InProcessLimiter, Limiter
from app.settings import Settings


def build_limiter(settings: Settings) -> Limiter:
    """Redis (shared across instances, in-process while unreachable) or in-process only."""
    if settings.redis.url:
        timeout = settings.redis.timeout
        return FallbackLimiter(RedisLimiter.from_url(settings.redis.url, timeout=timeout),
                               InProcessLimiter(), timeout=timeout)
    return InProcessLimiter()
