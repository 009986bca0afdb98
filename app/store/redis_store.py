"""Stored responses in Redis, shared by several gateway instances; Redis expires them.

Every call is bounded by `timeout` (socket timeouts, no retries) and any Redis failure is a
StoreUnavailable (503 with Retry-After): a hung or unreachable Redis costs a request seconds
and a clear message, never a hang or a 500.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app.errors import StoreUnavailable
from app.store.base import StoredResponse

T = TypeVar("T")
UNAVAILABLE = "The response store (Redis) is not answering; retry shortly."

_PREFIX = "mlxgw:response:"

# Check the owner and delete in one step, so a wrong owner can never remove the key.
_DELETE_IF_OWNER = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
local ok, data = pcall(cjson.decode, body)
if not ok or data['owner'] ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class RedisStore:
    def __init__(self, url: str, *, prefix: str = _PREFIX, timeout: float = 2.0) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
        )

    async def _call(self, operation: Awaitable[T]) -> T:
        try:
            # The outer bound also covers a connection stuck before its socket timeout applies.
            return await asyncio.wait_for(operation, self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as error:
            raise StoreUnavailable(UNAVAILABLE, retry_after=5) from error

    def _key(self, response_id: str) -> str:
        return self.prefix + response_id

    async def put(self, item: StoredResponse) -> None:
        ttl = math.ceil(item.expires_at - time.time())
        if ttl <= 0:
            return  # already expired: nothing to keep
        await self._call(self._redis.set(self._key(item.id), item.to_json(), ex=ttl))

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        body = await self._call(self._redis.get(self._key(response_id)))
        if body is None:
            return None
        item = StoredResponse.from_json(body)
        if item.owner != owner or item.expires_at <= time.time():
            return None
        return item

    async def delete(self, response_id: str, owner: str) -> bool:
        deleted = await self._call(self._redis.eval(
            _DELETE_IF_OWNER, 1, self._key(response_id), owner
        ))
        return bool(deleted)

    async def close(self) -> None:
        await self._redis.aclose()
