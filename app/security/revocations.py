"""Key revocations shared by every gateway through Redis.

Each machine keeps its own keys file (hashes only, 0600), copied from the one where keys are
created. A revocation must not wait for that copy: `keys revoke` on any machine also adds the
key id to one Redis set, and every server refuses ids in that set. A server reads the set once
per `interval` in the background (never on the request path: `verify` stays a dictionary
lookup) and adds its own file's revoked ids to it, so a revocation made while Redis was down
spreads once it is back.

The known set only grows: a revocation is permanent, so a Redis outage or a flushed database
never brings a revoked key back; it only delays revocations made elsewhere meanwhile.
"""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from app.security.keys import KeyStore

log = structlog.get_logger(__name__)

REVOKED_SET = "mlxgw:keys:revoked"


def publish_revocation(url: str, key_id: str, *, timeout: float = 2.0) -> None:
    """Add one revoked key id to the shared set (the CLI). Raises RedisError/OSError."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.sadd(REVOKED_SET, key_id)
    finally:
        client.close()


class SharedRevocations:
    """Keeps `keys.revoked_elsewhere` in step with the Redis set while `run()` runs."""

    def __init__(self, url: str, keys: KeyStore, *, interval: float = 1.0,
                 timeout: float = 1.0, warn_interval: float = 60.0) -> None:
        self.keys = keys
        self.interval = interval
        self.timeout = timeout
        self.warn_interval = warn_interval
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._published: set[str] = set()
        self._last_warning = -float("inf")

    async def refresh(self) -> None:
        """One round: publish this file's revocations the set lacks, then read the set."""
        local = {record.id for record in self.keys.records() if record.revoked}
        missing = local - self._published
        if missing:
            await self._redis.sadd(REVOKED_SET, *sorted(missing))
            self._published |= missing
        members = await self._redis.smembers(REVOKED_SET)
        shared = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        self._published |= shared & local
        known = self.keys.revoked_elsewhere
        if not shared <= known:
            added = shared - known
            self.keys.revoked_elsewhere = known | frozenset(added)
            log.info("keys revoked on another gateway", key_ids=sorted(added))

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.refresh(), self.timeout * 2)
            except (RedisError, OSError, TimeoutError) as error:
                now = time.monotonic()
                if now - self._last_warning >= self.warn_interval:
                    self._last_warning = now
                    log.warning("redis unreachable: revocations made on other gateways are "
                                "not seen until it returns", error=type(error).__name__)
            except Exception:  # a bug here must not stop the watching for good
                log.exception("reading shared revocations failed")
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await self._redis.aclose()
